"""What pipelines run against, built from the server configuration.

Shared by the server and `compound run`: model backends (the in-process engine and the
configured OpenAI-compatible providers), run limits, statistics for the cost model, and the
resolver that runs `pipeline` steps. The catalog lives in `server.catalog`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from engine import Engine
from executor.backends import Backends, EngineBackend, ModelBackend, OpenAIBackend
from executor.run import DEFAULT_PER_RESOURCE, RunLimits, execute
from planner import PhysicalPlan, Statistics
from planner.cost import Aggregate
from server.config import LimitsConfig, ProviderConfig
from server.errors import ServerError
from server.store import StatRecord

logger = logging.getLogger(__name__)

# `pipeline` steps calling pipelines calling pipelines...: a cycle would never end.
MAX_PIPELINE_DEPTH = 8


class SubPipelineError(ServerError):
    """A `pipeline` step's pipeline failed, or nests too deep."""


def build_backends(engine: Engine | None, providers: Iterable[ProviderConfig]) -> Backends:
    """The engine first, then each provider (its API key read from its environment variable)."""
    backends: list[ModelBackend] = [EngineBackend(engine)] if engine is not None else []
    for p in providers:
        key = os.environ.get(p.api_key_env) if p.api_key_env else None
        if p.api_key_env and key is None:
            logger.warning("provider %s: environment variable %s is not set", p.name, p.api_key_env)
        backends.append(OpenAIBackend(p.name, p.base_url, key, dict(p.models)))
    return Backends(backends)


def run_limits(limits: LimitsConfig) -> RunLimits:
    """The server's caps on every run; configured per-resource limits override the defaults."""
    return RunLimits(
        max_concurrency=limits.max_run_concurrency,
        per_resource={**DEFAULT_PER_RESOURCE, **limits.per_resource},
        run_timeout_s=limits.run_timeout_s,
        max_total_tokens=limits.max_run_tokens,
        max_fan_out=limits.max_fan_out,
    )


def statistics(records: Iterable[StatRecord]) -> Statistics:
    """The cost model's statistics from the stored rows (`model:`, `tool:`, `step:` keys)."""
    models: dict[str, Aggregate] = {}
    tools: dict[str, Aggregate] = {}
    steps: dict[tuple[str, str], Aggregate] = {}
    for r in records:
        successes = r.count - r.failures
        if successes <= 0:
            continue  # no latency observed yet: the defaults estimate better than zero
        aggregate = Aggregate(
            latency_s=r.mean_latency_s,
            tokens=r.mean_tokens,
            failure_rate=r.failures / r.count,
            count=r.count,
        )
        kind, _, name = r.key.partition(":")
        if kind == "model":
            models[name] = aggregate
        elif kind == "tool":
            tools[name] = aggregate
        elif kind == "step" and "/" in name:
            pipeline, _, step = name.partition("/")
            steps[(pipeline, step)] = aggregate
    return Statistics(models=models, tools=tools, steps=steps)


@dataclass(frozen=True, kw_only=True)
class SubPipelineCall:
    """What a `pipeline` step's reference resolved to, recorded on the run that made it."""

    caller: str | None  # the pipeline whose step called it (None: the run's own pipeline)
    ref: str  # as the step wrote it: `name` or `name@ref`
    name: str
    version: int | None  # the stored version (None where nothing is stored: `compound run`)
    content_hash: str
    commit: str | None  # the commit its spec was read from, when it came from git

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return dataclasses.asdict(self)


# (ref as written, the commit the caller's spec came from or None) -> its plan, and the record.
Resolve = Callable[[str, str | None], tuple[PhysicalPlan, SubPipelineCall]]


class SubPipelines:
    """Runs the pipelines that `pipeline` steps call: resolve, compile, execute, return outputs.

    `resolve(ref, commit)` gives the plan of `name` or `name@version`, where a plain name in a
    spec read from git commit `commit` means the pipeline of that same commit. `within` makes
    the resolver of one run; it collects what each call resolved to in `calls`. Runs nest at
    most `MAX_PIPELINE_DEPTH` deep, so a pipeline that calls itself fails instead of looping.
    """

    def __init__(
        self,
        resolve: Resolve,
        *,
        backends: Backends,
        tools: Any,
        limits: RunLimits,
        depth: int = 0,
        commit: str | None = None,
        caller: str | None = None,
        calls: list[SubPipelineCall] | None = None,
    ) -> None:
        self.resolve = resolve
        self.backends = backends
        self.tools = tools
        self.limits = limits
        self.depth = depth
        self.commit = commit
        self.caller = caller
        self.calls: list[SubPipelineCall] = calls if calls is not None else []

    @property
    def scope(self) -> str | None:
        """Plain names resolve inside this commit (the result cache keeps commits apart)."""
        return self.commit

    def within(self, commit: str | None) -> SubPipelines:
        """The resolver of one run whose spec was read from `commit` (None: not from git)."""
        return self._nested(depth=0, commit=commit, caller=None, calls=[])

    def _nested(
        self, *, depth: int, commit: str | None, caller: str | None, calls: list[SubPipelineCall]
    ) -> SubPipelines:
        return SubPipelines(
            self.resolve,
            backends=self.backends,
            tools=self.tools,
            limits=self.limits,
            depth=depth,
            commit=commit,
            caller=caller,
            calls=calls,
        )

    async def run(self, name_ref: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run `name_ref` with `inputs`; its failure fails the calling step."""
        if self.depth >= MAX_PIPELINE_DEPTH:
            raise SubPipelineError(f"pipelines nest deeper than {MAX_PIPELINE_DEPTH} levels")
        # Resolving may read the database: not on the event loop.
        plan, call = await asyncio.to_thread(self.resolve, name_ref, self.commit)
        call = dataclasses.replace(call, caller=self.caller)
        if call not in self.calls:  # a map calls it once per item: record it once
            self.calls.append(call)
        # The callee's own plain names resolve inside the commit the callee was read from.
        nested = self._nested(
            depth=self.depth + 1, commit=call.commit, caller=call.name, calls=self.calls
        )
        result = await execute(
            plan,
            inputs,
            backends=self.backends,
            tools=self.tools,
            pipelines=nested,
            limits=self.limits,
        )
        if result.status != "succeeded":
            raise SubPipelineError(f"pipeline {name_ref!r} failed: {result.error}")
        return result.outputs or {}
