"""Pipelines as chat models: `POST /v1/chat/completions` with `"model": "<pipeline>"`.

A pipeline whose spec has a `chat` section is a chat endpoint: the conversation goes into its
`chat.input` (a list of `{role, content}`), and its `chat.output` is the assistant's answer.
The run is an ordinary stored run: its id comes back in the `x-compound-run-id` header and in
the body's `compound.run_id` extension, and `GET /v1/runs/{id}` shows every step, including
the dynamic tasks of a `plan` step. With `stream: true` the answer streams as standard
`chat.completion.chunk` events: the text of the step that writes the answer (one whose
output `chat.output` renders unchanged: a `plan` step's joiner, a plain `generate`) streams
token by token as the model writes it, then the rest of the answer (all of it when no such
step streamed, e.g. a cached or computed answer), then the finish chunk. A request with
`"compound": {"events": true}` also gets the run's step events, as `event: compound.<type>`
SSE, each before the chunk it caused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from engine.errors import InvalidRequestError
from executor import events
from executor.events import Event, encode_event
from planner.expressions import passed_through
from planner.physical import PhysicalPlan
from planner.plan_format import result_text
from planner.spec import PipelineSpec, Step
from server.errors import RunFailedError, error_response
from server.openai_serving import DONE_EVENT, template_message
from server.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    Usage,
)
from server.runs import ActiveRun
from server.service import PipelineService
from server.store import Resolved

log = logging.getLogger(__name__)

RUN_HEADER = "x-compound-run-id"


class ChatRun(msgspec.Struct, frozen=True, kw_only=True):
    """One chat completion answered by a pipeline run."""

    id: str
    created: int
    model: str
    output: str  # the `chat.output` name
    active: ActiveRun
    include_usage: bool
    events: bool
    answer_steps: frozenset[str] = frozenset()  # steps whose streamed text is the answer

    @property
    def run_id(self) -> str:
        """The stored run's id."""
        return self.active.run_id

    def extension(self) -> dict[str, Any]:
        """The `compound` field of responses: where to find the run."""
        return {"run_id": self.run_id}


async def start_chat_run(
    service: PipelineService,
    endpoint: tuple[Resolved, PhysicalPlan],
    req: ChatCompletionRequest,
    *,
    actor: str,
) -> ChatRun:
    """Check what a pipeline can answer, and start its run on the conversation."""
    _check_fields(req)
    resolved, plan = endpoint
    chat = plan.spec.chat
    conversation = [_message(m) for m in req.messages]
    want_events = req.compound is not None and req.compound.events
    active = await service.start_resolved(
        resolved, {chat.input: conversation}, actor=actor, subscribe=req.stream, plan=plan
    )
    return ChatRun(
        id=f"chatcmpl-{active.run_id}",
        created=int(time.time()),
        model=req.model,
        output=chat.output,
        active=active,
        include_usage=req.stream_options is not None and req.stream_options.include_usage,
        events=want_events,
        answer_steps=answer_steps(plan.spec),
    )


def answer_steps(spec: PipelineSpec) -> frozenset[str]:
    """The steps whose model text becomes the chat answer as it is: those whose output the
    `chat.output` template renders unchanged (possibly choosing among them) and that produce
    plain text (a `plan` step's joiner, or a `generate` without an output constraint or a
    fan-out). At most one of them streams in a run: the first that writes."""
    if spec.chat is None or spec.chat.output not in spec.outputs:
        return frozenset()
    read = passed_through(spec.outputs[spec.chat.output])
    return frozenset(sid for sid in read if sid in spec.steps and _writes_text(spec.steps[sid]))


def _writes_text(step: Step) -> bool:
    if step.plan is not None:
        return True
    plain = step.output is None and step.output_schema is None and step.map is None
    return step.generate is not None and plain


def _check_fields(req: ChatCompletionRequest) -> None:
    """The pipeline decides sampling; reject what a pipeline answer cannot honour."""
    unsupported = {
        "n": req.n != 1,
        "tools": bool(req.tools),
        "logprobs": req.logprobs,
        "response_format": req.response_format is not None and req.response_format.type != "text",
        # constraints would be silently dropped: the pipeline's own steps decide decoding
        "guided_json": req.guided_json is not None,
        "guided_regex": req.guided_regex is not None,
        "guided_choice": req.guided_choice is not None,
        "guided_grammar": req.guided_grammar is not None,
    }
    for param, bad in unsupported.items():
        if bad:
            raise InvalidRequestError(f"{param} is not supported by pipeline models", param=param)
    if req.compound is not None and req.compound.events and not req.stream:
        raise InvalidRequestError("compound.events needs stream: true", param="compound.events")


