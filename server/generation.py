"""Running one API request's choices on the engine: params, merged streams, abort, deadline.

An OpenAI request with `n` choices (and, for completions, several prompts) becomes one
engine request per choice. Their delta streams are merged into one stream of
`(choice_index, delta)`; when the consumer stops early, times out or the client goes
away, every engine request still running is aborted.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from litestar import Request

from engine import Engine, GenerationRequest, InvalidRequestError, SamplingParams, StreamDelta
from engine.tokenizer import Tokenizer
from server.config import LimitsConfig
from server.errors import ClientDisconnectedError, RequestTimeoutError
from server.openai_types import SamplingFields

T = TypeVar("T")

# Queue items: a delta, None when a choice's stream ended, or the error that ended it.
_Item = tuple[int, StreamDelta | None] | BaseException


@dataclass(frozen=True)
class Job:
    """One API request, ready for the engine: one engine request per choice."""

    id: str
    created: int
    model: str
    tokenizer: Tokenizer
    prompts: list[list[int]]
    requests: list[GenerationRequest]
    include_usage: bool = False
    # engine constraint field -> the request field it came from, for error messages
    constraint_params: dict[str, str] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens as OpenAI counts them: each prompt once, whatever `n` is."""
        return sum(len(p) for p in self.prompts)


def new_job(
    prefix: str,
    engine: Engine,
    req: SamplingFields,
    prompts: list[list[int]],
    params: list[list[SamplingParams]],
) -> Job:
    """Build a job; `params[i]` are the SamplingParams of the choices of `prompts[i]`."""
    job_id = f"{prefix}-{uuid.uuid4().hex}"
    requests = [
        GenerationRequest(
            model=req.model,
            prompt_token_ids=prompt,
            params=p,
            request_id=f"{job_id}-{i * req.n + j}",
        )
        for i, (prompt, choice_params) in enumerate(zip(prompts, params, strict=True))
        for j, p in enumerate(choice_params)
    ]
    return Job(
        id=job_id,
        created=int(time.time()),
        model=req.model,
        tokenizer=engine.tokenizer(req.model),
        prompts=prompts,
        requests=requests,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        constraint_params=client_constraint_params(req),
    )


@dataclass(frozen=True)
class TokenBudget:
    """The request's completion-length field and its value, and the name of its prompt field."""

    param: str
    requested: int | None
    prompt_param: str


def choice_params(
    engine: Engine,
    req: SamplingFields,
    prompt_len: int,
    limits: LimitsConfig,
    *,
    budget: TokenBudget,
    logprobs: int | None,
) -> list[SamplingParams]:
    """SamplingParams of the `n` choices of one prompt, validated against the model."""
    info = engine.model_info(req.model)
    room = min(info.max_model_len, info.num_blocks * info.block_size) - prompt_len
    max_tokens = _max_tokens(budget, prompt_len=prompt_len, room=room, limit=limits.max_tokens)
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "min_tokens": req.min_tokens,
    }
    base = SamplingParams(
        max_tokens=max_tokens,
        stop=_stops(req.stop),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        seed=req.seed,
        speculative=req.speculative,
        **{k: v for k, v in optional.items() if v is not None},
        **constraint_fields(req),
    )
    try:
        base.validate(info.max_model_len)
    except InvalidRequestError as e:
        raise renamed_param(e, client_constraint_params(req)) from None
    # Choice i gets seed + i: with one shared seed every choice would be the same text.
    return [
        base if req.seed is None or i == 0 else _with_seed(base, req.seed + i) for i in range(req.n)
    ]


# The request fields that ask for a constraint, in the order the "at most one" error cites them.
_CONSTRAINT_FIELDS = ("guided_grammar", "guided_json", "guided_regex", "guided_choice")
# The engine's SamplingParams field each guided_* (vLLM's names) becomes.
_ENGINE_FIELD = {
    "guided_grammar": "grammar",
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
}


def constraint_fields(req: SamplingFields) -> dict[str, Any]:
    """The SamplingParams constraint of a request: its guided_* field or JSON response_format."""
    _check_one_constraint(req)
    given = {
        "json_schema": _json_text(req.guided_json),
        "regex": req.guided_regex,
        "choice": tuple(req.guided_choice) if req.guided_choice else None,
        "grammar": req.guided_grammar,
    }
    response_format = _json_format(req)
    if response_format is not None:
        given["json_schema"] = _response_schema(response_format)
    return {k: v for k, v in given.items() if v is not None}


def _check_one_constraint(req: SamplingFields) -> None:
    """At most one constraint, named as the client sent it (the engine would name its own fields)."""
    given = [f for f in _CONSTRAINT_FIELDS if getattr(req, f) is not None]
    given += ["response_format"] if _json_format(req) is not None else []
    if len(given) > 1:
        raise InvalidRequestError(
            f"give at most one of {', '.join(_CONSTRAINT_FIELDS)} and a JSON response_format, "
            f"got {', '.join(given)}",
            param=given[1],
        )


