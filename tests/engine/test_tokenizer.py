"""Tokenizer loading, encode/decode, chat templates (sandboxed) and streaming detokenization."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from engine.errors import CheckpointError, InvalidRequestError
from engine.tokenizer import Tokenizer
from tests.engine.tiny_models import BOS, CHAT_TEMPLATE, EOS, IM_END, PAD, special_token_ids

TEXTS = [
    "Hello world",
    "The model reads the prompt and writes an answer.",
    "  leading spaces, tabs\tand\nnewlines  ",
    "café naïve über 你好世界 模型 こんにちは",
    "emoji 🙂🚀👍🏽 mixed with text 🚀!",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? 🙂"},
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Tokenizer:
    """The tiny tokenizer, loaded once."""
    return Tokenizer.from_dir(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_tokenizer_dir: Path):
    """The same files loaded by transformers, the reference behaviour."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _copy_tokenizer(src: Path, dst: Path, **config_changes: object) -> Path:
    """Copy the tokenizer files and edit tokenizer_config.json (None deletes a key)."""
    shutil.copytree(src, dst)
    file = dst / "tokenizer_config.json"
    cfg = json.loads(file.read_text())
    for key, value in config_changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    file.write_text(json.dumps(cfg))
    return dst


def test_special_tokens_and_sizes(tok: Tokenizer) -> None:
    ids = special_token_ids()
    assert tok.vocab_size == 512
    assert tok.bos_token_id == ids[BOS]
    assert tok.eos_token_ids == (ids[EOS],)
    assert tok.pad_token_id == ids[PAD]
    assert tok.has_chat_template


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_bos(tok: Tokenizer, text: str) -> None:
    with_bos = tok.encode(text)
    plain = tok.encode(text, add_special_tokens=False)
    assert with_bos == [tok.bos_token_id, *plain]
    assert tok.decode(with_bos) == text
    assert tok.decode(plain) == text
    assert tok.decode(with_bos, skip_special_tokens=False) == BOS + text


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    assert tok.encode(text) == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(
        text, add_special_tokens=False
    )


def test_special_token_text_is_one_token(tok: Tokenizer) -> None:
    ids = tok.encode(f"<|im_start|>user\nhi{IM_END}", add_special_tokens=False)
    assert ids[0] == special_token_ids()["<|im_start|>"]
    assert ids[-1] == special_token_ids()[IM_END]


def test_bos_prepended_when_post_processor_adds_none(tiny_tokenizer_dir: Path, tmp_path: Path):
    for add_bos, expect_bos in ((True, True), (False, False)):
        out = _copy_tokenizer(tiny_tokenizer_dir, tmp_path / str(add_bos), add_bos_token=add_bos)
        data = json.loads((out / "tokenizer.json").read_text())
        data["post_processor"] = None
        (out / "tokenizer.json").write_text(json.dumps(data))
        tok = Tokenizer.from_dir(out)
        plain = tok.encode("Hello world", add_special_tokens=False)
        expected = [tok.bos_token_id, *plain] if expect_bos else plain
        assert tok.encode("Hello world") == expected


def test_added_token_dicts_and_generation_eos(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = _copy_tokenizer(
        tiny_tokenizer_dir,
        tmp_path / "tok",
        bos_token={"content": BOS, "lstrip": False, "special": True},
        eos_token={"content": IM_END, "rstrip": False},
        pad_token=None,
    )
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    tok = Tokenizer.from_dir(out)
    ids = special_token_ids()
    assert tok.bos_token_id == ids[BOS]
    assert tok.eos_token_ids == (ids[IM_END], ids[EOS])
    assert tok.pad_token_id is None


def test_generation_eos_as_int(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = _copy_tokenizer(tiny_tokenizer_dir, tmp_path / "tok")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    assert Tokenizer.from_dir(out).eos_token_ids == (2, 4)


def test_chat_template_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    for add_prompt in (True, False):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_prompt)
        ref = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=add_prompt, tokenize=False)
        assert ours == ref
    assert ours.startswith(BOS + "<|im_start|>system\nYou are terse.<|im_end|>\n")


def test_chat_template_tools_render_as_plain_json(tok: Tokenizer) -> None:
    tools = [{"name": "kb.search", "description": "<find> & fetch — ünïcode"}]
    text = tok.apply_chat_template(MESSAGES, tools=tools)
    assert json.dumps(tools[0], ensure_ascii=False) in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_extra_variables_and_helpers(tok: Tokenizer) -> None:
    template = "{{ greeting }} {{ strftime_now('%Y') | length }} {{ eos_token }}"
    text = tok.apply_chat_template(MESSAGES, chat_template=template, greeting="hi")
    assert text == f"hi 4 {EOS}"


