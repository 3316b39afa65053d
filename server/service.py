"""The pipeline service: register, plan, explain and run stored pipelines.

The controllers stay thin: each calls one method here. Methods that touch the database or
compile a plan are synchronous and run in a worker thread (`asyncio.to_thread`); running is
async and hands off to the `RunManager`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from executor.backends import Backends, OpenAIBackend
from executor.cache import ResultCache
from planner import (
    Catalog,
    PhysicalPlan,
    PlannerError,
    Statistics,
    compile_text,
    explain,
    load_spec,
)
from server.catalog import build_catalog, spec_files, spec_format
from server.config import LimitsConfig
from server.errors import PayloadTooLargeError, PipelineNotFoundError
from server.pipeline_types import ExplainFormat, ExplainResponse
from server.runs import ActiveRun, RunManager, Runtime
from server.runtime import SubPipelines, run_limits, statistics
from server.store import PipelineRecord, RunRecord, Store
from tools import ToolRegistry

logger = logging.getLogger(__name__)

STARTUP_ACTOR = "startup"


class PipelineService:
    """Pipelines and runs over one store, one set of backends and tools, one catalog."""

    def __init__(
        self,
        store: Store,
        *,
        backends: Backends,
        tools: ToolRegistry,
        models: Callable[[str], bool],
        limits: LimitsConfig,
    ) -> None:
        self.store = store
        self.tools = tools
        self.models = models
        self.limits = limits
        self.stats = Statistics.empty()
        caps = run_limits(limits)
        runtime = Runtime(
            backends=backends,
            tools=tools,
            limits=caps,
            max_output_bytes=limits.max_stored_output_bytes,
            cache=ResultCache(),
            pipelines=SubPipelines(self.plan_ref, backends=backends, tools=tools, limits=caps),
        )
        self.backends = backends
        self.runs = RunManager(store, runtime, on_finished=self._analyzed)

    async def close(self) -> None:
        """Close provider connections and the database pool (after `runs.shutdown()`)."""
        for backend in self.backends.backends:
            if isinstance(backend, OpenAIBackend):
                await backend.aclose()
        await asyncio.to_thread(self.store.dispose)

    # -- planning (synchronous: call in a worker thread) -----------------------------------------

    def catalog(self) -> Catalog:
        """What specs may name right now: served models, registered tools, stored pipelines."""
        return build_catalog(
            models=self.models, tools=self.tools.schemas(), pipelines=self._has_pipeline
        )

    def refresh_statistics(self) -> None:
        """Reload the cost model's statistics from the database."""
        self.stats = statistics(self.store.statistics())

    def register(self, text: bytes, fmt: str | None, *, actor: str) -> tuple[PipelineRecord, bool]:
        """Load, bind and store a spec; the flag is True when a new version was created."""
        if len(text) > self.limits.max_spec_bytes:
            raise PayloadTooLargeError("the spec", len(text), self.limits.max_spec_bytes)
        fmt = fmt or _sniff(text)
        plan = compile_text(
            text, catalog=self.catalog(), stats=self.stats, fmt=fmt, source="<request>"
        )
        return self.store.register_pipeline(
            plan.spec, text=text.decode("utf-8-sig"), fmt=fmt, actor=actor
        )

    def plan(self, record: PipelineRecord) -> PhysicalPlan:
        """Compile a stored version against the current catalog and statistics."""
        text = record.spec_text.encode()
        return compile_text(
            text,
            catalog=self.catalog(),
            stats=self.stats,
            fmt=record.spec_format,
            source=f"{record.name}@{record.version}",
        )

    def plan_ref(self, ref: str) -> PhysicalPlan:
        """The plan of `name`, `name@<version>` or `name@<label>` (for `pipeline` steps)."""
        return self.plan(self.store.resolve(ref))

    def explain(self, name: str, version: int | None, fmt: ExplainFormat) -> ExplainResponse:
        """EXPLAIN a stored version: the plan with estimates and the critical path."""
        record = self.store.get_pipeline(name, version)
        return _explained(record, self.plan(record), fmt, analyze=None)

    def explain_run(self, run_id: str, fmt: ExplainFormat) -> ExplainResponse:
        """EXPLAIN ANALYZE a stored run: estimates next to what each step actually did."""
        run = self.store.get_run(run_id)
        record = self.store.get_pipeline(run.pipeline, run.version)
        analyze = {
            s.step: {
                "latency_s": s.duration_s,
                "tokens": s.tokens,
                "attempts": s.attempts,
                "status": s.status,
            }
            for s in run.steps
        }
        return _explained(record, self.plan(record), fmt, analyze=analyze)

    def register_directory(self, directory: str | Path) -> list[PipelineRecord]:
        """Register every spec file of a directory; one that fails is logged and skipped."""
        registered = []
        for path in spec_files(directory):
            try:
                registered.append(self._register_file(path))
            except (PlannerError, OSError) as e:
                logger.error("%s: skipped: %s", path, e)
        return registered

    def _register_file(self, path: Path) -> PipelineRecord:
        text, fmt = path.read_bytes(), spec_format(path) or _sniff(path.read_bytes())
        plan = compile_text(
            text, catalog=self.catalog(), stats=self.stats, fmt=fmt, source=str(path)
        )
        record, created = self.store.register_pipeline(
            plan.spec, text=text.decode("utf-8-sig"), fmt=fmt, actor=STARTUP_ACTOR
        )
        logger.info(
            "pipeline %s@%d %s from %s",
            record.name,
            record.version,
            "registered" if created else "already registered",
            path,
        )
        return record

    def _has_pipeline(self, ref: str) -> bool:
        try:
            self.store.resolve(ref)
        except PipelineNotFoundError:
            return False
        return True

    def _analyzed(self, _plan: PhysicalPlan, _run: RunRecord) -> None:
        self.refresh_statistics()

    # -- running ---------------------------------------------------------------------------------

    async def start_run(
        self,
        name: str,
        version: int | None,
        inputs: dict[str, Any],
        *,
        actor: str,
        subscribe: bool = False,
    ) -> ActiveRun:
        """Plan the stored version and start a run of it (`InputError` before anything starts)."""
        record = await asyncio.to_thread(self.store.get_pipeline, name, version)
        plan = await asyncio.to_thread(self.plan, record)
        return await self.runs.start(record, plan, inputs, actor=actor, subscribe=subscribe)


def _sniff(text: bytes) -> str:
    """JSON when the body starts like a JSON object, else YAML (JSON is YAML too)."""
    return "json" if text.lstrip()[:1] in (b"{", b"[") else "yaml"


def _explained(
    record: PipelineRecord,
    plan: PhysicalPlan,
    fmt: ExplainFormat,
    *,
    analyze: dict[str, Any] | None,
) -> ExplainResponse:
    rendered = explain(plan, fmt, analyze=analyze)
    return ExplainResponse(
        name=record.name,
        version=record.version,
        content_hash=record.content_hash,
        format=fmt,
        plan=json.loads(rendered) if fmt == "json" else rendered,
    )


def spec_document(record: PipelineRecord) -> dict[str, Any]:
    """The stored spec as a JSON object (parsed from its text)."""
    return msgspec.to_builtins(load_spec(record.spec_text, fmt=record.spec_format))
