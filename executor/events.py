"""Typed events of a run, in the order the executor emits them.

`RunStarted` comes first and exactly one of `RunFinished` / `RunFailed` / `RunCancelled` last
(a run cancelled before it started has no events at all). Between them,
per step: `StepStarted` (attempt 1), then `StepRetried` before every further attempt (retry or
fallback), `TokenDelta` while a model streams, and one of `StepFinished` / `StepFailed`; or a
lone `StepSkipped`. Events encode as JSON objects tagged by `"type"` (e.g. `"step_finished"`);
`decode_event` reads them back. Timestamps are unix seconds.
"""

from __future__ import annotations

from typing import Any

import msgspec

_EVENT = {"frozen": True, "kw_only": True, "tag_field": "type"}


class RunStarted(msgspec.Struct, tag="run_started", **_EVENT):
    """A run began with these (validated, defaulted) inputs."""

    run_id: str
    pipeline: str
    inputs: dict[str, Any]


class StepStarted(msgspec.Struct, tag="step_started", **_EVENT):
    """A step's first attempt began."""

    run_id: str
    step: str
    attempt: int


class TokenDelta(msgspec.Struct, tag="token_delta", **_EVENT):
    """Text a model streamed for a step."""

    run_id: str
    step: str
    text: str


class StepRetried(msgspec.Struct, tag="step_retried", **_EVENT):
    """Attempt `attempt` begins because the previous one failed with `error`."""

    run_id: str
    step: str
    attempt: int
    error: str


class StepSkipped(msgspec.Struct, tag="step_skipped", **_EVENT):
    """A step did not run (`when` false, or its route branch was not chosen); output None."""

    run_id: str
    step: str
    reason: str


class StepFinished(msgspec.Struct, tag="step_finished", **_EVENT):
    """A step produced its output."""

    run_id: str
    step: str
    output: Any
    started_at: float
    finished_at: float
    attempts: int
    tokens: int
    model: str | None = None
    cached: bool = False


class StepFailed(msgspec.Struct, tag="step_failed", **_EVENT):
    """A step failed for good."""

    run_id: str
    step: str
    error: str
    attempts: int


class RunFinished(msgspec.Struct, tag="run_finished", **_EVENT):
    """The run succeeded with these outputs; `tokens` = prompt + completion tokens of all
    its model calls."""

    run_id: str
    outputs: dict[str, Any]
    duration_s: float
    tokens: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RunFailed(msgspec.Struct, tag="run_failed", **_EVENT):
    """The run failed; `failed_step` names the step when one caused it."""

    run_id: str
    error: str
    failed_step: str | None = None


class RunCancelled(msgspec.Struct, tag="run_cancelled", **_EVENT):
    """The caller cancelled the run; the caller knows why."""

    run_id: str


Event = (
    RunStarted
    | StepStarted
    | TokenDelta
    | StepRetried
    | StepSkipped
    | StepFinished
    | StepFailed
    | RunFinished
    | RunFailed
    | RunCancelled
)

_DECODER = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    """JSON of an event, tagged by `"type"`."""
    return msgspec.json.encode(event)


def decode_event(data: bytes | str) -> Event:
    """An event from its JSON."""
    return _DECODER.decode(data)