def test_chat_template_list_form_and_jinja_file(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    out = _copy_tokenizer(tiny_tokenizer_dir, tmp_path / "list", chat_template=named)
    assert Tokenizer.from_dir(out).apply_chat_template(MESSAGES) == "D"
    out = _copy_tokenizer(tiny_tokenizer_dir, tmp_path / "file", chat_template=None)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert Tokenizer.from_dir(out).apply_chat_template(MESSAGES).endswith("assistant\n")


def test_missing_chat_template(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = _copy_tokenizer(tiny_tokenizer_dir, tmp_path / "tok", chat_template=None)
    tok = Tokenizer.from_dir(out)
    assert not tok.has_chat_template
    with pytest.raises(InvalidRequestError, match="no chat template") as info:
        tok.apply_chat_template(MESSAGES)
    assert info.value.param == "messages"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.system('true') }}",
        "{{ raise_exception.__globals__ }}",
        "{% set ns = namespace(__dict__=1) %}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update(role='x') }}",
        "{{ raise_exception('no system messages') }}",
        "{% for %}",
        "{{ 1 / 0 }}",
        "{{ undefined_function() }}",
    ],
)
def test_bad_templates_raise_invalid_request(tok: Tokenizer, template: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        tok.apply_chat_template(MESSAGES, chat_template=template)
    assert info.value.param == "messages"
    assert MESSAGES[0] == {"role": "system", "content": "You are terse."}


def test_raise_exception_message_passes_through(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        tok.apply_chat_template(
            MESSAGES, chat_template="{{ raise_exception('roles must alternate') }}"
        )


def test_missing_tokenizer_json(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    out = _copy_tokenizer(tiny_tokenizer_dir, tmp_path / "tok")
    (out / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_dir(out)
    assert info.value.file == str(out / "tokenizer.json")


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
)
def test_invalid_files_name_the_file(tiny_tokenizer_dir: Path, tmp_path: Path, name: str) -> None:
    out = _copy_tokenizer(tiny_tokenizer_dir, tmp_path / "tok")
    (out / name).write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        Tokenizer.from_dir(out)
    assert info.value.file == str(out / name)


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int], skip: bool) -> tuple[list[str], str]:
    detok = tok.detokenizer(prompt, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas, detok.text


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_matches_decode_on_random_ids(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(1234)
    # The last prompt ends inside a character: the detokenizer must not glue output onto it.
    partial = [tok.token_to_id(_byte_level(b)) for b in "🚀".encode()[:2]]
    prompts = [[], tok.encode("Hello there"), tok.encode("你好 🙂"), partial]
    for trial in range(60):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        _, text = _stream(tok, ids, prompts[trial % len(prompts)], skip)
        assert text == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_streams_multibyte_text_without_replacement_chars(
    tok: Tokenizer, text: str
) -> None:
    prompt = tok.encode("Question: ")
    ids = tok.encode(text, add_special_tokens=False)
    deltas, streamed = _stream(tok, ids, prompt, skip=True)
    assert streamed == text
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_byte_tokens_hold_back_partial_characters(tok: Tokenizer) -> None:
    # One token per UTF-8 byte of the emoji: nothing can be shown until the last byte.
    byte_tokens = [tok.token_to_id(_byte_level(b)) for b in "🚀".encode()]
    assert None not in byte_tokens
    detok = tok.detokenizer([])
    assert [detok.add(i) for i in byte_tokens] == ["", "", "", "🚀"]


def test_detokenizer_work_per_token_is_bounded(tok: Tokenizer, monkeypatch) -> None:
    longest = 0
    decode = tok.decode

    def counting_decode(ids, skip_special_tokens=True):
        nonlocal longest
        ids = list(ids)
        longest = max(longest, len(ids))
        return decode(ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tok, "decode", counting_decode)
    ids = tok.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    detok = tok.detokenizer(tok.encode("prompt " * 50))
    for i in ids:
        detok.add(i)
    assert len(ids) > 500
    assert longest <= 12


def _byte_level(byte: int) -> str:
    """The printable character byte-level BPE uses for one raw byte (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def test_detokenizer_keeps_sentencepiece_leading_space(tmp_path: Path) -> None:
    # Metaspace decoding drops the first token's leading space; the prompt context restores it.
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    raw.decoder = decoders.Metaspace(prepend_scheme="always")
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello world again") == [1, 2, 3]
    assert tok.decode([2, 3]) == "world again"
    deltas, text = _stream(tok, [2, 3], tok.encode("Hello"), skip=True)
    assert deltas[:2] == [" world", " again"]
    assert text == " world again"