def _json_format(req: SamplingFields) -> Any:
    """The request's response_format when it asks for JSON, else None (completions have none)."""
    response_format = getattr(req, "response_format", None)
    return None if response_format is None or response_format.type == "text" else response_format


def client_constraint_params(req: SamplingFields) -> dict[str, str]:
    """Engine constraint field -> the request field that set it (guided_* or response_format)."""
    names = {_ENGINE_FIELD[f]: f for f in _CONSTRAINT_FIELDS if getattr(req, f) is not None}
    response_format = _json_format(req)
    if response_format is not None:
        names["json_schema"] = (
            "response_format.json_schema.schema"
            if response_format.type == "json_schema"
            else "response_format"
        )
    return names


def renamed_param(exc: InvalidRequestError, names: dict[str, str]) -> InvalidRequestError:
    """`exc` naming the request's field instead of the engine's (`regex` -> `guided_regex`)."""
    client = names.get(exc.param or "")
    if client is None:
        return exc
    # The engine's constraint messages start with the field's name ("regex is not a valid ...").
    message = re.sub(rf"^{re.escape(exc.param or '')}\b", client, str(exc))
    return InvalidRequestError(message, param=client)


def _json_text(schema: dict[str, Any] | str | None) -> str | None:
    return schema if schema is None or isinstance(schema, str) else json.dumps(schema)


def _response_schema(response_format: Any) -> str:
    """JSON text of the schema a json_object / json_schema response_format asks for."""
    if response_format.type == "json_object":
        return '{"type": "object"}'
    spec = response_format.json_schema
    if spec is None or spec.schema is None:
        raise InvalidRequestError(
            "response_format of type json_schema needs json_schema.schema",
            param="response_format.json_schema",
        )
    return json.dumps(spec.schema)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return msgspec.structs.replace(params, seed=seed)


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _max_tokens(budget: TokenBudget, *, prompt_len: int, room: int, limit: int) -> int:
    """The completion length: as requested, or all the context left up to the server's limit."""
    context = prompt_len + room
    requested, param = budget.requested, budget.param
    if room < 1:
        raise InvalidRequestError(
            f"This model's maximum context length is {context} tokens, and the prompt alone "
            f"is {prompt_len} tokens. Please reduce the length of the prompt.",
            param=budget.prompt_param,
        )
    if requested is None:
        return min(limit, room)
    if requested > limit:
        raise InvalidRequestError(
            f"{param} must be at most {limit} on this server, got {requested}", param=param
        )
    if requested > room:
        raise InvalidRequestError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the "
            f"completion). Please reduce the length of the prompt or completion.",
            param=param,
        )
    return requested


async def run_job(
    engine: Engine, job: Job, timeout_s: float | None
) -> AsyncIterator[tuple[int, StreamDelta]]:
    """Merged deltas of all choices until every one finished; aborts the rest on exit."""
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    tasks = [
        asyncio.create_task(_pump(engine, i, request, queue))
        for i, request in enumerate(job.requests)
    ]
    deadline = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s
    running = len(tasks)
    finished: set[int] = set()
    try:
        while running:
            item = await _next(queue, deadline, timeout_s)
            if isinstance(item, InvalidRequestError):
                raise renamed_param(item, job.constraint_params) from None
            if isinstance(item, BaseException):
                raise item
            index, delta = item
            if delta is None:
                running -= 1
                continue
            if delta.finished:
                finished.add(index)
            yield index, delta
    finally:
        for task in tasks:
            task.cancel()
        for index, request in enumerate(job.requests):
            if index not in finished:
                engine.abort(request.request_id or "")


async def primed(stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """Start `stream` now, so errors before its first item are raised here, not mid-response."""
    first = await anext(stream)

    async def rest() -> AsyncIterator[T]:
        yield first
        async for item in stream:
            yield item

    return rest()


async def until_disconnected(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    # A cancelled task is only done once it has run its cancellation: wait for both, or
    # `task.result()` below would find it still pending (InvalidStateError).
    await asyncio.wait({task, watcher})
    if task.cancelled():
        raise ClientDisconnectedError
    return task.result()


async def _wait_for_disconnect(request: Request[Any, Any, Any]) -> None:
    # The body is already read: the next ASGI message can only be the disconnect.
    message = await request.receive()
    while message["type"] != "http.disconnect":
        message = await request.receive()


async def _pump(
    engine: Engine, index: int, request: GenerationRequest, queue: asyncio.Queue[_Item]
) -> None:
    try:
        async for delta in engine.stream(request):
            queue.put_nowait((index, delta))
        queue.put_nowait((index, None))
    except Exception as e:
        queue.put_nowait(e)


async def _next(
    queue: asyncio.Queue[_Item], deadline: float | None, timeout_s: float | None
) -> _Item:
    if deadline is None or timeout_s is None:
        return await queue.get()
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(queue.get(), max(remaining, 0.0))
    except TimeoutError:
        raise RequestTimeoutError(timeout_s) from None
