"""Request and response bodies of the pipeline and run endpoints (msgspec Structs)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from server.store import PipelineRecord, RunRecord, StepRecord

_REQUEST = {"forbid_unknown_fields": True, "frozen": True, "kw_only": True}
_RESPONSE = {"frozen": True, "kw_only": True}

ExplainFormat = Literal["text", "json", "mermaid"]
Version = Annotated[int, Meta(ge=1)]


class ExplainRequest(Struct, **_REQUEST):
    """Body of `POST /v1/pipelines/{name}/explain`."""

    format: ExplainFormat = "text"
    version: Version | None = None  # default: the latest


class RunRequest(Struct, **_REQUEST):
    """Body of `POST /v1/pipelines/{name}/runs`."""

    inputs: dict[str, Any] = {}
    wait: bool = True  # false: 202 at once, the run goes on in the background
    stream: bool = False  # true: server-sent events of the run as it happens
    version: Version | None = None  # default: the latest


class PipelineCreated(Struct, **_RESPONSE):
    """Answer to a registration: the version that holds this content."""

    name: str
    version: int
    content_hash: str
    created: bool


class PipelineSummary(Struct, **_RESPONSE):
    """One version of a pipeline, without its text."""

    name: str
    version: int
    content_hash: str
    declared_version: str | None
    commit: str | None
    created_at: datetime

    @classmethod
    def of(cls, record: PipelineRecord) -> PipelineSummary:
        """The summary of a stored version."""
        return cls(
            name=record.name,
            version=record.version,
            content_hash=record.content_hash,
            declared_version=record.declared_version,
            commit=record.commit,
            created_at=record.created_at,
        )


class PipelineDetail(Struct, **_RESPONSE):
    """One version of a pipeline with its spec: parsed (`spec`) and as registered."""

    name: str
    version: int
    content_hash: str
    declared_version: str | None
    commit: str | None
    created_at: datetime
    spec: dict[str, Any]
    spec_text: str
    spec_format: str


class PipelineList(Struct, **_RESPONSE):
    """Body of `GET /v1/pipelines`: the latest version of each pipeline."""

    pipelines: list[PipelineSummary]


class PipelineVersions(Struct, **_RESPONSE):
    """Body of `GET /v1/pipelines/{name}/versions`, oldest first."""

    name: str
    versions: list[PipelineSummary]


class ExplainResponse(Struct, **_RESPONSE):
    """A plan: text or mermaid source as a string, the JSON format as an object."""

    name: str
    version: int
    content_hash: str
    format: ExplainFormat
    plan: Any


class StepInfo(Struct, **_RESPONSE):
    """One step of a run."""

    step: str
    status: str
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    tokens: int
    model: str | None
    cached: bool
    error: str | None
    skip_reason: str | None
    output: Any
    output_truncated: bool

    @classmethod
    def of(cls, record: StepRecord) -> StepInfo:
        """The API view of a stored step run."""
        return cls(**{f: getattr(record, f) for f in cls.__struct_fields__})


class RunInfo(Struct, **_RESPONSE):
    """A run: status, outputs or error, and (in `GET /v1/runs/{id}`) its steps."""

    run_id: str
    status: str
    pipeline: str
    version: int
    content_hash: str
    commit: str | None
    inputs: Any
    outputs: Any
    error: str | None
    failed_step: str | None
    total_tokens: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    steps: list[StepInfo]

    @classmethod
    def of(cls, record: RunRecord) -> RunInfo:
        """The API view of a stored run."""
        duration = (
            (record.finished_at - record.started_at).total_seconds()
            if record.started_at and record.finished_at
            else None
        )
        return cls(
            run_id=record.id,
            status=record.status,
            pipeline=record.pipeline,
            version=record.version,
            content_hash=record.content_hash,
            commit=record.commit,
            inputs=record.inputs,
            outputs=record.outputs,
            error=record.error,
            failed_step=record.failed_step,
            total_tokens=record.total_tokens,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            duration_s=duration,
            steps=[StepInfo.of(s) for s in record.steps],
        )


class RunAccepted(Struct, **_RESPONSE):
    """Answer to `wait: false`: the run is queued; poll `GET /v1/runs/{run_id}`."""

    run_id: str
    status: str


class RunList(Struct, **_RESPONSE):
    """Body of `GET /v1/runs`, newest first (without steps)."""

    runs: list[RunInfo]
