"""OpenAI requests to engine jobs, and engine deltas to OpenAI responses and stream chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from engine import Engine, InvalidRequestError, RequestOutput, StreamDelta, TokenLogprob
from engine.tokenizer import Tokenizer
from server.config import LimitsConfig
from server.errors import error_response
from server.generation import Job, TokenBudget, choice_params, new_job, run_job
from server.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    SpeculativeUsage,
    TopLogprob,
    Usage,
)

DONE_EVENT = b"data: [DONE]\n\n"
Deltas = AsyncIterator[tuple[int, StreamDelta]]


# -- requests to jobs ------------------------------------------------------------------------


def completion_job(engine: Engine, req: CompletionRequest, limits: LimitsConfig) -> Job:
    """Tokenize the prompt(s) and build one engine request per choice."""
    _check_completion_fields(req)
    tokenizer = engine.tokenizer(req.model)
    prompts = _completion_prompts(req.prompt, tokenizer)
    budget = TokenBudget("max_tokens", req.max_tokens, prompt_param="prompt")
    params = [
        choice_params(engine, req, len(p), limits, budget=budget, logprobs=req.logprobs)
        for p in prompts
    ]
    return new_job("cmpl", engine, req, prompts, params)


def chat_job(engine: Engine, req: ChatCompletionRequest, limits: LimitsConfig) -> Job:
    """Render the conversation with the model's chat template and build the choices."""
    _check_chat_fields(req)
    tokenizer = engine.tokenizer(req.model)
    text = tokenizer.apply_chat_template(
        [template_message(m) for m in req.messages], add_generation_prompt=True
    )
    # The template writes BOS itself when the model wants one.
    prompt = tokenizer.encode(text, add_special_tokens=False)
    budget = (
        TokenBudget("max_completion_tokens", req.max_completion_tokens, prompt_param="messages")
        if req.max_completion_tokens is not None
        else TokenBudget("max_tokens", req.max_tokens, prompt_param="messages")
    )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = choice_params(engine, req, len(prompt), limits, budget=budget, logprobs=logprobs)
    return new_job("chatcmpl", engine, req, [prompt], [params])


def _completion_prompts(prompt: str | list[Any], tokenizer: Tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(p) for p in prompt]
    if all(isinstance(p, list) for p in prompt):
        return [list(p) for p in prompt]
    raise InvalidRequestError(
        "prompt must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists",
        param="prompt",
    )


def _check_completion_fields(req: CompletionRequest) -> None:
    _reject(req.echo, "echo")
    _reject(bool(req.suffix), "suffix")
    _reject(req.best_of not in (None, req.n), "best_of")
    _reject(bool(req.logit_bias), "logit_bias")


def _check_chat_fields(req: ChatCompletionRequest) -> None:
    _reject(bool(req.tools), "tools")
    _reject(bool(req.logit_bias), "logit_bias")
    for i, message in enumerate(req.messages):
        # Only an assistant message may come without content (when it carries tool calls).
        if message.content is None and message.role != "assistant":
            raise InvalidRequestError(
                f"a {message.role} message needs content", param=f"messages[{i}].content"
            )
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")


