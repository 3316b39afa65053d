"""Runs in the background of the server: start, record, stream, wait, cancel at shutdown.

Every run is an asyncio task, whether the client waits for it, streams it or leaves at once;
the task owns the run's recorder and writes the final state even when it fails or is
cancelled. Clients await a run through `asyncio.shield`, so a client that goes away never
cancels a run. Cancelling one cancels only its execution, a second task that the run task
awaits: the run task itself is never interrupted, so it always stores how the run ended, even
when the execution is cancelled before it starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from executor.backends import Backends
from executor.cache import ResultCache
from executor.events import Event
from executor.inputs import validate_inputs
from executor.operators import ToolCaller
from executor.run import RunLimits, RunResult, execute
from planner.physical import PhysicalPlan
from server.db import utcnow
from server.recorder import Recorder, jsonable
from server.runtime import SubPipelines
from server.store import PipelineRecord, Provenance, RunChange, RunRecord, Store

logger = logging.getLogger(__name__)

SHUTDOWN_REASON = "the server shut down before the run finished"
CANCEL_REASON = "cancelled by request"


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """What runs execute with: model backends, tools, sub-pipelines, limits, the result cache."""

    backends: Backends
    tools: ToolCaller
    limits: RunLimits
    max_output_bytes: int
    cache: ResultCache | None = None
    pipelines: SubPipelines | None = None


@dataclass(frozen=True)
class ActiveRun:
    """A started run: its id, the task that ends with the stored run, and (if asked) its events."""

    run_id: str
    task: asyncio.Task[RunRecord]
    events: AsyncIterator[Event] | None

    async def wait(self) -> RunRecord:
        """The stored run once it ended; cancelling the waiter does not cancel the run."""
        return await asyncio.shield(self.task)


class RunManager:
    """Starts runs as tasks and tracks them until they end."""

    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        *,
        on_finished: Callable[[PhysicalPlan, RunRecord], Any] | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.on_finished = on_finished
        self._tasks: dict[str, asyncio.Task[RunRecord]] = {}
        self._executions: dict[str, asyncio.Task[RunResult]] = {}
        self._cancel_reasons: dict[str, str] = {}
        # Names this process in the runs it holds leases on (several replicas share a database).
        self.instance = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    async def start(
        self,
        record: PipelineRecord,
        plan: PhysicalPlan,
        inputs: dict[str, Any],
        *,
        actor: str,
        subscribe: bool = False,
        provenance: Provenance | None = None,
    ) -> ActiveRun:
        """Check the inputs (`InputError` before anything is stored), store a queued run (with
        the ref and commit it came from), and start it; with `subscribe`, the returned run
        carries its live events."""
        # Stored with defaults filled in: the run record says exactly what the run saw.
        values = validate_inputs(plan.spec.inputs, inputs)
        run_id = str(uuid.uuid4())
        await asyncio.to_thread(
            self.store.create_run,
            run_id,
            record,
            values,
            actor=actor,
            provenance=provenance,
            instance=self.instance,
        )
        recorder = Recorder(self.store, run_id, max_output_bytes=self.runtime.max_output_bytes)
        events = recorder.subscribe() if subscribe else None
        # Its `pipeline` steps resolve plain names inside the commit its spec came from.
        commit = provenance.commit if provenance is not None else None
        commit = commit or record.commit
        pipelines = self.runtime.pipelines.within(commit) if self.runtime.pipelines else None
        execution = asyncio.create_task(
            self._execute(plan, inputs, recorder, pipelines), name=f"execute:{run_id}"
        )
        task = asyncio.create_task(
            self._run(plan, execution, recorder, pipelines), name=f"run:{run_id}"
        )
        self._tasks[run_id] = task
        self._executions[run_id] = execution
        task.add_done_callback(lambda _: self._forget(run_id))
        return ActiveRun(run_id, task, events)

    def cancel(self, run_id: str, reason: str = CANCEL_REASON) -> bool:
        """Cancel a run of this process; False when it is not running here.

        The first cancel's reason is the one stored; later ones change nothing (cancelling
        again could interrupt the execution's own clean-up)."""
        execution = self._executions.get(run_id)
        if execution is None:
            return False
        if run_id not in self._cancel_reasons:
            self._cancel_reasons[run_id] = reason
            execution.cancel()
        return True

    def _forget(self, run_id: str) -> None:
        self._tasks.pop(run_id, None)
        self._executions.pop(run_id, None)
        self._cancel_reasons.pop(run_id, None)

    @property
    def active(self) -> list[str]:
        """Ids of the runs still going."""
        return list(self._tasks)

    async def shutdown(self) -> None:
        """Cancel every run still going; each stores itself as cancelled."""
        tasks = list(self._tasks.values())
        for run_id in list(self._tasks):
            self.cancel(run_id, SHUTDOWN_REASON)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def keep_leases(self, lease_s: float) -> None:
        """Until cancelled: renew this process's leases every third of `lease_s`, and fail the
        runs of processes that let theirs expire (crashed replicas). A failed round is logged
        and retried (serving goes on)."""
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                await asyncio.to_thread(self.store.renew_leases, self.instance)
                await asyncio.to_thread(self.sweep, lease_s)
            except Exception:
                logger.exception("renewing run leases failed")

    def sweep(self, lease_s: float) -> list[str]:
        """Fail the unfinished runs whose server died (their lease expired); the ids."""
        failed = self.store.fail_abandoned(lease_s=lease_s, instance=self.instance)
        for run_id in failed:
            logger.warning("run %s failed: its server stopped renewing its lease", run_id)
        return failed

    async def _run(
        self,
        plan: PhysicalPlan,
        execution: asyncio.Task[RunResult],
        recorder: Recorder,
        pipelines: SubPipelines | None,
    ) -> RunRecord:
        """Await the execution and store how the run ended, cancelled ones included."""
        run_id = recorder.run_id
        final = RunChange(values={"status": "failed", "error": "internal error"})
        try:
            final = _final(await execution)
        except asyncio.CancelledError:
            reason = self._cancel_reasons.get(run_id, SHUTDOWN_REASON)
            final = RunChange(values={"status": "cancelled", "error": reason})
            if _cancelling():
                raise  # this task itself is being cancelled, not just its execution
        except Exception as e:
            # A bug in the executor or a backend: the run must still end, with a safe message.
            logger.exception("run %s crashed", run_id)
            final = RunChange(
                values={"status": "failed", "error": f"internal error: {type(e).__name__}"}
            )
        finally:
            if pipelines is not None and pipelines.calls:
                calls = [c.to_json() for c in pipelines.calls]
                final = RunChange(values={**final.values, "sub_pipelines": calls})
            stored = await self._finish(plan, recorder, final)
        return stored

    async def _execute(
        self,
        plan: PhysicalPlan,
        inputs: dict[str, Any],
        recorder: Recorder,
        pipelines: SubPipelines | None,
    ) -> RunResult:
        runtime = self.runtime
        return await execute(
            plan,
            inputs,
            backends=runtime.backends,
            tools=runtime.tools,
            pipelines=pipelines,
            limits=runtime.limits,
            run_id=recorder.run_id,
            emit=recorder.emit,
            cache=runtime.cache,
        )

    async def _finish(self, plan: PhysicalPlan, recorder: Recorder, final: RunChange) -> RunRecord:
        """Flush the events, write the final state, update the statistics."""
        await recorder.close()
        store, run_id = self.store, recorder.run_id
        final = RunChange(values={**final.values, "finished_at": utcnow()})
        await asyncio.to_thread(store.apply, run_id, [final])
        await asyncio.to_thread(store.analyze_run, run_id, step_resources(plan))
        stored = await asyncio.to_thread(store.get_run, run_id)
        if self.on_finished is not None:
            await asyncio.to_thread(self.on_finished, plan, stored)
        return stored


def _cancelling() -> bool:
    """Whether someone is cancelling the current task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _final(result: RunResult) -> RunChange:
    """The run's row as the executor's result says it ended (the events said it first)."""
    values: dict[str, Any] = {
        "status": result.status,
        "error": result.error,
        "failed_step": result.failed_step,
        "total_tokens": result.tokens,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
    }
    if result.outputs is not None:
        values["outputs"] = jsonable(result.outputs)
    return RunChange(values=values)


def step_resources(plan: PhysicalPlan) -> dict[str, str]:
    """Step id -> the resource its task uses (`model:<target>`, `tool:<name>`), for ANALYZE."""
    resources = {}
    for step, task_id in plan.step_task.items():
        resource = plan.task(task_id).resource
        if resource != "local":
            resources[step] = resource
    return resources
