"""`GET /metrics`: engine figures in the Prometheus text format."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.datastructures import State

from engine import Engine

SPECULATIVE = (
    ("rounds", "counter", "Speculative verification rounds"),
    ("draft_tokens", "counter", "Draft tokens verified by the target model"),
    ("accepted_tokens", "counter", "Draft tokens the target model accepted"),
)


def render_metrics(engine: Engine | None) -> str:
    """Per-model speculative-decoding counters and acceptance rate."""
    if engine is None:
        return ""
    stats = {name: engine.speculative_stats(name) for name in engine.model_names()}
    lines = []
    for key, kind, help_text in SPECULATIVE:
        metric = f"compound_speculative_{key}_total"
        lines += [f"# HELP {metric} {help_text}.", f"# TYPE {metric} {kind}"]
        lines += [f'{metric}{{model="{name}"}} {s[key]}' for name, s in stats.items()]
    metric = "compound_speculative_acceptance_rate"
    lines += [f"# HELP {metric} Accepted over verified draft tokens.", f"# TYPE {metric} gauge"]
    for name, s in stats.items():
        if s["draft_tokens"]:
            lines.append(
                f'{metric}{{model="{name}"}} {s["accepted_tokens"] / s["draft_tokens"]:.6f}'
            )
    return "\n".join(lines) + "\n"


class MetricsController(Controller):
    """Prometheus scrape endpoint."""

    tags = ("metrics",)

    @get("/metrics", media_type="text/plain; version=0.0.4")
    async def metrics(self, state: State) -> Response[str]:
        """Counters of the in-process engine."""
        return Response(render_metrics(state.get("engine")))