def _reject(unsupported: bool, param: str) -> None:
    if unsupported:
        raise InvalidRequestError(f"{param} is not supported by this server", param=param)


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A request message as chat templates see it (text content; `developer` -> `system`)."""
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    role = "system" if message.role == "developer" else message.role
    out: dict[str, Any] = {"role": role, "content": content or ""}
    extras = {
        "name": message.name,
        "tool_call_id": message.tool_call_id,
        "tool_calls": message.tool_calls,
    }
    return out | {k: v for k, v in extras.items() if v is not None}


# -- whole responses ---------------------------------------------------------------------------


async def collect(engine: Engine, job: Job, timeout_s: float | None) -> list[RequestOutput]:
    """Run a job to the end; one output per choice, in choice order."""
    outputs = [
        RequestOutput(
            request_id=r.request_id or "",
            prompt=None,
            prompt_token_ids=list(r.prompt_token_ids or []),
        )
        for r in job.requests
    ]
    async for index, delta in run_job(engine, job, timeout_s):
        outputs[index].add(delta, time.perf_counter())
    return outputs


def completion_response(job: Job, outputs: list[RequestOutput]) -> CompletionResponse:
    """The body of a non-streaming completion."""
    choices = [
        CompletionChoice(
            index=i,
            text=out.text,
            finish_reason=_finish(out.finish_reason),
            logprobs=_completion_logprobs(job.tokenizer, out.logprobs, 0),
        )
        for i, out in enumerate(outputs)
    ]
    return CompletionResponse(
        id=job.id, created=job.created, model=job.model, choices=choices, usage=_usage(job, outputs)
    )


def chat_response(job: Job, outputs: list[RequestOutput]) -> ChatCompletionResponse:
    """The body of a non-streaming chat completion."""
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=out.text),
            finish_reason=_finish(out.finish_reason),
            logprobs=_chat_logprobs(job.tokenizer, out.logprobs),
        )
        for i, out in enumerate(outputs)
    ]
    return ChatCompletionResponse(
        id=job.id, created=job.created, model=job.model, choices=choices, usage=_usage(job, outputs)
    )


def _usage(job: Job, outputs: list[RequestOutput]) -> Usage:
    completion = sum(len(out.token_ids) for out in outputs)
    drafts = [(out.num_draft_tokens, out.num_accepted_tokens) for out in outputs]
    return Usage(
        prompt_tokens=job.prompt_tokens,
        completion_tokens=completion,
        total_tokens=job.prompt_tokens + completion,
        speculative=_speculative_usage(drafts),
    )


def _speculative_usage(drafts: list[tuple[int, int]]) -> SpeculativeUsage | None:
    """Acceptance figures summed over the choices; None when nothing was speculated."""
    proposed = sum(d for d, _ in drafts)
    if not proposed:
        return None
    accepted = sum(a for _, a in drafts)
    return SpeculativeUsage(
        draft_tokens=proposed, accepted_tokens=accepted, acceptance_rate=accepted / proposed
    )


def _finish(reason: str | None) -> Any:
    return reason if reason in ("stop", "length", "abort") else None


# -- streams -----------------------------------------------------------------------------------


async def completion_events(job: Job, deltas: Deltas) -> AsyncIterator[bytes]:
    """Server-sent events of a streamed completion, `data: [DONE]` last."""
    offsets = [0] * len(job.requests)

    def chunk(index: int, delta: StreamDelta) -> list[Any]:
        logprobs = _completion_logprobs(job.tokenizer, delta.logprobs, offsets[index])
        offsets[index] += len(delta.text)
        choices = []
        if delta.text or delta.logprobs:
            choices.append(CompletionChoice(index=index, text=delta.text, logprobs=logprobs))
        if delta.finished:
            choices.append(
                CompletionChoice(index=index, text="", finish_reason=_finish(delta.finish_reason))
            )
        return [_completion_chunk(job, [c]) for c in choices]

    async for event in _events(job, deltas, chunk, _completion_usage_chunk):
        yield event


async def chat_events(job: Job, deltas: Deltas) -> AsyncIterator[bytes]:
    """Server-sent events of a streamed chat completion: role first, finish_reason last."""

    def chunk(index: int, delta: StreamDelta) -> list[Any]:
        chunks = []
        if delta.text or delta.logprobs:
            logprobs = _chat_logprobs(job.tokenizer, delta.logprobs)
            chunks.append(
                _chat_chunk(
                    job,
                    ChatChunkChoice(
                        index=index, delta=ChatDelta(content=delta.text), logprobs=logprobs
                    ),
                )
            )
        if delta.finished:
            chunks.append(
                _chat_chunk(
                    job,
                    ChatChunkChoice(
                        index=index, delta=ChatDelta(), finish_reason=_finish(delta.finish_reason)
                    ),
                )
            )
        return chunks

    for index in range(len(job.requests)):
        role = ChatDelta(role="assistant", content="")
        yield _event(_chat_chunk(job, ChatChunkChoice(index=index, delta=role)))
    async for event in _events(job, deltas, chunk, _chat_usage_chunk):
        yield event


async def _events(
    job: Job,
    deltas: Deltas,
    chunk: Callable[[int, StreamDelta], list[Any]],
    usage_chunk: Callable[[Job, Usage], Any],
) -> AsyncIterator[bytes]:
    # An error after the response started can only be reported inside the stream.
    completion_tokens = [0] * len(job.requests)
    drafts = [(0, 0)] * len(job.requests)
    try:
        async for index, delta in deltas:
            completion_tokens[index] = delta.completion_tokens
            drafts[index] = (delta.num_draft_tokens, delta.num_accepted_tokens)
            for body in chunk(index, delta):
                yield _event(body)
    except Exception as e:
        yield _event(error_response(e)[1])
    else:
        if job.include_usage:
            total = sum(completion_tokens)
            usage = Usage(
                prompt_tokens=job.prompt_tokens,
                completion_tokens=total,
                total_tokens=job.prompt_tokens + total,
                speculative=_speculative_usage(drafts),
            )
            yield _event(usage_chunk(job, usage))
    yield DONE_EVENT


def _event(body: Any) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


def _completion_chunk(job: Job, choices: list[CompletionChoice]) -> CompletionResponse:
    return CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices)


def _completion_usage_chunk(job: Job, usage: Usage) -> CompletionResponse:
    return CompletionResponse(
        id=job.id, created=job.created, model=job.model, choices=[], usage=usage
    )


def _chat_chunk(job: Job, choice: ChatChunkChoice) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=[choice])


def _chat_usage_chunk(job: Job, usage: Usage) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=job.id, created=job.created, model=job.model, choices=[], usage=usage
    )


# -- logprobs ----------------------------------------------------------------------------------


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(
    tokenizer: Tokenizer, logprobs: list[TokenLogprob] | None
) -> ChoiceLogprobs | None:
    if logprobs is None:
        return None

    def top(token_id: int, logprob: float) -> TopLogprob:
        text = _token_text(tokenizer, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for lp in logprobs:
        text = _token_text(tokenizer, lp.token_id)
        content.append(
            ChatTokenLogprob(
                token=text,
                logprob=lp.logprob,
                bytes=list(text.encode()),
                top_logprobs=[top(t, v) for t, v in lp.top],
            )
        )
    return ChoiceLogprobs(content=content)


def _completion_logprobs(
    tokenizer: Tokenizer, logprobs: list[TokenLogprob] | None, offset: int
) -> CompletionLogprobs | None:
    if logprobs is None:
        return None
    tokens = [_token_text(tokenizer, lp.token_id) for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{_token_text(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
        text_offset=offsets,
    )
