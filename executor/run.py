"""`execute`: run a physical plan as an async ready-queue over its DAG.

Dependency counting finds the tasks whose inputs are all done; they wait in a ready-queue
ordered by priority (the planner's estimated longest path to the end: critical path first),
and at most `max_concurrency` of them run at once. Inside a task, each model or tool call also
holds a slot of its resource (`per_resource`), handed out by the same priority. When a task
finishes, its dependents join the queue before its slot is handed on, and outputs that no
pending task or run output reads are dropped. A step that fails for good cancels everything
still running and fails the run with `StepFailed(step) from` its cause.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from executor import events
from executor.backends import Backends
from executor.cache import ResultCache
from executor.context import RunContext, StepResult
from executor.errors import ExecutorError, OperatorError, RunTimeout, StepFailed
from executor.inputs import validate_inputs
from executor.operators import (
    CALL_OPS,
    LOCAL_OPS,
    Env,
    PipelineResolver,
    StepRun,
    ToolCaller,
    fan_out,
    run_batch,
)
from executor.planning import run_plan
from executor.policies import attempt, seconds, skip_reason, within_budget
from executor.slots import Slots
from planner.expressions import ExpressionError, references, render_value
from planner.physical import PhysicalPlan, Task
from planner.spec import Limits

log = logging.getLogger(__name__)

DEFAULT_PER_RESOURCE = {"model:*": 16, "tool:*": 32}
# Call operators by physical op; `plan` lives in its own module (it builds on the others).
OPS = {**CALL_OPS, "plan": run_plan}


@dataclass(frozen=True, kw_only=True)
class RunLimits:
    """The server's limits on a run; each caps the spec's own (`limits:`) where both are set.

    `per_resource` maps a resource (`model:demo-base`, `tool:kb.search`) or a class default
    (`model:*`, `tool:*`) to how many calls may be in flight at once.
    """

    max_concurrency: int | None = None
    per_resource: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PER_RESOURCE))
    run_timeout_s: float | None = None
    max_total_tokens: int | None = None
    max_fan_out: int | None = None
    retry_base_s: float = 0.2  # first retry waits 0.5-1x this, doubling per attempt
    retry_max_s: float = 10.0

    def capped(self, spec: Limits) -> RunLimits:
        """The limits a run of a spec gets: the spec's, capped by these."""
        return replace(
            self,
            max_concurrency=_smaller(spec.max_concurrency, self.max_concurrency),
            run_timeout_s=_smaller(seconds(spec.run_timeout), self.run_timeout_s),
            max_total_tokens=_smaller(spec.max_total_tokens, self.max_total_tokens),
            max_fan_out=_smaller(spec.max_fan_out, self.max_fan_out),
        )


@dataclass
class RunResult:
    """How a run ended. `status` is "succeeded" or "failed"; `error` says why it failed."""

    run_id: str
    status: str
    outputs: dict[str, Any] | None
    error: str | None
    steps: dict[str, StepResult]
    failed_step: str | None = None
    duration_s: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    exception: BaseException | None = field(default=None, repr=False)


async def execute(
    plan: PhysicalPlan,
    inputs: dict[str, Any],
    *,
    backends: Backends,
    tools: ToolCaller,
    pipelines: PipelineResolver | None = None,
    limits: RunLimits | None = None,
    run_id: str | None = None,
    emit: Callable[[events.Event], None] | None = None,
    cache: ResultCache | None = None,
    keep_step_outputs: bool = True,
) -> RunResult:
    """Run the plan with `inputs`; step failures end up in the result and the events.

    Raises `InputError` (before `RunStarted`) when the inputs do not match the spec, and
    `CancelledError` when the caller cancels (after emitting `RunCancelled`).
    """
    spec = plan.spec
    limits = (limits or RunLimits()).capped(spec.limits)
    values = validate_inputs(spec.inputs, inputs)
    ctx = RunContext(
        run_id=run_id or f"run-{uuid.uuid4().hex}",
        inputs=values,
        step_ids=plan.step_task,
        max_total_tokens=limits.max_total_tokens,
        emit=emit,
        keep_step_outputs=keep_step_outputs,
    )
    env = _env(plan, limits, backends=backends, tools=tools, pipelines=pipelines, cache=cache)
    ctx.emit(events.RunStarted(run_id=ctx.run_id, pipeline=spec.name, inputs=values))
    started = time.monotonic()
    try:
        outputs = await _run(plan, ctx, env, limits.run_timeout_s)
    except asyncio.CancelledError:
        ctx.cancel_unfinished()
        ctx.emit(events.RunCancelled(run_id=ctx.run_id))
        raise
    except Exception as e:
        return _failed(ctx, e, time.monotonic() - started)
    duration = time.monotonic() - started
    ctx.emit(
        events.RunFinished(
            run_id=ctx.run_id,
            outputs=outputs,
            duration_s=duration,
            tokens=ctx.tokens,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
        )
    )
    return RunResult(
        run_id=ctx.run_id,
        status="succeeded",
        outputs=outputs,
        error=None,
        steps=ctx.results,
        duration_s=duration,
        tokens=ctx.tokens,
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
    )


