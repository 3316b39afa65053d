"""Request and response bodies of the pipeline and run endpoints (msgspec Structs)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from server.git_registry import GitVersion
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
    # A git tag, branch or commit: the same as `name@ref` in the path, for refs with a `/`.
    ref: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


class RerunRequest(Struct, **_REQUEST):
    """Body of `POST /v1/runs/{run_id}/rerun`."""

    wait: bool = True
    stream: bool = False


class CommitRequest(Struct, **_REQUEST):
    """Who commits a POSTed spec to the pipelines repository, and why (`--commit-posted`)."""

    author: Annotated[str, Meta(max_length=300)]  # "Name <email>"
    message: Annotated[str, Meta(max_length=4000)] | None = None


class PipelineCreated(Struct, **_RESPONSE):
    """Answer to a registration: the version that holds this content (and, when the server
    commits posted specs, the commit)."""

    name: str
    version: int
    content_hash: str
    created: bool
    commit: str | None = None


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


class CommitVersion(Struct, **_RESPONSE):
    """One commit of a pipeline file's git history; `problems` when its spec does not
    validate there (such a commit is never served as the latest version)."""

    commit: str
    path: str
    tags: list[str]
    author: str
    date: str
    subject: str
    content_hash: str | None
    deleted: bool
    valid: bool
    problems: list[str]

    @classmethod
    def of(cls, version: GitVersion) -> CommitVersion:
        """The API view of a history entry."""
        return cls(
            commit=version.commit,
            path=version.path,
            tags=list(version.tags),
            author=version.author,
            date=version.date,
            subject=version.subject,
            content_hash=version.content_hash,
            deleted=version.deleted,
            valid=not version.deleted and not version.problems,
            problems=list(version.problems),
        )


class PipelineVersions(Struct, **_RESPONSE):
    """Body of `GET /v1/pipelines/{name}/versions`: stored versions oldest first, and (with a
    git registry) the commits of the pipeline's file, newest first, renames followed."""

    name: str
    versions: list[PipelineSummary]
    commits: list[CommitVersion] = []


class RegistryProblem(Struct, **_RESPONSE):
    """A spec of the branch head that does not validate."""

    commit: str
    path: str
    name: str | None
    problems: list[str]


class RegistryStatus(Struct, **_RESPONSE):
    """Body of `GET /v1/registry`: what the last scan of the branch found."""

    enabled: bool
    branch: str | None = None
    head: str | None = None
    checked_at: datetime | None = None
    pipelines: dict[str, str] = {}  # name -> commit of its served (latest valid) version
    removed: dict[str, str] = {}  # name -> commit that deleted it
    problems: list[RegistryProblem] = []


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
    ref: str | None
    rerun_of: str | None
    inputs: Any
    outputs: Any
    error: str | None
    failed_step: str | None
    total_tokens: int
    prompt_tokens: int
    completion_tokens: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    # What its `pipeline` steps resolved to: caller, ref, name, version, content_hash, commit.
    sub_pipelines: list[dict[str, Any]]
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
            ref=record.ref,
            rerun_of=record.rerun_of,
            inputs=record.inputs,
            outputs=record.outputs,
            error=record.error,
            failed_step=record.failed_step,
            total_tokens=record.total_tokens,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            duration_s=duration,
            sub_pipelines=record.sub_pipelines,
            steps=[StepInfo.of(s) for s in record.steps],
        )


class RunAccepted(Struct, **_RESPONSE):
    """Answer to `wait: false`: the run is queued; poll `GET /v1/runs/{run_id}`."""

    run_id: str
    status: str


class RunList(Struct, **_RESPONSE):
    """Body of `GET /v1/runs`, newest first (without steps)."""

    runs: list[RunInfo]
