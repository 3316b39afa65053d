"""Tokenizer, chat template and streaming detokenizer for a Hugging Face checkpoint directory.

Only the `tokenizers` library (Rust) and `jinja2` are used here: `transformers` is a dev-only
dependency and is never imported at serve time.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import CheckpointError, InvalidRequestError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Newer `transformers` save the chat template beside tokenizer_config.json instead of inside it.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

# How many prompt tokens the detokenizer decodes as left context: enough for decoders whose
# output depends on the previous token (SentencePiece's leading-space handling).
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens a tokenizer_config.json names, as text and as ids."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, chat template, streaming detokenizer."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special: SpecialTokens,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._special = special
        self._chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = special.bos_token_id
        self.eos_token_ids = special.eos_token_ids
        self.pad_token_id = special.pad_token_id
        self.has_chat_template = bool(chat_template)
        self._prepend_bos, self._append_eos = self._missing_specials()

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and the optional tokenizer and generation configs of a checkpoint."""
        root = Path(path)
        backend = _load_backend(root / TOKENIZER_FILE)
        config = _read_json(root / TOKENIZER_CONFIG_FILE)
        generation_file = root / GENERATION_CONFIG_FILE
        generation = _read_json(generation_file)
        generation_eos = _as_ids(generation.get("eos_token_id"), str(generation_file))
        special = _special_tokens(backend, config, generation_eos)
        return cls(backend, special, _chat_template(root, config))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens follow the tokenizer.json post-processor."""
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids = [self._special.bos_token_id, *ids]
        if add_special_tokens and self._append_eos:
            ids = [*ids, self._special.eos_token_ids[0]]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence decodes to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str:
        """The `tokenizers` serialization (tokenizer.json text); grammar engines read the vocab."""
        return self._backend.to_str()

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, or None when the vocabulary lacks it."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level form, not decoded text)."""
        return self._backend.id_to_token(token_id)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[Any] | None = None,
        *,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str:
        """Render messages with the checkpoint's chat template (or `chat_template`) in a sandbox.

        The result usually starts with the BOS text already, so encode it with
        `add_special_tokens=False`. Every template failure is an `InvalidRequestError`.
        """
        source = chat_template or self._chat_template
        if not source:
            raise InvalidRequestError("model has no chat template", param="messages")
        variables = {
            **extra,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            "bos_token": self._special.bos_token or "",
            "eos_token": self._special.eos_token or "",
        }
        return render_template(source, variables)

    def detokenizer(
        self, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        """A streaming detokenizer for the tokens generated after `prompt_token_ids`."""
        return IncrementalDetokenizer(self, prompt_token_ids, skip_special_tokens)

    def _missing_specials(self) -> tuple[bool, bool]:
        # Whether add_bos_token / add_eos_token ask for a token the post-processor does not add.
        special = self._special
        probe = self._backend.encode("a", add_special_tokens=True).ids
        prepend = (
            special.add_bos_token
            and special.bos_token_id is not None
            and probe[:1] != [special.bos_token_id]
        )
        append = (
            special.add_eos_token
            and bool(special.eos_token_ids)
            and probe[-1:] != [special.eos_token_ids[0]]
        )
        return prepend, append


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, holding back incomplete UTF-8 sequences.

    Each step decodes only a small window: the tokens since the last emitted text plus a few
    tokens of left context (the prefix/read-offset scheme of vLLM and TGI), so the cost per
    token does not grow with the length of the output.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # A prompt that ends inside a character would garble the first delta: start without context.
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []
        self._window: list[int] = context
        self._read_offset = len(context)
        self._chunks: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def add(self, token_id: int) -> str:
        """Append one generated token and return the newly completed text (may be empty)."""
        self._window.append(token_id)
        prefix_text = self._decode(self._window[: self._read_offset])
        new_text = self._decode(self._window)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text) :]
        # The tokens just emitted become the left context of the next step.
        self._window = self._window[self._read_offset :]
        self._read_offset = len(self._window)
        self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """Return text still held back (a trailing incomplete sequence decodes to U+FFFD)."""
        prefix_text = self._decode(self._window[: self._read_offset])
        new_text = self._decode(self._window)
        delta = new_text[len(prefix_text) :]
        self._window = self._window[self._read_offset :]
        self._read_offset = len(self._window)
        if delta:
            self._chunks.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""


def render_template(source: str, variables: dict[str, Any]) -> str:
    """Render an untrusted chat template; any failure becomes an `InvalidRequestError`."""
    try:
        return _compile(source).render(**variables)
    except InvalidRequestError:
        raise
    # A template is user-supplied code: whatever it raises is a bad request, not a server fault.
    except Exception as e:
        logger.debug("chat template failed", exc_info=True)
        raise InvalidRequestError(f"chat template failed: {e}", param="messages") from e


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    return _template_environment().from_string(source)


@functools.cache
def _template_environment() -> ImmutableSandboxedEnvironment:
    # The same settings and helpers as transformers' apply_chat_template, so hub templates
    # render identically.
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Sandbox that fails on unsafe attribute access instead of rendering it as undefined."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        """Raise at once, so a probing template cannot silently render."""
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used by some hub templates) renders its body."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> list[jinja2.nodes.Node]:
        """Parse the block and return its body unchanged."""
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, which could reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(str(message), param="messages")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _load_backend(file: Path) -> tokenizers.Tokenizer:
    if not file.is_file():
        raise CheckpointError("file not found", file=str(file))
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    # The Rust binding raises a plain Exception for every parse failure.
    except Exception as e:
        raise CheckpointError(f"cannot load tokenizer ({e})", file=str(file)) from e


def _read_json(file: Path) -> dict[str, Any]:
    """Parse an optional JSON object file; an absent file reads as empty."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"invalid JSON ({e})", file=str(file)) from e
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", file=str(file))
    return data


def _special_tokens(
    backend: tokenizers.Tokenizer, config: dict[str, Any], generation_eos: tuple[int, ...]
) -> SpecialTokens:
    # Stop tokens: the tokenizer's eos first, then any extra ones generation_config.json lists.
    bos, eos, pad = (_token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    eos_id = _token_id(backend, eos)
    eos_ids = tuple(dict.fromkeys([*([eos_id] if eos_id is not None else []), *generation_eos]))
    return SpecialTokens(
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        bos_token_id=_token_id(backend, bos),
        eos_token_ids=eos_ids,
        pad_token_id=_token_id(backend, pad),
        add_bos_token=bool(config.get("add_bos_token", False)),
        add_eos_token=bool(config.get("add_eos_token", False)),
    )


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as a serialised AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_id(backend: tokenizers.Tokenizer, token: str | None) -> int | None:
    if token is None:
        return None
    token_id = backend.token_to_id(token)
    if token_id is None:
        logger.warning("special token %r is not in the vocabulary", token)
    return token_id


def _as_ids(value: Any, file: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(
            f"expected an int or a list of ints, got {value!r}", file=file, field="eos_token_id"
        )
    return tuple(values)


def _chat_template(root: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if template is None:
        template = _chat_template_file(root)
    if isinstance(template, list):
        # Several named templates: the one named "default" is the chat template.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(
            "expected a string", file=str(root / TOKENIZER_CONFIG_FILE), field="chat_template"
        )
    return template or None


def _chat_template_file(root: Path) -> str | list[Any] | None:
    jinja_file, json_file = (root / name for name in CHAT_TEMPLATE_FILES)
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return _read_json(json_file).get("chat_template")