def _env(
    plan: PhysicalPlan,
    limits: RunLimits,
    *,
    backends: Backends,
    tools: ToolCaller,
    pipelines: PipelineResolver | None,
    cache: ResultCache | None,
) -> Env:
    max_concurrency = limits.max_concurrency or Limits().max_concurrency
    return Env(
        backends=backends,
        tools=tools,
        pipelines=pipelines,
        models=plan.models,
        slots=Slots(limits.per_resource),
        cache=cache,
        max_fan_out=limits.max_fan_out or Limits().max_fan_out,
        max_concurrency=max_concurrency,
        retry_base_s=limits.retry_base_s,
        retry_max_s=limits.retry_max_s,
        declared_tools=tuple(plan.spec.tools),
    )


async def _run(
    plan: PhysicalPlan, ctx: RunContext, env: Env, timeout_s: float | None
) -> dict[str, Any]:
    timer = asyncio.timeout(timeout_s)
    try:
        async with timer:
            await Scheduler(plan, ctx, env).run()
    except TimeoutError as e:
        if timer.expired():
            raise RunTimeout(timeout_s or 0.0) from e
        raise
    return _outputs(plan.spec.outputs, ctx)


def _outputs(templates: Mapping[str, str], ctx: RunContext) -> dict[str, Any]:
    scope = ctx.scope()
    outputs = {}
    for name, template in templates.items():
        try:
            outputs[name] = render_value(template, scope)
        except ExpressionError as e:
            raise OperatorError(f"output {name!r}: {e}") from e
    return outputs


def _failed(ctx: RunContext, error: Exception, duration: float) -> RunResult:
    ctx.cancel_unfinished()
    failed_step = error.step if isinstance(error, StepFailed) else None
    if isinstance(error, ExecutorError):
        message = str(error)
        log.info("run %s failed: %s", ctx.run_id, message)
    else:  # a bug in the executor, not a problem of the pipeline
        message = f"internal error: {type(error).__name__}: {error}"
        log.error("run %s failed", ctx.run_id, exc_info=error)
    ctx.emit(events.RunFailed(run_id=ctx.run_id, error=message, failed_step=failed_step))
    return RunResult(
        run_id=ctx.run_id,
        status="failed",
        outputs=None,
        error=message,
        steps=ctx.results,
        failed_step=failed_step,
        duration_s=duration,
        tokens=ctx.tokens,
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        exception=error,
    )


def _smaller(a: float | None, b: float | None) -> Any:
    return b if a is None else a if b is None else min(a, b)


# -- the ready-queue ---------------------------------------------------------------------------


