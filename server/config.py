"""The server configuration (`compound.yaml`): typed, strict, and errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta, Struct, field

from server.errors import ConfigError

Positive = Annotated[int, Meta(gt=0)]
ModelName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")]


class LimitsConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Per-request limits the API enforces before the engine sees a request."""

    max_body_bytes: Positive = 1 << 20
    max_tokens: Positive = 4096
    request_timeout_s: Annotated[float, Meta(gt=0)] | None = 600.0


class EngineConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Arguments of `Engine(...)`; None means the engine's default."""

    memory_budget_bytes: Positive | None = None
    device: str | None = None


class ModelConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One model to load at start-up: arguments of `Engine.load_model`."""

    name: ModelName
    path: str
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: Positive | None = None
    num_blocks: Positive | None = None
    max_num_seqs: Positive | None = None

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `Engine.load_model`, leaving unset ones to the engine."""
        optional = {
            "max_model_len": self.max_model_len,
            "num_blocks": self.num_blocks,
            "max_num_seqs": self.max_num_seqs,
        }
        return {"dtype": self.dtype} | {k: v for k, v in optional.items() if v is not None}


class ServerConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Everything `compound serve` reads from its YAML file."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    database_url: str = "sqlite:///compound.db"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    models: tuple[ModelConfig, ...] = ()


def load_config(path: str | Path) -> ServerConfig:
    """Read a YAML config file; relative model paths resolve against the file's directory."""
    file = Path(path)
    config = parse_config(_read(file), file=str(file))
    base = file.resolve().parent
    models = tuple(
        msgspec.structs.replace(m, path=str((base / m.path).resolve())) for m in config.models
    )
    return msgspec.structs.replace(config, models=models)


def parse_config(text: str, *, file: str = "<config>") -> ServerConfig:
    """Parse YAML text into a `ServerConfig`; raise `ConfigError` naming the offending field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML ({e})", file=file) from e
    try:
        config = msgspec.convert(raw if raw is not None else {}, ServerConfig)
    except msgspec.ValidationError as e:
        message, path = _split_location(str(e))
        raise ConfigError(message, file=file, path=path) from e
    _check_unique_names(config, file)
    return config


def _read(file: Path) -> str:
    try:
        return file.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read ({e.strerror})", file=str(file)) from e


def _split_location(message: str) -> tuple[str, str | None]:
    # msgspec ends messages with " - at `$.limits.max_tokens`"; report "limits.max_tokens".
    match = re.fullmatch(r"(.*) - at `\$\.?(.*)`", message)
    if not match:
        return message, None
    return match.group(1), match.group(2) or None


def _check_unique_names(config: ServerConfig, file: str) -> None:
    seen: set[str] = set()
    for i, model in enumerate(config.models):
        if model.name in seen:
            raise ConfigError(
                f"duplicate model name {model.name!r}", file=file, path=f"models[{i}].name"
            )
        seen.add(model.name)
