"""Step policies around the operators: `when`, route enabling, retries with backoff, per-attempt
timeouts, fallbacks and budgets.

A unit of work (the step, or one `map` item) gets `1 + retries` attempts with exponential
backoff and jitter between them, then each `fallback` once, in order. Errors that another
attempt cannot fix (a budget, a broken expression, a fan-out over the limit) end it at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import Any, TypeVar

from executor.context import RunContext
from executor.errors import BudgetExceeded, FanOutExceeded, OperatorError, StepTimeout
from executor.operators import CallOp, Env, StepRun
from planner.expressions import ExpressionError, evaluate
from planner.load import parse_duration
from planner.physical import Task

T = TypeVar("T")

# Deterministic failures: a retry or a fallback would fail the same way.
FINAL_ERRORS = (BudgetExceeded, FanOutExceeded, OperatorError, ExpressionError)


def seconds(value: str | float | None) -> float | None:
    """Seconds of an optional spec duration ("250ms", "10s", "2m", or a number)."""
    return None if value is None else parse_duration(value)


def skip_reason(ctx: RunContext, task: Task) -> str | None:
    """Why the task's step must not run (route branch not chosen, `when` false), or None."""
    if task.enabled_by is not None:
        route, label = task.enabled_by
        chosen = ctx.route_choices.get(route)
        if chosen != label:
            return f"route {route!r} chose branch {chosen!r}, not {label!r}"
    when = task.step.when
    if when is not None and not evaluate(when, ctx.scope()):
        return f"`when` is false: {when}"
    return None


def backoff_s(attempt: int, *, base_s: float, max_s: float) -> float:
    """Delay before retry `attempt + 1`: exponential in `attempt`, capped, with jitter."""
    return min(max_s, base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


async def attempt(
    ctx: RunContext, env: Env, run: StepRun, op: CallOp, scope: dict[str, Any]
) -> Any:
    """Run one unit of a step under its retries, timeout and fallbacks; the last error wins."""
    step = run.step
    variants = [None] * (step.retries + 1) + list(step.fallback)
    timeout_s = seconds(step.timeout)
    for number, variant in enumerate(variants[:-1], 1):
        run.tally.attempts = max(run.tally.attempts, number)
        try:
            return await within(op(ctx, env, run, scope, variant), timeout_s, run.name)
        except FINAL_ERRORS:
            raise
        except Exception as e:
            ctx.retried(run.step_ids, number + 1, e)
        if variants[number] is None:  # a retry waits; a fallback goes to another resource now
            await asyncio.sleep(backoff_s(number, base_s=env.retry_base_s, max_s=env.retry_max_s))
    run.tally.attempts = max(run.tally.attempts, len(variants))
    return await within(op(ctx, env, run, scope, variants[-1]), timeout_s, run.name)


async def within(work: Awaitable[T], timeout_s: float | None, step: str) -> T:
    """Await `work`, turning the expiry of `timeout_s` into `StepTimeout`."""
    if timeout_s is None:
        return await work
    timer = asyncio.timeout(timeout_s)
    try:
        async with timer:
            return await work
    except TimeoutError as e:
        if timer.expired():
            raise StepTimeout(step, timeout_s) from e
        raise


async def within_budget(run: StepRun, work: Awaitable[T]) -> T:
    """Await a whole step (all attempts and items) under its `budget.max_seconds`."""
    limit = run.step.budget.max_seconds if run.step.budget else None
    if limit is None:
        return await work
    timer = asyncio.timeout(limit)
    try:
        async with timer:
            return await work
    except TimeoutError as e:
        if timer.expired():
            raise BudgetExceeded(
                f"step {run.name!r} ran longer than its budget of {limit:g}s"
            ) from e
        raise
