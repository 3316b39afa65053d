"""`/v1/pipelines` and `/v1/runs`: register, list, explain and run pipelines; read runs.

One controller per resource; each handler calls one method of the `PipelineService` (in a
worker thread when it touches the database) and converts the result to a response body.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody, Parameter
from litestar.response import Stream
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_202_ACCEPTED

from executor.events import Event, encode_event
from server.errors import (
    PipelineNotFoundError,
    ProblemsResponse,
    RunNotFoundError,
    UnsupportedMediaTypeError,
)
from server.openai_types import ErrorResponse
from server.pipeline_types import (
    CommitRequest,
    CommitVersion,
    ExplainFormat,
    ExplainRequest,
    ExplainResponse,
    PipelineCreated,
    PipelineDetail,
    PipelineList,
    PipelineSummary,
    PipelineVersions,
    RegistryProblem,
    RegistryStatus,
    RerunRequest,
    RunAccepted,
    RunInfo,
    RunList,
    RunRequest,
)
from server.runs import ActiveRun
from server.service import PipelineService, spec_document
from server.store import RunStatus

EVENT_STREAM = "text/event-stream"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
JSON_TYPES = frozenset({"application/json"})
NOT_FOUND = {404: ResponseSpec(ErrorResponse, description="Unknown pipeline or version")}
INVALID = {422: ResponseSpec(ProblemsResponse, description="Every problem, with JSON pointers")}
Service = NamedDependency[PipelineService]


class PipelineController(Controller):
    """Pipelines: versions of specs, by name."""

    path = "/v1/pipelines"
    tags = ("pipelines",)

    @post(
        "/",
        status_code=HTTP_201_CREATED,
        responses={
            200: ResponseSpec(PipelineCreated, description="This content was registered before"),
            413: ResponseSpec(ErrorResponse, description="The spec is too large"),
            415: ResponseSpec(ErrorResponse, description="Neither YAML nor JSON"),
            **INVALID,
        },
    )
    async def register(
        self,
        request: Request[Any, Any, Any],
        pipelines: Service,
        author: Annotated[str | None, Parameter(max_length=300)] = None,
        message: Annotated[str | None, Parameter(max_length=4000)] = None,
    ) -> Response[PipelineCreated]:
        """Register a spec (YAML or JSON by Content-Type); 201 for a new version, 200 when
        identical content is registered already. A server run with `--commit-posted` commits
        the spec to its pipelines repository as `author` ("Name <email>") with `message`."""
        fmt = _spec_format(request.content_type[0])
        body = await request.body()
        commit = CommitRequest(author=author, message=message) if author else None
        record, created = await asyncio.to_thread(
            pipelines.register, body, fmt, actor=actor_of(request), commit=commit
        )
        answer = PipelineCreated(
            name=record.name,
            version=record.version,
            content_hash=record.content_hash,
            created=created,
            commit=record.commit,
        )
        return Response(answer, status_code=HTTP_201_CREATED if created else HTTP_200_OK)

    @get("/")
    async def list_pipelines(self, pipelines: Service) -> PipelineList:
        """The latest version of every pipeline."""
        records = await asyncio.to_thread(pipelines.latest_pipelines)
        return PipelineList(pipelines=[PipelineSummary.of(r) for r in records])

    @get("/{name:str}", responses=NOT_FOUND)
    async def get_pipeline(self, name: str, pipelines: Service) -> PipelineDetail:
        """The latest version (or `name@ref`), with its spec."""
        return await asyncio.to_thread(_detail, pipelines, name, None)

    @get("/{name:str}/versions", responses=NOT_FOUND)
    async def list_versions(self, name: str, pipelines: Service) -> PipelineVersions:
        """Stored versions, oldest first, and the git history of the pipeline's file (commit,
        tags, author, date, content hash, problems), newest first."""
        return await asyncio.to_thread(_versions, pipelines, name)

    @get("/{name:str}/versions/{version:int}", responses=NOT_FOUND)
    async def get_version(self, name: str, version: int, pipelines: Service) -> PipelineDetail:
        """One version, with its spec."""
        return await asyncio.to_thread(_detail, pipelines, name, version)

    @post("/{name:str}/explain", status_code=HTTP_200_OK, responses={**NOT_FOUND, **INVALID})
    async def explain(
        self, name: str, data: JSONBody[ExplainRequest], pipelines: Service
    ) -> ExplainResponse:
        """EXPLAIN: the physical plan with estimates and the critical path."""
        return await asyncio.to_thread(pipelines.explain, name, data.version, data.format)

    @post(
        "/{name:str}/runs",
        status_code=HTTP_200_OK,
        responses={
            200: ResponseSpec(RunInfo, description="The finished run; with `stream`, SSE events"),
            202: ResponseSpec(RunAccepted, description="`wait: false`: the run goes on"),
            **NOT_FOUND,
            **INVALID,
        },
    )
    async def create_run(
        self,
        request: Request[Any, Any, Any],
        name: str,
        data: JSONBody[RunRequest],
        pipelines: Service,
    ) -> Response[Any]:
        """Run a pipeline: wait for the result, stream its events, or return at once."""
        active = await pipelines.start_run(
            _with_ref(name, data.ref, data.version),
            data.version,
            data.inputs,
            actor=actor_of(request),
            subscribe=data.stream,
        )
        return await _answer(active, wait=data.wait)


class RunController(Controller):
    """Runs: status, outputs, errors and per-step figures."""

    path = "/v1/runs"
    tags = ("runs",)

    @get("/")
    async def list_runs(
        self,
        pipelines: Service,
        pipeline: str | None = None,
        status: RunStatus | None = None,
        limit: Annotated[int, Parameter(ge=1, le=1000)] = 50,
    ) -> RunList:
        """Runs, newest first, without their steps."""
        records = await asyncio.to_thread(
            pipelines.store.list_runs, pipeline=pipeline, status=status, limit=limit
        )
        return RunList(runs=[RunInfo.of(r) for r in records])

    @get("/{run_id:str}", responses={404: ResponseSpec(ErrorResponse, description="No such run")})
    async def get_run(self, run_id: str, pipelines: Service) -> RunInfo:
        """A run with its steps."""
        return RunInfo.of(await asyncio.to_thread(pipelines.store.get_run, run_id))

    @get("/{run_id:str}/explain")
    async def explain_run(
        self, run_id: str, pipelines: Service, format: ExplainFormat = "text"
    ) -> ExplainResponse:
        """EXPLAIN ANALYZE: the run's plan, estimates next to actual figures."""
        return await asyncio.to_thread(pipelines.explain_run, run_id, format)

    @post("/{run_id:str}/rerun", status_code=HTTP_200_OK, responses={**NOT_FOUND, **INVALID})
    async def rerun(
        self,
        request: Request[Any, Any, Any],
        run_id: str,
        data: JSONBody[RerunRequest],
        pipelines: Service,
    ) -> Response[Any]:
        """Run a recorded run again: the exact spec it ran (checked by its content hash, even
        after the branch moved on) with the same inputs; the new run names the old one."""
        active = await pipelines.rerun(run_id, actor=actor_of(request), subscribe=data.stream)
        return await _answer(active, wait=data.wait)

    @post("/{run_id:str}/cancel", status_code=HTTP_202_ACCEPTED)
    async def cancel_run(
        self, request: Request[Any, Any, Any], run_id: str, pipelines: Service
    ) -> RunAccepted:
        """Cancel a run of this server; 404 when it is not running here."""
        if not pipelines.runs.cancel(run_id):
            raise RunNotFoundError(run_id)
        await asyncio.to_thread(
            pipelines.store.audit, actor_of(request), "run.cancel", f"run:{run_id}", {}
        )
        return RunAccepted(run_id=run_id, status="cancelling")


