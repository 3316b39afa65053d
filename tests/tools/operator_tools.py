"""An operator's tool module, as a server config would name it in `tools.modules`."""

from __future__ import annotations

from tools.registry import ToolRegistry


def shout(text: str, times: int = 1) -> str:
    """Upper-case a text.

    Args:
        text: what to shout.
        times: how many times to repeat it.
    """
    return " ".join([text.upper()] * times)


def register(registry: ToolRegistry) -> None:
    """Register this module's tools."""
    registry.register("operator.shout", shout)
