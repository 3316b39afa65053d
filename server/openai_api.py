"""OpenAI-compatible endpoints over the engine: completions, chat completions, models.

A chat completion whose `model` is not an engine model but a pipeline marked as a chat
endpoint (`f1`, `f1@v1`) runs that pipeline on the conversation (`server/pipeline_chat.py`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK

from engine import Engine
from server.config import LimitsConfig
from server.generation import primed, run_job, until_disconnected
from server.openai_serving import (
    chat_events,
    chat_job,
    chat_response,
    collect,
    completion_events,
    completion_job,
    completion_response,
)
from server.openai_types import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from server.pipeline_chat import RUN_HEADER, chat_answer, chat_stream, start_chat_run
from server.pipelines_api import actor_of
from server.service import PipelineService

EVENT_STREAM = "text/event-stream"
# Proxies must not buffer the event stream.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STREAMED = "; with `stream: true`, `text/event-stream` chunks of the same shape"
ERRORS = {
    400: ResponseSpec(ErrorResponse, description="Invalid request"),
    404: ResponseSpec(ErrorResponse, description="Unknown model"),
}


PIPELINE_OWNER = "compound-pipeline"  # `owned_by` of pipelines listed as chat models


class OpenAIController(Controller):
    """`/v1/completions`, `/v1/chat/completions` and `/v1/models`, in OpenAI's shapes."""

    path = "/v1"
    tags = ("openai",)

    @get("/models")
    async def list_models(
        self, engine: NamedDependency[Engine], pipelines: NamedDependency[PipelineService]
    ) -> ModelList:
        """The models the engine has loaded, their known LoRA adapters (`base:adapter`), and
        the pipelines that answer chat completions (`f1`; owned by `compound-pipeline`)."""
        now = int(time.time())
        cards = [ModelCard(id=name, created=now) for name in engine.model_names()]
        cards += [
            ModelCard(id=a.name, created=now, parent=a.name.split(":", 1)[0])
            for a in engine.adapters()
            if not a.unloading
        ]
        chat = await asyncio.to_thread(pipelines.chat_models)
        cards += [ModelCard(id=name, created=now, owned_by=PIPELINE_OWNER) for name in chat]
        return ModelList(data=cards)

    # Annotated as Response so that a Stream keeps its own media type; `responses` documents it.
    @post(
        "/completions",
        status_code=HTTP_200_OK,
        responses={
            200: ResponseSpec(CompletionResponse, description="The completion" + STREAMED),
            **ERRORS,
        },
    )
    async def create_completion(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[CompletionRequest],
        engine: NamedDependency[Engine],
        limits: NamedDependency[LimitsConfig],
    ) -> Response[Any]:
        """Complete a prompt; with `stream`, server-sent events in OpenAI's chunk format."""
        job = completion_job(engine, data, limits)
        if data.stream:
            deltas = await primed(run_job(engine, job, limits.request_timeout_s))
            return _event_stream(completion_events(job, deltas))
        outputs = await until_disconnected(request, collect(engine, job, limits.request_timeout_s))
        return Response(completion_response(job, outputs))

    @post(
        "/chat/completions",
        status_code=HTTP_200_OK,
        responses={
            200: ResponseSpec(ChatCompletionResponse, description="The answer" + STREAMED),
            **ERRORS,
        },
    )
    async def create_chat_completion(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ChatCompletionRequest],
        engine: NamedDependency[Engine],
        limits: NamedDependency[LimitsConfig],
        pipelines: NamedDependency[PipelineService],
    ) -> Response[Any]:
        """Answer a conversation; with `stream`, server-sent events in OpenAI's chunk format.

        `model` names an engine model, or a pipeline that is a chat endpoint: then the run's
        id is in the `x-compound-run-id` header and the body's `compound.run_id`."""
        if not engine.serves(data.model):
            endpoint = await asyncio.to_thread(pipelines.chat_endpoint, data.model)
            if endpoint is not None:
                return await _pipeline_chat(request, pipelines, endpoint, data)
        job = chat_job(engine, data, limits)
        if data.stream:
            deltas = await primed(run_job(engine, job, limits.request_timeout_s))
            return _event_stream(chat_events(job, deltas))
        outputs = await until_disconnected(request, collect(engine, job, limits.request_timeout_s))
        return Response(chat_response(job, outputs))


def _event_stream(events: Any, headers: dict[str, str] | None = None) -> Stream:
    return Stream(events, media_type=EVENT_STREAM, headers=STREAM_HEADERS | (headers or {}))


async def _pipeline_chat(
    request: Request[Any, Any, Any],
    pipelines: PipelineService,
    endpoint: Any,
    data: ChatCompletionRequest,
) -> Response[Any]:
    """Run the pipeline on the conversation; the run goes on if the client leaves."""
    chat = await start_chat_run(pipelines, endpoint, data, actor=actor_of(request))
    headers = {RUN_HEADER: chat.run_id}
    if data.stream:
        return _event_stream(chat_stream(chat), headers)
    body = await until_disconnected(request, chat_answer(chat))
    return Response(body, headers=headers)