class Scheduler:
    """Dependency counting over the plan's DAG, and a ready-queue ordered by priority.

    At most `max_concurrency` tasks run at once. A task's completion is handled in its done
    callback, without a round trip through a scheduler coroutine: its dependents join the
    ready-queue, then free slots go to the most urgent ready tasks. When slots are scarce the
    choice waits until every task that finished in the same loop iteration has been counted,
    so a newly ready task on the critical path wins over a long-waiting one off it.
    """

    def __init__(self, plan: PhysicalPlan, ctx: RunContext, env: Env) -> None:
        self.ctx, self.env = ctx, env
        self.tasks = {tid: plan.task(tid) for tid in plan.graph.nodes}
        self.deps = {tid: _deps(task) for tid, task in self.tasks.items()}
        self.waiting = {tid: set(deps) for tid, deps in self.deps.items()}
        self.dependents: dict[str, list[str]] = {tid: [] for tid in self.tasks}
        for tid, deps in self.deps.items():
            for dep in deps:
                self.dependents.setdefault(dep, []).append(tid)
        self.readers = {tid: len(users) for tid, users in self.dependents.items()}
        self.priority = {tid: plan.priority(tid) for tid in self.tasks}
        self.kept = _read_by_outputs(plan.spec.outputs)
        self.ready: list[tuple[float, int, str]] = []  # heap of (-priority, order, task id)
        self.order = itertools.count()
        self.free = env.max_concurrency
        self.running: dict[str, asyncio.Task[None]] = {}
        self.done: set[str] = set()
        self.dispatch_pending = False
        self.outcome: asyncio.Future[None] | None = None

    async def run(self) -> None:
        """Run every task; the first step failure cancels the rest and is raised."""
        self.outcome = asyncio.get_running_loop().create_future()
        self._enqueue(tid for tid, deps in self.waiting.items() if not deps)
        self._dispatch()
        self._check_finished()
        try:
            await self.outcome
        finally:
            await self._cancel_running()
        stuck = sorted(set(self.tasks) - self.done)
        if stuck:
            raise ExecutorError(f"tasks whose dependencies never finished: {', '.join(stuck)}")

    def _enqueue(self, ready: Iterable[str]) -> None:
        for tid in ready:
            heapq.heappush(self.ready, (-self.priority[tid], next(self.order), tid))

    def _dispatch(self) -> None:
        self.dispatch_pending = False
        if self.outcome is None or self.outcome.done():
            return  # the run is over (failed, timed out, cancelled): start nothing more
        while self.free > 0 and self.ready:
            _, _, tid = heapq.heappop(self.ready)
            self.free -= 1
            task = asyncio.create_task(self._run_task(self.tasks[tid]), name=f"task:{tid}")
            task.add_done_callback(partial(self._on_done, tid))
            self.running[tid] = task
        self._check_finished()

    def _on_done(self, tid: str, task: asyncio.Task[None]) -> None:
        if self.outcome is None or self.outcome.done():
            return  # the run is over; this is a task it cancelled
        try:
            self._complete(tid, task)
        except Exception as e:
            self.outcome.set_exception(e)
            return
        if len(self.ready) <= self.free:
            self._dispatch()  # everything ready can start: there is no choice to make
        elif not self.dispatch_pending:
            self.dispatch_pending = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _check_finished(self) -> None:
        if not self.running and not self.ready and self.outcome and not self.outcome.done():
            self.outcome.set_result(None)

    def _complete(self, tid: str, task: asyncio.Task[None]) -> None:
        del self.running[tid]
        self.free += 1
        if task.cancelled():
            raise ExecutorError(f"task {tid!r} was cancelled")
        task.result()  # a failed step raises StepFailed here and ends the run
        self.done.add(tid)
        for user in self.dependents[tid]:
            waiting = self.waiting[user]
            waiting.discard(tid)
            if not waiting:
                self._enqueue([user])
        for dep in self.deps[tid]:
            self.readers[dep] -= 1
            if self.readers[dep] == 0:
                self._forget(dep)
        if self.readers[tid] == 0:
            self._forget(tid)

    def _forget(self, tid: str) -> None:
        """Drop the outputs of a task that no pending task or run output reads."""
        for sid in self.tasks[tid].step_ids:
            if sid not in self.kept:
                self.ctx.release(sid)

    async def _cancel_running(self) -> None:
        for task in self.running.values():
            task.cancel()
        if self.running:
            await asyncio.gather(*self.running.values(), return_exceptions=True)
        self.running.clear()

    async def _run_task(self, task: Task) -> None:
        priority = self.priority[task.id]
        if task.op == "batch":
            await run_batch(task.members, partial(run_step, self.ctx, self.env, priority=priority))
        else:
            await run_step(self.ctx, self.env, task, priority=priority)


def _deps(task: Task) -> frozenset[str]:
    # A step in a route branch waits for the route's decision even if the plan omits the edge.
    if task.enabled_by is None:
        return frozenset(task.deps)
    return frozenset(task.deps) | {task.enabled_by[0]}


def _read_by_outputs(outputs: Mapping[str, str]) -> set[str]:
    read: set[str] = set()
    for template in outputs.values():
        read |= references(template)
    return read


# -- one task ----------------------------------------------------------------------------------


async def run_step(ctx: RunContext, env: Env, task: Task, *, priority: float) -> None:
    """Run one step task under its policies; record and emit what became of it."""
    run = StepRun(
        task_id=task.id, step_ids=task.step_ids, step=task.step, op=task.op, priority=priority
    )
    try:
        reason = skip_reason(ctx, task)
        if reason is not None:
            ctx.skip(task.step_ids, reason)
            return
        ctx.start(task.step_ids)
        output = await within_budget(run, _perform(ctx, env, run))
    except Exception as e:
        ctx.fail(task.step_ids, e, run.tally)
        raise StepFailed(run.name, f"step {run.name!r} failed: {e}") from e
    if task.op == "route":
        ctx.route_choices[task.id] = output
    ctx.finish(task.step_ids, output, run.tally)


async def _perform(ctx: RunContext, env: Env, run: StepRun) -> Any:
    if run.op in LOCAL_OPS:
        run.tally.attempts = 1
        return await LOCAL_OPS[run.op](ctx, run)
    unit = partial(attempt, ctx, env, run, OPS[run.op])
    if run.step.map is None:
        return await unit(ctx.scope())
    return await fan_out(ctx, env, run, unit)
