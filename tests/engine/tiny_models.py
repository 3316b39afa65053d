"""Tiny random Hugging Face checkpoints (Llama, Qwen2, Mistral) for tests and benchmarks.

Everything is deterministic: the tokenizer is trained on generated text, the weights come from
a fixed seed. `transformers` is a dev dependency; the engine never imports it.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
PAD, BOS, EOS, IM_START, IM_END = SPECIAL_TOKENS
TOKENIZER_VOCAB_SIZE = 512

# ChatML with a leading BOS and an optional tool list, as Qwen/Llama-3 style templates do.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\nTools:\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The parity variants: name -> make_checkpoint keyword arguments.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "llama": {"arch": "llama"},
    "qwen2": {"arch": "qwen2"},
    "mistral": {"arch": "mistral"},
    "llama-rope-llama3": {"arch": "llama", "rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0},
    "llama-rope-linear": {"arch": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama-tied": {"arch": "llama", "tie": True},
    "llama-sharded": {"arch": "llama", "shard": True},
    "qwen2-tied": {"arch": "qwen2", "tie": True, "rope_theta": 1000000.0},
    # Most hub checkpoints predate transformers 5: top-level rope_theta/rope_scaling/torch_dtype.
    "llama-legacy-config": {
        "arch": "llama",
        "rope_scaling": LLAMA3_ROPE,
        "rope_theta": 500000.0,
        "legacy_config": True,
    },
}

_WORD_TEXT = (
    "the a an model token engine batch cache block layer head query key value attention "
    "prompt answer question pipeline planner step tool search result fast slow small large "
    "red green blue river mountain city street window garden letter number system request "
    "is was are be run runs ran make makes made read reads write writes find finds give "
    "and or but if then when while because so after before under over into with from "
    "I you we they it this that these those there here what which who how why"
)
_WORDS = tuple(_WORD_TEXT.split())
# Multi-byte words so the byte-level BPE learns merges inside UTF-8 sequences.
_MULTIBYTE_WORDS = (
    "café",
    "naïve",
    "über",
    "你好",
    "世界",
    "模型",
    "こんにちは",
    "🙂",
    "🚀",
    "👍🏽",
)


def corpus(n_sentences: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic English-ish sentences (with some multi-byte words) to train the tokenizer."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [
            rng.choice(_MULTIBYTE_WORDS) if rng.random() < 0.05 else rng.choice(_WORDS)
            for _ in range(rng.randint(4, 14))
        ]
        end = rng.choice(".?!") if rng.random() < 0.8 else f" {rng.randint(0, 999)}."
        sentences.append(" ".join(words).capitalize() + end)
    return sentences


@functools.cache
def _tokenizer_files() -> dict[str, bytes]:
    """Train the tokenizer once per process and keep its files in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    bos_id = tok.token_to_id(BOS)
    # Like the Llama-3 tokenizer.json: the post-processor is what adds BOS.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": tok.to_str().encode(),
        "tokenizer_config.json": json.dumps(config, indent=2).encode(),
        "special_tokens_map.json": json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2
        ).encode(),
    }


def make_tokenizer(out_dir: str | Path) -> None:
    """Write tokenizer.json (byte-level BPE, BOS added by the post-processor) and its config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in _tokenizer_files().items():
        (out / name).write_bytes(data)


def special_token_ids() -> dict[str, int]:
    """Ids of the special tokens in the tiny tokenizer."""
    vocab = json.loads(_tokenizer_files()["tokenizer.json"])["added_tokens"]
    return {t["content"]: t["id"] for t in vocab}


def tokenizer_vocab_size() -> int:
    """Vocabulary size of the tiny tokenizer, added tokens included."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_tokenizer_files()["tokenizer.json"].decode())
    return tok.get_vocab_size(with_added_tokens=True)


