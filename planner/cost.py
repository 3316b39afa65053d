"""The cost model: estimates per operator from statistics of past runs (a database's ANALYZE).

Statistics hold means per model target, per tool and per (pipeline, step); the server fills
them from recorded runs. With no history the defaults are deliberately simple: a generate call
costs 0.02 s per token up to `max_tokens`, a tool call 0.05 s, local operators (filter, route)
1 ms, a sub-pipeline 1 s, and a map fans out over 4 items unless `map_limit` says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from planner.logical import (
    Batch,
    CallTool,
    Fallback,
    Filter,
    Generate,
    Map,
    Node,
    Plan,
    Route,
    Subpipeline,
)

SECONDS_PER_TOKEN = 0.02
TOOL_SECONDS = 0.05
LOCAL_SECONDS = 0.001
PIPELINE_SECONDS = 1.0
PLAN_TOOL_DEPTH = 2  # tool calls on a plan's longest chain (lookups, then calc)
FAN_OUT = 4
SELECTIVITY = 0.5
# A batch finishes with its slowest call: batch only calls of similar cost.
BATCH_SPREAD = 4.0


@dataclass(frozen=True)
class Aggregate:
    """Means over past runs of one model target, tool or step."""

    latency_s: float
    tokens: float = 0.0
    failure_rate: float = 0.0
    count: int = 0
    selectivity: float | None = None  # filters: mean fraction of items kept


@dataclass(frozen=True)
class Statistics:
    """Aggregates per model target, tool, and (pipeline, step)."""

    models: Mapping[str, Aggregate] = field(default_factory=dict)
    tools: Mapping[str, Aggregate] = field(default_factory=dict)
    steps: Mapping[tuple[str, str], Aggregate] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Statistics:
        """No history: every estimate uses the defaults."""
        return cls()

    def model(self, target: str) -> Aggregate | None:
        """Aggregate for a model target, if it has been observed."""
        return _observed(self.models.get(target))

    def tool(self, name: str) -> Aggregate | None:
        """Aggregate for a tool, if it has been observed."""
        return _observed(self.tools.get(name))

    def step(self, pipeline: str, step_id: str) -> Aggregate | None:
        """Aggregate for one step of one pipeline, if it has been observed."""
        return _observed(self.steps.get((pipeline, step_id)))


def _observed(aggregate: Aggregate | None) -> Aggregate | None:
    return aggregate if aggregate is not None and aggregate.count > 0 else None


@dataclass(frozen=True)
class Estimate:
    """Expected latency, tokens and failure probability of one task."""

    latency_s: float
    tokens: int = 0
    failure_rate: float = 0.0


def estimate(node: Node, *, stats: Statistics, pipeline: str) -> Estimate:
    """Estimate one operator: the step's own history first, else its parts'."""
    if isinstance(node, Batch):
        parts = [estimate(m, stats=stats, pipeline=pipeline) for m in node.members]
        return Estimate(
            latency_s=max(p.latency_s for p in parts),
            tokens=sum(p.tokens for p in parts),
            failure_rate=max(p.failure_rate for p in parts),
        )
    seen = stats.step(pipeline, node.step_ids[0])
    if seen is not None:
        return Estimate(seen.latency_s, round(seen.tokens), seen.failure_rate)
    if isinstance(node, Map):
        return _map(node, estimate(node.body, stats=stats, pipeline=pipeline))
    if isinstance(node, Fallback):
        return _fallback(node, estimate(node.body, stats=stats, pipeline=pipeline))
    return _retried(node.step.retries, _attempt(node, stats))


def _attempt(node: Node, stats: Statistics) -> Estimate:
    """One attempt of a leaf."""
    if isinstance(node, Generate):
        return _generate(node, stats.model(node.target))
    if isinstance(node, CallTool):
        seen = stats.tool(node.tool)
        return Estimate(seen.latency_s, 0, seen.failure_rate) if seen else Estimate(TOOL_SECONDS)
    if isinstance(node, Filter | Route):
        return Estimate(LOCAL_SECONDS)
    if isinstance(node, Subpipeline):
        return Estimate(PIPELINE_SECONDS)
    if isinstance(node, Plan):
        return _plan(node, stats)
    raise TypeError(f"no cost model for {type(node).__name__}")


def _generate(node: Generate, seen: Aggregate | None) -> Estimate:
    max_tokens = node.step.generate.max_tokens
    if seen is None or seen.tokens <= 0:
        return Estimate(SECONDS_PER_TOKEN * max_tokens, max_tokens)
    tokens = min(float(max_tokens), seen.tokens)
    return Estimate(seen.latency_s / seen.tokens * tokens, round(tokens), seen.failure_rate)


def _plan(node: Plan, stats: Statistics) -> Estimate:
    """One round: the planner's and the joiner's budgets, and a few tool calls in a row."""
    spec = node.step.plan
    calls = [(spec.planner, node.planner), (spec.joiner, node.joiner)]
    latency, tokens = PLAN_TOOL_DEPTH * TOOL_SECONDS, 0
    for gen, (_, target) in calls:
        seen = stats.model(target)
        if seen is None or seen.tokens <= 0:
            latency += SECONDS_PER_TOKEN * gen.max_tokens
            tokens += gen.max_tokens
        else:
            expected = min(float(gen.max_tokens), seen.tokens)
            latency += seen.latency_s / seen.tokens * expected
            tokens += round(expected)
    return Estimate(latency, tokens)


def _retried(retries: int, one: Estimate) -> Estimate:
    """Expected cost with retries: attempt k+1 happens with probability failure^k."""
    attempts = sum(one.failure_rate**k for k in range(retries + 1))
    return Estimate(
        one.latency_s * attempts, round(one.tokens * attempts), one.failure_rate ** (retries + 1)
    )


def _fallback(node: Fallback, body: Estimate) -> Estimate:
    """Each alternative runs only when everything before it failed (assumed to cost the same)."""
    reach = sum(body.failure_rate**k for k in range(1, len(node.alternatives) + 1))
    return Estimate(
        body.latency_s * (1 + reach),
        round(body.tokens * (1 + reach)),
        body.failure_rate ** (1 + len(node.alternatives)),
    )


def _map(node: Map, item: Estimate) -> Estimate:
    step = node.step
    items = float(step.map_limit or FAN_OUT)
    waves = math.ceil(items / step.concurrency) if step.concurrency else 1
    return Estimate(
        item.latency_s * waves,
        round(item.tokens * items),
        1 - (1 - item.failure_rate) ** items,
    )


def selectivity(node: Node, *, stats: Statistics, pipeline: str) -> float:
    """Expected fraction of items a filter keeps."""
    seen = stats.step(pipeline, node.step_ids[0])
    if seen is not None and seen.selectivity is not None:
        return min(max(seen.selectivity, 0.0), 1.0)
    return SELECTIVITY


def batch_pays_off(members: list[Estimate]) -> bool:
    """Whether submitting calls together beats running them apart: a batch ends with its
    slowest call, so a short call should not wait for a call many times longer."""
    latencies = [m.latency_s for m in members]
    return len(latencies) > 1 and max(latencies) <= BATCH_SPREAD * max(min(latencies), 1e-9)


__all__ = [
    "Aggregate",
    "Estimate",
    "Statistics",
    "batch_pays_off",
    "estimate",
    "selectivity",
]
