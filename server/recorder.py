"""Executor events to database rows, and to live subscribers (the SSE streams).

The executor never touches the database: it calls `Recorder.emit` with each typed event. The
recorder hands the event to every subscriber at once and queues it for a writer task, which
applies what has accumulated in one transaction at a time, in a worker thread, so that a slow
database never stalls the run. Token deltas go to subscribers only, and so does
`RunCancelled`: only the caller knows why a run was cancelled, and it writes that end itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from executor.events import (
    Event,
    RunFailed,
    RunFinished,
    RunStarted,
    StepFailed,
    StepFinished,
    StepRetried,
    StepSkipped,
    StepStarted,
    TokenDelta,
)
from server.store import Change, RunChange, StepChange, Store

logger = logging.getLogger(__name__)

TRUNCATED = "…[truncated]"


def timestamp(unix_s: float) -> datetime:
    """A unix time as an aware UTC datetime."""
    return datetime.fromtimestamp(unix_s, UTC)


def jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists); what JSON cannot hold becomes
    its repr."""
    return msgspec.json.decode(msgspec.json.encode(value, enc_hook=repr))


def cap_output(value: Any, max_bytes: int) -> tuple[Any, bool]:
    """`value` as JSON data, or a string of its first `max_bytes` bytes of JSON when it is
    larger; the flag says whether it was cut."""
    encoded = msgspec.json.encode(value, enc_hook=repr)
    if len(encoded) <= max_bytes:
        return msgspec.json.decode(encoded), False
    return encoded[:max_bytes].decode(errors="ignore") + TRUNCATED, True


class _EventContext(msgspec.Struct, frozen=True, kw_only=True):
    """What converting an event needs besides the event."""

    now: float
    started: dict[str, float]  # step -> when it began (failures carry no start time)
    max_output_bytes: int


def changes_for(
    event: Event, *, now: float, started: dict[str, float], max_output_bytes: int
) -> list[Change]:
    """The rows one event changes; `started` remembers when each step began (for failures)."""
    convert = _CONVERTERS.get(type(event))
    if convert is None:
        return []  # token deltas and cancellations: streamed, never stored
    at = _EventContext(now=now, started=started, max_output_bytes=max_output_bytes)
    return [convert(event, at)]


def _run_started(_: RunStarted, at: _EventContext) -> Change:
    return RunChange(values={"status": "running", "started_at": timestamp(at.now)})


def _step_started(event: StepStarted, at: _EventContext) -> Change:
    at.started[event.step] = at.now
    values = {"status": "running", "attempts": event.attempt, "started_at": timestamp(at.now)}
    return StepChange(step=event.step, values=values)


def _step_retried(event: StepRetried, _: _EventContext) -> Change:
    values = {"status": "retrying", "attempts": event.attempt, "error": event.error}
    return StepChange(step=event.step, values=values)


def _step_skipped(event: StepSkipped, _: _EventContext) -> Change:
    values = {"status": "skipped", "skip_reason": event.reason[:200]}
    return StepChange(step=event.step, values=values)


def _run_finished(event: RunFinished, at: _EventContext) -> Change:
    values = {
        "status": "succeeded",
        "outputs": jsonable(event.outputs),
        "total_tokens": event.tokens,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "finished_at": timestamp(at.now),
    }
    return RunChange(values=values)


def _run_failed(event: RunFailed, at: _EventContext) -> Change:
    values = {
        "status": "failed",
        "error": event.error,
        "failed_step": event.failed_step,
        "finished_at": timestamp(at.now),
    }
    return RunChange(values=values)


def _step_finished(event: StepFinished, at: _EventContext) -> Change:
    output, truncated = cap_output(event.output, at.max_output_bytes)
    values = {
        "status": "succeeded",
        "attempts": event.attempts,
        "started_at": timestamp(event.started_at),
        "finished_at": timestamp(event.finished_at),
        "duration_s": max(0.0, event.finished_at - event.started_at),
        "tokens": event.tokens,
        "model": event.model,
        "cached": event.cached,
        "error": None,
        "output": output,
        "output_truncated": truncated,
    }
    return StepChange(step=event.step, values=values)


def _step_failed(event: StepFailed, at: _EventContext) -> Change:
    values: dict[str, Any] = {
        "status": "failed",
        "attempts": event.attempts,
        "error": event.error,
        "finished_at": timestamp(at.now),
    }
    started = at.started.get(event.step)
    if started is not None:
        values["duration_s"] = max(0.0, at.now - started)
    return StepChange(step=event.step, values=values)


_CONVERTERS: dict[type, Callable[[Any, _EventContext], Change]] = {
    RunStarted: _run_started,
    StepStarted: _step_started,
    StepRetried: _step_retried,
    StepSkipped: _step_skipped,
    StepFinished: _step_finished,
    StepFailed: _step_failed,
    RunFinished: _run_finished,
    RunFailed: _run_failed,
}


class Recorder:
    """Persists one run's events and streams them to subscribers; `close` flushes."""

    def __init__(self, store: Store, run_id: str, *, max_output_bytes: int) -> None:
        self.store = store
        self.run_id = run_id
        self.max_output_bytes = max_output_bytes
        self._pending: asyncio.Queue[Event | None] = asyncio.Queue()
        self._subscribers: list[asyncio.Queue[Event | None]] = []
        self._started: dict[str, float] = {}
        self._writer = asyncio.create_task(self._write(), name=f"recorder:{run_id}")

    def emit(self, event: Event) -> None:
        """The executor's `emit` callback: never blocks, never raises."""
        for queue in self._subscribers:
            queue.put_nowait(event)
        if not isinstance(event, TokenDelta):
            self._pending.put_nowait(event)

    def subscribe(self) -> AsyncIterator[Event]:
        """The events emitted from now on, until the run ends."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._subscribers.append(queue)
        return _drain(queue)

    async def close(self) -> None:
        """Write everything emitted so far and end the subscriptions."""
        self._pending.put_nowait(None)
        await self._writer
        for queue in self._subscribers:
            queue.put_nowait(None)

    async def _write(self) -> None:
        done = False
        while not done:
            events = [await self._pending.get()]
            while not self._pending.empty():
                events.append(self._pending.get_nowait())
            done = events[-1] is None
            changes = self._changes([e for e in events if e is not None])
            if changes:
                await self._apply(changes)

    def _changes(self, events: list[Event]) -> list[Change]:
        now = time.time()
        return [
            change
            for event in events
            for change in changes_for(
                event, now=now, started=self._started, max_output_bytes=self.max_output_bytes
            )
        ]

    async def _apply(self, changes: list[Change]) -> None:
        # A database hiccup must not fail the run: the final state is written again at the end.
        try:
            await asyncio.to_thread(self.store.apply, self.run_id, changes)
        except Exception:
            logger.exception("run %s: could not store %d changes", self.run_id, len(changes))


async def _drain(queue: asyncio.Queue[Event | None]) -> AsyncIterator[Event]:
    while (event := await queue.get()) is not None:
        yield event
