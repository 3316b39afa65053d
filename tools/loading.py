"""Loading the operator's own tools: installed packages' entry points and configured modules.

Only the server operator decides which Python code backs a tool: a package they installed that
declares an entry point in the `compound.tools` group, or a module they list in the server
config (`tools.modules`). A pipeline spec can only name tools that are already registered.

An entry point names a callable taking the registry, e.g. in the tool package's pyproject.toml:

    [project.entry-points."compound.tools"]
    weather = "weather_tools:register"

A configured module must define `register(registry)`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from tools.errors import ToolError, ToolRegistrationError
from tools.registry import ToolRegistry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "compound.tools"
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def load_entry_points(registry: ToolRegistry, *, group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Call every entry point of `group` with the registry, by name order; return their names."""
    loaded = []
    for entry_point in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
        source = f"entry point {entry_point.name!r} ({entry_point.value})"
        try:
            hook = entry_point.load()
        except Exception as e:
            raise ToolRegistrationError(f"{source} cannot be loaded: {e}") from e
        _run_hook(hook, registry, source=source)
        loaded.append(entry_point.name)
    return loaded


def load_modules(registry: ToolRegistry, modules: Iterable[str]) -> None:
    """Import each named module and call its `register(registry)`."""
    for name in modules:
        source = f"tools module {name!r}"
        if not MODULE_NAME.fullmatch(name):
            raise ToolRegistrationError(f"{source}: not a dotted module name")
        try:
            module = importlib.import_module(name)
        except Exception as e:
            raise ToolRegistrationError(f"{source} cannot be imported: {e}") from e
        hook = getattr(module, "register", None)
        if not callable(hook):
            raise ToolRegistrationError(f"{source} has no register(registry) function")
        _run_hook(hook, registry, source=source)


def _run_hook(hook: Callable[[ToolRegistry], Any], registry: ToolRegistry, *, source: str) -> None:
    before = set(registry.names())
    try:
        hook(registry)
    except ToolError:
        raise
    except Exception as e:
        raise ToolRegistrationError(f"{source} failed while registering: {e}") from e
    added = sorted(set(registry.names()) - before)
    logger.info("%s registered %s", source, ", ".join(added) or "no tools")
