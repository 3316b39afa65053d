"""Model backends: where a `generate` step's call goes.

A target is what a pipeline's model alias resolves to (`demo-base`, `demo-base:router`, or a
provider model name configured on the server). `Backends` routes each call to the first
backend that serves its target: the in-process engine (`EngineBackend`) or an
OpenAI-compatible HTTP provider (`OpenAIBackend`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx
import msgspec

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine import Engine, GenerationRequest
from executor.errors import BackendError

log = logging.getLogger(__name__)

OnDelta = Callable[[str], None]


class ModelCall(msgspec.Struct, frozen=True, kw_only=True):
    """One model call, templates already rendered: a prompt or chat messages."""

    target: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = []
    seed: int | None = None
    grammar: str | None = None  # Lark grammar the output must match (constrained decoding)
    # Output constraints a backend enforces while decoding, when it can (the engine does);
    # the executor still checks the output afterwards, so a backend may ignore them.
    choice: list[str] = []
    json_schema: dict[str, Any] | None = None


class ModelResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a model call produced."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@runtime_checkable
class ModelBackend(Protocol):
    """Something that runs model calls for the targets it serves."""

    def serves(self, target: str) -> bool:
        """True when this backend answers calls for `target`."""
        ...

    async def generate(self, call: ModelCall, on_delta: OnDelta | None = None) -> ModelResult:
        """Run the call; stream text pieces to `on_delta` as they come."""
        ...


class Backends:
    """Routes a target to the first backend that serves it."""

    def __init__(self, backends: Sequence[ModelBackend] = ()) -> None:
        self.backends = list(backends)

    def serves(self, target: str) -> bool:
        """True when some backend serves `target`."""
        return any(b.serves(target) for b in self.backends)

    def backend_for(self, target: str) -> ModelBackend:
        """The first backend serving `target`, else a `BackendError` naming it."""
        for backend in self.backends:
            if backend.serves(target):
                return backend
        raise BackendError(f"no model backend serves {target!r}")

    async def generate(self, call: ModelCall, on_delta: OnDelta | None = None) -> ModelResult:
        """Run the call on the backend that serves its target."""
        return await self.backend_for(call.target).generate(call, on_delta)


# -- the in-process engine ---------------------------------------------------------------------


class EngineBackend:
    """Calls go to models loaded in the in-process engine (continuous batching across calls)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def serves(self, target: str) -> bool:
        """A loaded model, or one of its adapters (`base:adapter`, loaded or loadable)."""
        return self.engine.serves(target)

    async def generate(self, call: ModelCall, on_delta: OnDelta | None = None) -> ModelResult:
        """Stream the call through the engine; engine errors become `BackendError`."""
        request = self._request(call)
        text: list[str] = []
        prompt_tokens = completion_tokens = 0
        finish_reason = "stop"
        try:
            async for delta in self.engine.stream(request):
                if delta.text:
                    text.append(delta.text)
                    if on_delta is not None:
                        on_delta(delta.text)
                prompt_tokens, completion_tokens = delta.prompt_tokens, delta.completion_tokens
                finish_reason = delta.finish_reason or finish_reason
        except EngineError as e:
            raise BackendError(f"engine model {call.target!r}: {e}") from e
        if finish_reason == "abort":
            raise BackendError(f"engine model {call.target!r}: the request was aborted")
        return ModelResult(
            text="".join(text),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
        )

    def _request(self, call: ModelCall) -> GenerationRequest:
        # Imported here: the executor package must load without torch (fast CLI validate).
        from engine import GenerationRequest, SamplingParams

        params = SamplingParams(
            max_tokens=call.max_tokens,
            temperature=call.temperature,
            top_p=call.top_p,
            top_k=call.top_k,
            seed=call.seed,
            stop=tuple(call.stop),
            grammar=call.grammar,
            choice=tuple(call.choice),
            json_schema=None if call.json_schema is None else json.dumps(call.json_schema),
        )
        if call.messages is None:
            return GenerationRequest(model=call.target, prompt=call.prompt or "", params=params)
        try:
            tokenizer = self.engine.tokenizer(call.target)
            # The rendered chat text already carries BOS; encoding must not add it again.
            text = tokenizer.apply_chat_template(call.messages)
            ids = tokenizer.encode(text, add_special_tokens=False)
        except EngineError as e:
            raise BackendError(f"engine model {call.target!r}: {e}") from e
        return GenerationRequest(model=call.target, prompt_token_ids=ids, params=params)