class RegistryController(Controller):
    """The git-backed registry: what the branch head serves, and specs that do not validate."""

    path = "/v1/registry"
    tags = ("pipelines",)

    @get("/")
    async def status(self, pipelines: Service) -> RegistryStatus:
        """The last scan: head commit, served versions, removed pipelines, invalid specs."""
        return _registry_status(pipelines)

    @post("/reload", status_code=HTTP_200_OK)
    async def reload(self, pipelines: Service) -> RegistryStatus:
        """Follow new commits of the branch now (the server also polls)."""
        await asyncio.to_thread(pipelines.reload)
        return _registry_status(pipelines)


@post("/v1/pipelines:reload", status_code=HTTP_200_OK, tags=["pipelines"])
async def reload_pipelines(pipelines: Service) -> RegistryStatus:
    """Same as `POST /v1/registry/reload`."""
    await asyncio.to_thread(pipelines.reload)
    return _registry_status(pipelines)


def _registry_status(pipelines: PipelineService) -> RegistryStatus:
    registry = pipelines.registry
    if registry is None:
        return RegistryStatus(enabled=False)
    state = registry.status()
    return RegistryStatus(
        enabled=True,
        branch=registry.branch,
        head=state.head,
        checked_at=state.checked_at,
        pipelines={name: r.commit or "" for name, r in sorted(state.current.items())},
        removed=dict(state.removed),
        problems=[
            RegistryProblem(commit=p.commit, path=p.path, name=p.name, problems=list(p.messages))
            for p in state.problems
        ],
    )