def make_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    dtype: str = "float32",
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_position: int = 512,
    tie: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    shard: bool = False,
    legacy_config: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a random `arch` checkpoint (safetensors, tokenizer, generation config) to `out_dir`.

    `legacy_config` rewrites config.json in the transformers 4 layout (top-level `rope_theta`,
    `rope_scaling`, `torch_dtype`) that most published checkpoints still use.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out = Path(out_dir)
    make_tokenizer(out)
    config = _config(
        arch,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        max_position=max_position,
        tie=tie,
        rope_scaling=rope_scaling,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.generation_config = _generation_config()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="100KB" if shard else "10GB")
    if legacy_config:
        _write_legacy_config(out)
    return out


def _write_legacy_config(checkpoint: Path) -> None:
    cfg = json.loads((checkpoint / "config.json").read_text())
    rope = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
    cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (checkpoint / "config.json").write_text(json.dumps(cfg, indent=2))


def make_large_llama(out_dir: str | Path, params_millions: float = 30) -> Path:
    """A random Llama of about `params_millions` million parameters, for the benchmark."""
    hidden, heads, kv_heads, intermediate = 512, 8, 2, 1408
    kv_dim = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate
    embeddings = 2 * tokenizer_vocab_size() * hidden
    layers = max(1, round((params_millions * 1e6 - embeddings) / per_layer))
    return make_checkpoint(
        out_dir,
        "llama",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        max_position=4096,
        std=0.02,
    )


def make_variant(out_dir: str | Path, variant: str) -> Path:
    """Build one of the named `VARIANTS`."""
    return make_checkpoint(out_dir, **VARIANTS[variant])


@functools.cache
def _cached_variant(variant: str) -> Path:
    # Benchmarks and scripts outside pytest reuse one build per process.
    return make_variant(Path(tempfile.mkdtemp(prefix=f"tiny-{variant}-")), variant)


def copy_variant(out_dir: str | Path, variant: str) -> Path:
    """Copy a per-process cached build of `variant` into `out_dir`."""
    shutil.copytree(_cached_variant(variant), out_dir, dirs_exist_ok=True)
    return Path(out_dir)


def _config(arch: str, *, rope_scaling: dict[str, Any] | None, **sizes: Any) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(classes)}")
    cls = classes[arch]
    ids = special_token_ids()
    kwargs: dict[str, Any] = {
        "vocab_size": tokenizer_vocab_size(),
        "hidden_size": sizes.pop("hidden"),
        "num_hidden_layers": sizes.pop("layers"),
        "num_attention_heads": sizes.pop("heads"),
        "num_key_value_heads": sizes.pop("kv_heads"),
        "intermediate_size": sizes.pop("intermediate"),
        "max_position_embeddings": sizes.pop("max_position"),
        "tie_word_embeddings": sizes.pop("tie"),
        "rms_norm_eps": 1e-6,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "initializer_range": sizes.pop("std", 0.05),
    }
    if arch == "mistral":
        kwargs["sliding_window"] = 4096
    theta = sizes.pop("rope_theta", 10000.0)
    kwargs.update(_rope_kwargs(cls, theta, rope_scaling))
    kwargs.update(sizes)
    return cls(**kwargs, architectures=[cls.__name__.replace("Config", "ForCausalLM")])


def _rope_kwargs(cls: type, theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    # transformers >= 5 takes one `rope_parameters` dict (theta included); older versions take
    # `rope_theta` and `rope_scaling` separately.
    if "rope_parameters" in inspect.signature(cls.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta}}
    return {"rope_theta": theta, "rope_scaling": scaling}


def _randomize(model: Any, seed: int) -> None:
    """Re-initialise every weight so logits are far from flat and norms are not all ones."""
    import torch

    std = model.config.initializer_range
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                param.copy_(4 * std * noise)
            else:
                param.copy_(std * noise)


def _generation_config() -> Any:
    from transformers import GenerationConfig

    ids = special_token_ids()
    return GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[IM_END]], pad_token_id=ids[PAD]
    )


def rewrite_config(checkpoint: str | Path, **changes: Any) -> dict[str, Any]:
    """Edit a checkpoint's config.json in place (None deletes a key); return the new dict."""
    file = Path(checkpoint) / "config.json"
    cfg = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    file.write_text(json.dumps(cfg, indent=2))
    return cfg
