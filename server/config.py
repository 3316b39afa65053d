"""The server configuration (`compound.yaml`): typed, strict, and errors that name the field."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta, Struct, field
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from engine.spec_config import SpeculativeConfig
from server.errors import ConfigError
from tools import ToolsConfig

DATABASE_URL_ENV = "COMPOUND_DATABASE_URL"

Positive = Annotated[int, Meta(gt=0)]
ModelName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")]


class LimitsConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Per-request limits the API enforces before the engine sees a request."""

    max_body_bytes: Positive = 1 << 20
    max_tokens: Positive = 4096
    request_timeout_s: Annotated[float, Meta(gt=0)] | None = 600.0
    # Pipeline runs: the server caps each spec's own `limits` with these.
    max_spec_bytes: Positive = 256 * 1024
    run_timeout_s: Annotated[float, Meta(gt=0)] = 600.0
    max_fan_out: Positive = 1024
    max_run_tokens: Positive = 1_000_000
    max_run_concurrency: Positive = 64
    # Concurrency per resource class, e.g. {"model:demo-base": 8, "tool:*": 16}.
    per_resource: dict[str, Positive] = {}
    # A step output stored with a run is cut to this many bytes of JSON.
    max_stored_output_bytes: Positive = 64 * 1024


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
    # LoRA: adapters under this folder load on demand as `<name>:<adapter>`; POST /v1/adapters
    # may only name folders inside it (a request never points the server at arbitrary files).
    adapter_dir: str | None = None
    max_loaded_adapters: int | None = None
    # Weight-only quantization at load time (a checkpoint from `compound quantize` carries its
    # own scheme in config.json) and the KV cache's storage dtype.
    quantization: Literal["int8", "int4-g32", "int4-g64", "int4-g128", "fp8"] | None = None
    kv_cache_dtype: Literal["auto", "int8", "fp8"] | None = None
    # Speculative decoding, e.g. {method: draft, draft_model: demo-draft, num_tokens: 4}
    speculative: SpeculativeConfig | None = None

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `Engine.load_model`, leaving unset ones to the engine."""
        optional = {
            "max_model_len": self.max_model_len,
            "num_blocks": self.num_blocks,
            "max_num_seqs": self.max_num_seqs,
            "adapter_dir": self.adapter_dir,
            "max_loaded_adapters": self.max_loaded_adapters,
            "quantization": self.quantization,
            "kv_cache_dtype": self.kv_cache_dtype,
            "speculative": self.speculative,
        }
        return {"dtype": self.dtype} | {k: v for k, v in optional.items() if v is not None}


class ProviderConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """An OpenAI-compatible provider; specs name its targets, never its URL or key."""

    name: ModelName
    base_url: str
    api_key_env: str | None = None  # the environment variable holding the API key
    models: dict[ModelName, str] = {}  # target a spec may name -> the provider's model id


class ServerConfig(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Everything `compound serve` reads from its YAML file."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    database_url: str = "sqlite:///compound.db"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    models: tuple[ModelConfig, ...] = ()
    providers: tuple[ProviderConfig, ...] = ()
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    # Specs registered at start-up; one that does not load or bind is logged and skipped.
    pipelines_dir: str = "pipelines"
    # A local git repository of specs (the top-level *.yaml/*.yml/*.json files): `name` serves
    # the latest valid version on `pipelines_branch`, `name@<tag|branch|commit>` any version.
    pipelines_repo: str | None = None
    pipelines_branch: Annotated[str, Meta(min_length=1, max_length=200)] = "main"
    # Seconds between checks of the branch for new commits; 0 only on POST /v1/registry/reload.
    poll_interval_s: Annotated[float, Meta(ge=0)] = 5.0
    # POST /v1/pipelines commits the spec to `pipelines_branch` (author and message from the
    # request) instead of storing it in the database only.
    commit_posted: bool = False
    # A run's server renews its lease on the run every third of this; when a lease is this old
    # (the process crashed), any replica marks the run failed instead of `running` forever.
    run_lease_s: Annotated[float, Meta(gt=0)] = 30.0


def load_config(path: str | Path) -> ServerConfig:
    """Read a YAML config file; relative paths (models, pipelines, SQLite file) resolve against
    the file's directory; `COMPOUND_DATABASE_URL` overrides `database_url`."""
    file = Path(path)
    config = parse_config(_read(file), file=str(file))
    base = file.resolve().parent
    models = tuple(
        msgspec.structs.replace(
            m,
            path=str((base / m.path).resolve()),
            adapter_dir=str((base / m.adapter_dir).resolve()) if m.adapter_dir else None,
        )
        for m in config.models
    )
    env_url = os.environ.get(DATABASE_URL_ENV)
    database_url = (
        resolve_database_url(env_url, Path.cwd(), file=DATABASE_URL_ENV)
        if env_url
        else resolve_database_url(config.database_url, base, file=str(file))
    )
    tools = config.tools
    if tools.kb_path is not None:
        tools = msgspec.structs.replace(tools, kb_path=str((base / tools.kb_path).resolve()))
    return msgspec.structs.replace(
        config,
        models=models,
        database_url=database_url,
        pipelines_dir=str((base / config.pipelines_dir).resolve()),
        pipelines_repo=str((base / config.pipelines_repo).resolve())
        if config.pipelines_repo
        else None,
        tools=tools,
    )


def resolve_database_url(url: str, base: Path, *, file: str = "<config>") -> str:
    """The URL with a relative SQLite file made absolute against `base`."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise ConfigError(f"invalid database URL ({e})", file=file, path="database_url") from e
    database = parsed.database
    if not parsed.drivername.startswith("sqlite") or database in (None, "", ":memory:"):
        return url
    if database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str((base / database).resolve())).render_as_string(
        hide_password=False
    )


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
