"""The state of one run: inputs, step outputs and statuses, token accounting, events.

Expressions see `ctx.scope()`: `{"inputs": ..., "steps": {id: {"output", "status"}}}`, the
shape `planner.expressions` documents. Everything a step records goes through here, so that
the events and the `StepResult`s never disagree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from executor import events
from executor.errors import BudgetExceeded

if TYPE_CHECKING:
    from executor.backends import ModelResult

log = logging.getLogger(__name__)

# Step statuses, as expressions see them in `steps.<id>.status`.
PENDING, RUNNING, SUCCEEDED, SKIPPED, FAILED, CANCELLED = (
    "pending",
    "running",
    "succeeded",
    "skipped",
    "failed",
    "cancelled",
)


@dataclass
class StepResult:
    """What became of one spec step in a run."""

    step: str
    status: str = PENDING
    output: Any = None
    attempts: int = 0
    tokens: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    model: str | None = None
    cached: bool = False
    skip_reason: str | None = None


@dataclass
class StepTally:
    """What the calls of one step add up to while it runs (all map items and attempts)."""

    tokens: int = 0
    attempts: int = 0
    calls: int = 0
    cached_calls: int = 0
    model: str | None = None

    @property
    def cached(self) -> bool:
        """True when every call the step made was answered from the cache."""
        return self.calls > 0 and self.cached_calls == self.calls


class RunContext:
    """Inputs, per-step results, the token budget and the event sink of one run."""

    def __init__(
        self,
        *,
        run_id: str,
        inputs: dict[str, Any],
        step_ids: Iterable[str],
        max_total_tokens: int | None = None,
        emit: Callable[[events.Event], None] | None = None,
        keep_step_outputs: bool = True,
    ) -> None:
        self.run_id = run_id
        self.inputs = inputs
        self.max_total_tokens = max_total_tokens
        self.keep_step_outputs = keep_step_outputs
        self.tokens = 0  # every model call's prompt and completion tokens
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.results = {sid: StepResult(sid) for sid in step_ids}
        self.route_choices: dict[str, str | None] = {}
        self._steps: dict[str, dict[str, Any]] = {}
        self._emit = emit

    # -- expressions ---------------------------------------------------------------------------

    def scope(self, **extra: Any) -> dict[str, Any]:
        """The expression context; `extra` adds `item` / `index` inside a map or filter."""
        return {"inputs": self.inputs, "steps": self._steps, **extra}

    def release(self, step_id: str) -> None:
        """Forget a step's output once no pending step or run output reads it."""
        view = self._steps.get(step_id)
        if view is not None:
            view["output"] = None

    # -- events --------------------------------------------------------------------------------

    def emit(self, event: events.Event) -> None:
        """Hand an event to the sink; a failing sink is logged, never fails the run."""
        if self._emit is None:
            return
        try:
            self._emit(event)
        except Exception:
            log.exception("event sink failed on %s", type(event).__name__)

    def delta(self, step_ids: Iterable[str], text: str) -> None:
        """Streamed model text of a step."""
        for sid in step_ids:
            self.emit(events.TokenDelta(run_id=self.run_id, step=sid, text=text))

    def retried(self, step_ids: Iterable[str], attempt: int, error: BaseException) -> None:
        """Attempt `attempt` begins after `error`."""
        for sid in step_ids:
            self.emit(
                events.StepRetried(run_id=self.run_id, step=sid, attempt=attempt, error=str(error))
            )

    # -- step lifecycle ------------------------------------------------------------------------

    def start(self, step_ids: Iterable[str]) -> float:
        """Mark steps running; returns the start time."""
        now = time.time()
        for sid in step_ids:
            result = self.results[sid]
            result.status, result.started_at = RUNNING, now
            self.emit(events.StepStarted(run_id=self.run_id, step=sid, attempt=1))
        return now

    def skip(self, step_ids: Iterable[str], reason: str) -> None:
        """Record skipped steps: output None."""
        for sid in step_ids:
            result = self.results[sid]
            result.status, result.skip_reason = SKIPPED, reason
            self._steps[sid] = {"output": None, "status": SKIPPED}
            self.emit(events.StepSkipped(run_id=self.run_id, step=sid, reason=reason))

    def finish(self, step_ids: Iterable[str], output: Any, tally: StepTally) -> None:
        """Record the output of steps that succeeded."""
        now = time.time()
        for sid in step_ids:
            result = self.results[sid]
            result.status, result.finished_at = SUCCEEDED, now
            result.attempts, result.tokens = tally.attempts, tally.tokens
            result.model, result.cached = tally.model, tally.cached
            result.output = output if self.keep_step_outputs else None
            self._steps[sid] = {"output": output, "status": SUCCEEDED}
            self.emit(
                events.StepFinished(
                    run_id=self.run_id,
                    step=sid,
                    output=output,
                    started_at=result.started_at or now,
                    finished_at=now,
                    attempts=tally.attempts,
                    tokens=tally.tokens,
                    model=tally.model,
                    cached=tally.cached,
                )
            )

    def fail(self, step_ids: Iterable[str], error: BaseException, tally: StepTally) -> None:
        """Record steps that failed for good."""
        now = time.time()
        for sid in step_ids:
            result = self.results[sid]
            result.status, result.finished_at, result.error = FAILED, now, str(error)
            result.attempts, result.tokens, result.model = tally.attempts, tally.tokens, tally.model
            self._steps[sid] = {"output": None, "status": FAILED}
            self.emit(
                events.StepFailed(
                    run_id=self.run_id, step=sid, error=str(error), attempts=tally.attempts
                )
            )

    def cancel_unfinished(self) -> None:
        """Mark steps that were running or never started as cancelled (the run ended early)."""
        for result in self.results.values():
            if result.status in (PENDING, RUNNING):
                result.status = CANCELLED

    # -- tokens --------------------------------------------------------------------------------

    def charge(
        self, tally: StepTally, used: ModelResult, *, step: str, step_limit: int | None
    ) -> None:
        """Count a call's tokens against the step's budget and the run's `max_total_tokens`."""
        tokens = used.prompt_tokens + used.completion_tokens
        tally.tokens += tokens
        self.tokens += tokens
        self.prompt_tokens += used.prompt_tokens
        self.completion_tokens += used.completion_tokens
        if step_limit is not None and tally.tokens > step_limit:
            raise BudgetExceeded(
                f"step {step!r} used {tally.tokens} tokens, over its budget of {step_limit}"
            )
        if self.max_total_tokens is not None and self.tokens > self.max_total_tokens:
            raise BudgetExceeded(
                f"the run used {self.tokens} tokens, over max_total_tokens {self.max_total_tokens}"
            )