async def _answer(active: ActiveRun, *, wait: bool) -> Response[Any]:
    """The run's events (streaming), 202 at once (`wait: false`), or the finished run."""
    if active.events is not None:
        return Stream(_sse(active.events), media_type=EVENT_STREAM, headers=STREAM_HEADERS)
    if not wait:
        accepted = RunAccepted(run_id=active.run_id, status="queued")
        return Response(accepted, status_code=HTTP_202_ACCEPTED)
    return Response(RunInfo.of(await active.wait()))


def _with_ref(name: str, ref: str | None, version: int | None) -> str:
    """`name@ref` from the path or the body's `ref`; only one way of naming a version."""
    if ref is None:
        return name
    if "@" in name or version is not None:
        raise ValidationException("name a version once: `name@ref`, `ref` or `version`")
    return f"{name}@{ref}"


def _spec_format(media_type: str) -> str | None:
    if media_type in YAML_TYPES:
        return "yaml"
    if media_type in JSON_TYPES:
        return "json"
    if media_type in ("", "text/plain", "application/octet-stream"):
        return None  # sniffed from the body
    raise UnsupportedMediaTypeError(media_type)


def actor_of(request: Request[Any, Any, Any]) -> str:
    """Who made the request, for the audit log (the client address until there is auth)."""
    return f"http:{request.client.host}" if request.client else "http:unknown"


def _versions(pipelines: PipelineService, name: str) -> PipelineVersions:
    """Stored versions and git history; 404 only when neither knows the name."""
    commits = [CommitVersion.of(v) for v in pipelines.git_versions(name)]
    try:
        records = pipelines.store.pipeline_versions(name)
    except PipelineNotFoundError:
        if not commits:
            raise
        records = []
    return PipelineVersions(
        name=name, versions=[PipelineSummary.of(r) for r in records], commits=commits
    )


def _detail(pipelines: PipelineService, name: str, version: int | None) -> PipelineDetail:
    ref = f"{name}@{version}" if version is not None else name
    resolved = pipelines.resolve(ref)
    record = resolved.record
    return PipelineDetail(
        name=record.name,
        version=record.version,
        content_hash=record.content_hash,
        declared_version=record.declared_version,
        commit=resolved.commit,
        created_at=record.created_at,
        spec=spec_document(record),
        spec_text=record.spec_text,
        spec_format=record.spec_format,
    )


async def _sse(events: AsyncIterator[Event]) -> AsyncIterator[bytes]:
    """Server-sent events: `event: <type>` and `data: <event JSON>` per executor event."""
    async for event in events:
        tag = event.__struct_config__.tag
        yield b"event: " + str(tag).encode() + b"\ndata: " + encode_event(event) + b"\n\n"
