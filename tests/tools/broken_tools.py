"""A tool module whose register() fails, to check that loading reports the module."""

from __future__ import annotations

from tools.registry import ToolRegistry


def register(registry: ToolRegistry) -> None:
    """Fail while registering."""
    raise LookupError("no such thing")
