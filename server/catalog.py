"""The planner's catalog and spec files, by name only: no engine, no executor, no database.

`compound validate` and `compound explain` need nothing more, so they start fast and load no
weights; the server and `compound run` use the same functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from planner import Catalog, PipelineSpec, SpecErrors, load_spec
from server.config import ProviderConfig, ServerConfig
from server.errors import PipelineNotFoundError

logger = logging.getLogger(__name__)

SPEC_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}


def provider_targets(providers: Iterable[ProviderConfig]) -> set[str]:
    """Every model target the configured providers serve."""
    return {target for p in providers for target in p.models}


def build_catalog(
    *,
    models: Callable[[str], bool] | set[str],
    tools: dict[str, dict[str, Any]],
    pipelines: Callable[[str], bool] | set[str] = frozenset(),
) -> Catalog:
    """The planner's view of what this server can run."""
    return Catalog(models=models, tools=tools, pipelines=pipelines)


def config_models(config: ServerConfig) -> set[str]:
    """Model targets named by the configuration (no weights loaded): engine models, the
    adapters in their `adapter_dir` (`demo-base:planner`), providers."""
    adapters = {
        f"{m.name}:{folder.name}"
        for m in config.models
        if m.adapter_dir and Path(m.adapter_dir).is_dir()
        for folder in Path(m.adapter_dir).iterdir()
        if (folder / "adapter_config.json").is_file()
    }
    return {m.name for m in config.models} | adapters | provider_targets(config.providers)


def spec_format(path: Path) -> str | None:
    """ "yaml" or "json" by file suffix; None lets the loader decide."""
    return SPEC_SUFFIXES.get(path.suffix.lower())


def spec_files(directory: str | Path) -> list[Path]:
    """The spec files of a directory (not recursive), sorted; none when it does not exist."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SPEC_SUFFIXES)


def load_spec_file(path: Path) -> PipelineSpec:
    """Load one spec file; `SpecErrors` name the file as their source."""
    return load_spec(path.read_bytes(), fmt=spec_format(path), source=str(path))


def split_ref(ref: str) -> tuple[str, str | None]:
    """`name@version` -> (name, version); `name` -> (name, None)."""
    name, _, version = ref.partition("@")
    return name, version or None


def directory_specs(directory: str | Path) -> dict[str, PipelineSpec]:
    """Specs of a directory by pipeline name; files that do not load are logged and left out."""
    specs: dict[str, PipelineSpec] = {}
    for path in spec_files(directory):
        try:
            spec = load_spec_file(path)
        except (SpecErrors, OSError) as e:
            logger.warning("%s: skipped: %s", path, e)
            continue
        specs[spec.name] = spec
    return specs


def require(specs: dict[str, PipelineSpec], ref: str) -> PipelineSpec:
    """The spec a `pipeline` step names among `specs` (a version must match `version:`)."""
    name, version = split_ref(ref)
    spec = specs.get(name)
    if spec is None or (version is not None and version != spec.version):
        raise PipelineNotFoundError(ref)
    return spec