# -- OpenAI-compatible providers ---------------------------------------------------------------


class OpenAIBackend:
    """An OpenAI-compatible provider's `/chat/completions`, streamed over SSE.

    `base_url` follows the `openai` client's convention: it includes the version prefix
    (`https://host/v1`). `model_map` maps the targets this provider serves to its own model
    names. A `prompt` call is sent as one user message.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        api_key: str | None,
        model_map: dict[str, str],
        timeout_s: float = 60.0,
    ) -> None:
        self.name = name
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model_map = dict(model_map)
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def serves(self, target: str) -> bool:
        """True for the targets in `model_map`."""
        return target in self.model_map

    async def generate(self, call: ModelCall, on_delta: OnDelta | None = None) -> ModelResult:
        """POST a streamed chat completion; provider and transport errors become `BackendError`."""
        if call.target not in self.model_map:
            raise BackendError(f"provider {self.name!r} does not serve {call.target!r}")
        if call.grammar is not None:
            raise BackendError(
                f"provider {self.name!r}: grammar-constrained calls are not supported"
            )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with self._http().stream(
                "POST", self.url, json=self._body(call), headers=headers
            ) as response:
                if response.status_code >= 400:
                    body = await response.aread()
                    raise BackendError(self._http_error(response.status_code, body))
                return await _read_stream(self.name, response.aiter_lines(), on_delta)
        except httpx.HTTPError as e:
            raise BackendError(f"provider {self.name!r}: {type(e).__name__}: {e}") from e

    async def aclose(self) -> None:
        """Close the HTTP client (connections are pooled across calls)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        # A client is bound to the event loop it first ran on; make a new one for a new loop.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
            self._client_loop = loop
        return self._client

    def _body(self, call: ModelCall) -> dict[str, Any]:
        messages = call.messages or [{"role": "user", "content": call.prompt or ""}]
        body: dict[str, Any] = {
            "model": self.model_map[call.target],
            "messages": messages,
            "max_tokens": call.max_tokens,
            "temperature": call.temperature,
            "top_p": call.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # Non-standard or optional fields only when set: strict providers reject unknown ones.
        if call.top_k:
            body["top_k"] = call.top_k
        if call.stop:
            body["stop"] = list(call.stop)
        if call.seed is not None:
            body["seed"] = call.seed
        return body

    def _http_error(self, status: int, body: bytes) -> str:
        return f"provider {self.name!r}: HTTP {status}: {_error_message(body)}"


def _error_message(body: bytes | dict[str, Any]) -> str:
    """The `error.message` of an OpenAI-style error body, else the body itself (truncated)."""
    try:
        data = json.loads(body) if isinstance(body, bytes) else body
        return str(data["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:500].decode(errors="replace") if isinstance(body, bytes) else str(body)


async def _read_stream(
    provider: str, lines: AsyncIterator[str], on_delta: OnDelta | None
) -> ModelResult:
    """Fold `data: {...}` chunks into a result; usage comes from the final chunk."""
    text: list[str] = []
    finish_reason = "stop"
    usage: dict[str, Any] = {}
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError as e:
            raise BackendError(
                f"provider {provider!r}: malformed stream chunk {data[:200]!r}"
            ) from e
        if "error" in chunk:
            raise BackendError(f"provider {provider!r}: {_error_message(chunk)}")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                text.append(piece)
                if on_delta is not None:
                    on_delta(piece)
            finish_reason = choice.get("finish_reason") or finish_reason
    return ModelResult(
        text="".join(text),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        finish_reason=finish_reason,
    )
