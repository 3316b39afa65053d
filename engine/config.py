"""Model hyper-parameters read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError, UnsupportedArchitectureError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
ROPE_SCALING_TYPES = ("llama3", "linear", "default")


@dataclass(frozen=True)
class ModelArgs:
    """Everything the model code needs to know about one architecture instance."""

    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], file: str = "config.json") -> ModelArgs:
        """Build from a parsed `config.json`; raise `CheckpointError` naming the field."""
        arch = _architecture(cfg, file)
        dim = _required(cfg, "hidden_size", int, file)
        n_heads = _required(cfg, "num_attention_heads", int, file)
        n_kv_heads = cfg.get("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            raise CheckpointError(
                f"num_attention_heads ({n_heads}) is not a multiple of it ({n_kv_heads})",
                file=file,
                field="num_key_value_heads",
            )
        return cls(
            architecture=arch,
            vocab_size=_required(cfg, "vocab_size", int, file),
            dim=dim,
            n_layers=_required(cfg, "num_hidden_layers", int, file),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=cfg.get("head_dim") or dim // n_heads,
            intermediate_size=_required(cfg, "intermediate_size", int, file),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(_rope(cfg).get("rope_theta") or cfg.get("rope_theta") or 10000.0),
            rope_scaling=_rope_scaling(cfg, file),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            qkv_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(cfg, arch),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_ids(cfg.get("eos_token_id")),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArgs:
        """Read `config.json` from a checkpoint directory."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise CheckpointError("file not found", file=str(file))
        try:
            cfg = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"invalid JSON ({e})", file=str(file)) from e
        return cls.from_hf_config(cfg, str(file))


def _architecture(cfg: dict[str, Any], file: str) -> str:
    archs = cfg.get("architectures") or []
    if not archs:
        raise CheckpointError("missing", file=file, field="architectures")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{archs[0]!r} is not supported (expected one of {', '.join(SUPPORTED_ARCHITECTURES)})",
            file=file,
            field="architectures",
        )
    return archs[0]


def _required(cfg: dict[str, Any], key: str, kind: type, file: str) -> Any:
    if key not in cfg:
        raise CheckpointError("missing", file=file, field=key)
    value = cfg[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise CheckpointError(f"expected {kind.__name__}, got {value!r}", file=file, field=key)
    return value


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes `rope_parameters` (theta included); older configs `rope_scaling`.
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _rope_scaling(cfg: dict[str, Any], file: str) -> dict[str, Any] | None:
    scaling = _rope(cfg)
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ROPE_SCALING_TYPES:
        raise CheckpointError(
            f"rope type {kind!r} is not supported (expected one of {', '.join(ROPE_SCALING_TYPES)})",
            file=file,
            field="rope_parameters" if "rope_parameters" in cfg else "rope_scaling",
        )
    return None if kind == "default" else {**scaling, "rope_type": kind}


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
    window = cfg.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)
