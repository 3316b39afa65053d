"""Tools: typed functions with JSON-schema signatures that pipeline steps call by name.

`default_registry(config)` gives the server's registry: the built-ins `calc`, `kb.lookup`,
`kb.search`, `kb.describe` and `http.get`, then the operator's tools from installed entry points
and from the modules the config lists.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from tools.calc import calc
from tools.errors import (
    ToolArgumentError,
    ToolError,
    ToolNotFound,
    ToolRegistrationError,
    ToolTimeout,
    UnknownEntity,
    UnknownField,
    WorldError,
)
from tools.http import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, register_http_tools
from tools.kb import DEFAULT_SEED, KnowledgeBase, register_kb_tools
from tools.loading import ENTRY_POINT_GROUP, load_entry_points, load_modules
from tools.registry import DEFAULT_TIMEOUT_S as DEFAULT_CALL_TIMEOUT_S
from tools.registry import Tool, ToolRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "Tool",
    "ToolArgumentError",
    "ToolError",
    "ToolNotFound",
    "ToolRegistrationError",
    "ToolRegistry",
    "ToolTimeout",
    "ToolsConfig",
    "UnknownEntity",
    "UnknownField",
    "WorldError",
    "calc",
    "default_registry",
    "load_entry_points",
    "load_modules",
]

PositiveSeconds = Annotated[float, Meta(gt=0)]


class ToolsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The `tools:` section of the server config."""

    http_allow_hosts: tuple[str, ...] = ()  # empty: http.get refuses every URL
    http_timeout_s: PositiveSeconds = DEFAULT_TIMEOUT_S
    http_max_bytes: Annotated[int, Meta(gt=0)] = DEFAULT_MAX_BYTES
    modules: tuple[str, ...] = ()  # modules with register(registry), imported at start-up
    entry_points: bool = True  # load installed packages' "compound.tools" entry points
    kb_path: str | None = None  # None: a cache file per seed (tools.kb.default_path)
    kb_seed: int = DEFAULT_SEED
    call_timeout_s: PositiveSeconds | None = DEFAULT_CALL_TIMEOUT_S  # per call, unless overridden


def default_registry(config: ToolsConfig | None = None) -> ToolRegistry:
    """The built-in tools plus the operator's, as `config` says (defaults when None)."""
    config = config or ToolsConfig()
    registry = ToolRegistry(default_timeout_s=config.call_timeout_s)
    registry.register("calc", calc)
    # The knowledge base is built on its first query, not here: start-up stays fast.
    register_kb_tools(registry, KnowledgeBase(config.kb_path, seed=config.kb_seed))
    register_http_tools(
        registry,
        allow_hosts=config.http_allow_hosts,
        timeout_s=config.http_timeout_s,
        max_bytes=config.http_max_bytes,
    )
    if config.entry_points:
        load_entry_points(registry)
    load_modules(registry, config.modules)
    return registry