def _message(message: Any) -> dict[str, Any]:
    """A conversation message as the pipeline's input sees it: role and text content."""
    out = template_message(message)
    return {"role": out["role"], "content": out["content"]}


# -- whole responses ---------------------------------------------------------------------------


async def chat_answer(chat: ChatRun) -> dict[str, Any]:
    """Wait for the run; the chat completion body (`RunFailedError` if the run failed)."""
    record = await chat.active.wait()
    if record.status != "succeeded":
        raise RunFailedError(record.id, record.error or record.status)
    answer = _text((record.outputs or {}).get(chat.output))
    body = ChatCompletionResponse(
        id=chat.id,
        created=chat.created,
        model=chat.model,
        choices=[
            ChatChoice(index=0, message=AssistantMessage(content=answer), finish_reason="stop")
        ],
        usage=_usage(record.prompt_tokens, record.completion_tokens),
    )
    return msgspec.to_builtins(body) | {"compound": chat.extension()}


def _text(value: Any) -> str:
    return "" if value is None else result_text(value)


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    """The run's usage: every model call's prompt and completion tokens (planner, tools'
    model calls, joiner, retries), summed."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


# -- streams -----------------------------------------------------------------------------------


async def chat_stream(chat: ChatRun) -> AsyncIterator[bytes]:
    """SSE: the role chunk, step events if asked, the answer and finish chunks, `[DONE]`."""
    yield _chunk(chat, ChatDelta(role="assistant", content=""), extension=True)
    stream = chat.active.events
    answer = AnswerStream(chat.answer_steps)
    try:
        async for event in stream or _nothing():
            if chat.events:
                yield _step_event(event)
            text = answer.take(event)
            if text:
                yield _chunk(chat, ChatDelta(content=text))
            async for piece in _ending(chat, event, answer):
                yield piece
    except Exception as e:
        yield b"data: " + msgspec.json.encode(error_response(e)[1]) + b"\n\n"
    yield DONE_EVENT


class AnswerStream:
    """Which answer step's text streams, and how much of the answer has gone out.

    The first answer step that streams text is followed (in a run, one of them runs: the
    branches of a route); text sent cannot be taken back, so `rest` checks it at the end.
    """

    def __init__(self, steps: frozenset[str]) -> None:
        self.steps = steps
        self.step: str | None = None
        self.sent = ""

    def take(self, event: Event) -> str:
        """The answer text `event` adds ("" for none)."""
        if not isinstance(event, events.TokenDelta) or event.step not in self.steps:
            return ""
        self.step = self.step or event.step
        if event.step != self.step:
            return ""
        self.sent += event.text
        return event.text

    def rest(self, answer: str, run_id: str) -> str:
        """What remains to send of the final answer; `RunFailedError` when the text that
        went out is not its beginning (a retry after streaming: it cannot be taken back)."""
        if not answer.startswith(self.sent):
            log.warning("run %s: the streamed text of %s is not the answer", run_id, self.step)
            why = f"step {self.step!r} streamed text that is not the answer (retried?)"
            raise RunFailedError(run_id, why)
        return answer[len(self.sent) :]


async def _ending(chat: ChatRun, event: Event, streamed: AnswerStream) -> AsyncIterator[bytes]:
    """The chunks that end the answer, when `event` ends the run."""
    if isinstance(event, events.RunFinished):
        rest = streamed.rest(_text(event.outputs.get(chat.output)), chat.run_id)
        if rest:
            yield _chunk(chat, ChatDelta(content=rest))
        yield _chunk(chat, ChatDelta(), finish_reason="stop")
        if chat.include_usage:
            usage = ChatCompletionChunk(
                id=chat.id,
                created=chat.created,
                model=chat.model,
                choices=[],
                usage=_usage(event.prompt_tokens, event.completion_tokens),
            )
            yield _data(msgspec.to_builtins(usage))
    elif isinstance(event, events.RunFailed | events.RunCancelled):
        error = event.error if isinstance(event, events.RunFailed) else "cancelled"
        raise RunFailedError(chat.run_id, error)


async def _nothing() -> AsyncIterator[Event]:
    return
    yield


def _chunk(
    chat: ChatRun, delta: ChatDelta, *, finish_reason: Any = None, extension: bool = False
) -> bytes:
    choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
    body = msgspec.to_builtins(
        ChatCompletionChunk(id=chat.id, created=chat.created, model=chat.model, choices=[choice])
    )
    if extension:
        body["compound"] = chat.extension()
    return _data(body)


def _data(body: Any) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


def _step_event(event: Event) -> bytes:
    tag = event.__struct_config__.tag
    return b"event: compound." + str(tag).encode() + b"\ndata: " + encode_event(event) + b"\n\n"
