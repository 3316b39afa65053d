"""The pipeline service: register, plan, explain and run stored pipelines.

The controllers stay thin: each calls one method here. Methods that touch the database or
compile a plan are synchronous and run in a worker thread (`asyncio.to_thread`); running is
async and hands off to the `RunManager`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from engine.errors import InvalidRequestError
from executor.backends import Backends, OpenAIBackend
from executor.cache import ResultCache
from planner import (
    Catalog,
    PhysicalPlan,
    PlannerError,
    Statistics,
    compile_text,
    explain,
    load_spec,
)
from server.catalog import build_catalog, spec_files, spec_format, split_ref
from server.config import LimitsConfig
from server.db import MAX_REF_CHARS
from server.errors import (
    CommitRequiredError,
    GitError,
    PayloadTooLargeError,
    PipelineNotFoundError,
    RerunMismatchError,
)
from server.git_registry import GitRegistry, GitVersion
from server.git_repo import GitRepo
from server.pipeline_types import CommitRequest, ExplainFormat, ExplainResponse
from server.runs import ActiveRun, RunManager, Runtime
from server.runtime import SubPipelineCall, SubPipelines, run_limits, statistics
from server.store import PipelineRecord, Provenance, Resolved, RunRecord, Store, content_hash
from tools import ToolRegistry

logger = logging.getLogger(__name__)

STARTUP_ACTOR = "startup"

# `name@<digits>`: a stored version (an int column) or, from 4 digits on, maybe a short sha.
MAX_VERSION_DIGITS = 9
MIN_SHORT_SHA = 4


class PipelineService:
    """Pipelines and runs over one store, one set of backends and tools, one catalog."""

    def __init__(
        self,
        store: Store,
        *,
        backends: Backends,
        tools: ToolRegistry,
        models: Callable[[str], bool],
        limits: LimitsConfig,
    ) -> None:
        self.store = store
        self.tools = tools
        self.models = models
        self.limits = limits
        self.stats = Statistics.empty()
        caps = run_limits(limits)
        runtime = Runtime(
            backends=backends,
            tools=tools,
            limits=caps,
            max_output_bytes=limits.max_stored_output_bytes,
            cache=ResultCache(),
            pipelines=SubPipelines(self._sub_plan, backends=backends, tools=tools, limits=caps),
        )
        self.backends = backends
        self.runs = RunManager(store, runtime, on_finished=self._analyzed)
        self.registry: GitRegistry | None = None
        self.commit_posted = False
        # Refs being resolved by this thread: a spec that names itself (a@v1 -> b -> a@v1)
        # must not make binding recurse forever (the run-time depth limit catches the cycle).
        self._resolving = threading.local()

    def use_git(self, path: str, *, branch: str, commit_posted: bool = False) -> GitRegistry:
        """Serve pipelines from the git repository at `path` and scan `branch` now."""
        self.registry = GitRegistry(
            GitRepo(path),
            branch=branch,
            store=self.store,
            compile=self._compile_git,
            max_spec_bytes=self.limits.max_spec_bytes,
        )
        self.commit_posted = commit_posted
        self.registry.refresh()
        return self.registry

    def reload(self) -> bool:
        """Follow new commits of the registry's branch; True when the head moved."""
        return self.registry.refresh() if self.registry is not None else False

    async def close(self) -> None:
        """Close provider connections and the database pool (after `runs.shutdown()`)."""
        for backend in self.backends.backends:
            if isinstance(backend, OpenAIBackend):
                await backend.aclose()
        await asyncio.to_thread(self.store.dispose)

    # -- planning (synchronous: call in a worker thread) -----------------------------------------

    def catalog(self) -> Catalog:
        """What specs may name right now: served models, registered tools, stored pipelines."""
        return build_catalog(
            models=self.models, tools=self.tools.schemas(), pipelines=self._has_pipeline
        )

    def refresh_statistics(self) -> None:
        """Reload the cost model's statistics from the database."""
        self.stats = statistics(self.store.statistics())

    def register(
        self, text: bytes, fmt: str | None, *, actor: str, commit: CommitRequest | None = None
    ) -> tuple[PipelineRecord, bool]:
        """Load, bind and store a spec; the flag is True when a new version was created.

        With `commit_posted` and a git registry, the spec is committed to the branch first
        (author and message from `commit`) and stored with that commit."""
        if len(text) > self.limits.max_spec_bytes:
            raise PayloadTooLargeError("the spec", len(text), self.limits.max_spec_bytes)
        fmt = fmt or _sniff(text)
        plan = compile_text(
            text, catalog=self.catalog(), stats=self.stats, fmt=fmt, source="<request>"
        )
        sha = self._commit_posted(plan, text, fmt, commit)
        stored = self.store.register_pipeline(
            plan.spec, text=text.decode("utf-8-sig"), fmt=fmt, actor=actor, commit=sha
        )
        if sha is not None and self.registry is not None:
            self.registry.refresh()  # serve the new commit now, not at the next poll
        return stored

    def _commit_posted(
        self, plan: PhysicalPlan, text: bytes, fmt: str, commit: CommitRequest | None
    ) -> str | None:
        """Commit a posted spec to the registry's branch when configured to; the new sha."""
        registry = self.registry
        if registry is None or not self.commit_posted:
            return None
        if commit is None:
            raise CommitRequiredError()
        name = plan.spec.name
        path = registry.path_of(name) or f"{name}.{fmt}"
        content = text
        if spec_format(Path(path)) == "json" and fmt != "json":
            content = json.dumps(msgspec.to_builtins(plan.spec), indent=2).encode() + b"\n"
        message = commit.message or f"{name}: update from POST /v1/pipelines"
        sha = registry.repo.commit_file(
            branch=registry.branch,
            path=path,
            content=content,
            author=commit.author,
            message=message,
        )
        return sha

    def plan(self, record: PipelineRecord) -> PhysicalPlan:
        """Compile a stored version against the current catalog and statistics."""
        text = record.spec_text.encode()
        return compile_text(
            text,
            catalog=self.catalog(),
            stats=self.stats,
            fmt=record.spec_format,
            source=f"{record.name}@{record.version}",
        )

    def resolve(self, ref: str) -> Resolved:
        """THE lookup of a pipeline by reference, for every endpoint (runs, explain, chat).

        - `name`: the latest valid version on the git branch when the registry knows the name,
          else the latest stored version;
        - `name@<n>` (digits): stored version n;
        - `name@<tag>`, `name@<branch>`, `name@<commit>` (full or unique short sha): the spec
          named `name` read from that exact commit (stored, with its commit, on first use);
        - `name@<label>` git does not resolve: the newest stored version whose spec declares
          `version: <label>` or whose commit starts with it (so a commit git has lost still
          resolves when it was used before).

        Raises `PipelineNotFoundError` naming the ref (404), `SpecErrors` when the spec at
        that ref does not validate (422). Synchronous: call it in a worker thread.
        """
        if len(ref) > MAX_REF_CHARS:
            raise PipelineNotFoundError(
                f"{ref[:64]}...", reason=f"a reference is at most {MAX_REF_CHARS} characters"
            )
        name, label = split_ref(ref)
        if label is not None and label.isdigit():
            stored = self._stored_version(name, label)
            if stored is not None:
                return stored
        if self.registry is None:
            record = self.store.resolve(ref) if label else self.store.get_pipeline(name)
            return Resolved.of(record, ref)
        try:
            found = self.registry.lookup(name, label)
        except PipelineNotFoundError as missing:
            if label is None:
                raise
            return self._stored_or(ref, missing)
        if found is not None:
            return found
        return Resolved.of(self.store.resolve(ref) if label else self.store.get_pipeline(name), ref)

    def _stored_version(self, name: str, label: str) -> Resolved | None:
        """`name@<digits>` as stored version n; None where git should try it as a short sha.

        Git abbreviates commits to hex, so a short sha may be all digits (`406893646`): when no
        such version is stored and a repository is configured, the caller asks git next."""
        version = int(label) if len(label) <= MAX_VERSION_DIGITS else None
        try:
            if version is None:
                raise PipelineNotFoundError(name, reason=f"no version {label[:32]}")
            return Resolved.of(self.store.get_pipeline(name, version), f"{name}@{label}")
        except PipelineNotFoundError:
            if self.registry is None or len(label) < MIN_SHORT_SHA:
                raise
            return None

    def _stored_or(self, ref: str, missing: PipelineNotFoundError) -> Resolved:
        """A stored version matching `ref`, else `missing` (which says why git did not).

        A commit git no longer has (a rewritten, collected branch) is still found when a run
        recorded it: the run's content hash names the stored spec it ran."""
        name, label = split_ref(ref)
        ran = self.store.run_commit(name, label or "")
        if ran is not None:
            record, commit = ran
            return Resolved(record=record, ref=ref, commit=commit)
        try:
            return Resolved.of(self.store.resolve(ref), ref)
        except PipelineNotFoundError:
            raise missing from None

    def plan_resolved(self, resolved: Resolved) -> PhysicalPlan:
        """Compile a resolved version; a spec read from a git commit binds the pipelines it
        calls by plain name against that commit (they are what its run will call)."""
        names = self._names_at(resolved.commit)
        if names is None:
            return self.plan(resolved.record)
        record = resolved.record
        source = f"{record.name}@{record.version}"
        return self._compile_git(record.spec_text.encode(), record.spec_format, source, names)

    def resolve_in(self, ref: str, commit: str | None) -> Resolved:
        """`resolve` for a `pipeline` step of a spec read from git commit `commit`: a plain
        name that commit has means its spec there (reproducible); `name@ref` and names the
        commit does not have (REST pipelines) resolve as anywhere else."""
        name, label = split_ref(ref)
        names = self._names_at(commit) if label is None else None
        if self.registry is None or commit is None or names is None or name not in names:
            return self.resolve(ref)
        # The caller's own commit, resolved by the server: read it even where no branch or tag
        # holds it any more (a request could not name it, but its caller ran from it).
        return self.registry.lookup_at(name, commit, ref=f"{name}@{commit}")

    def _names_at(self, commit: str | None) -> frozenset[str] | None:
        """The pipeline names of a registry commit; None without one or when git lacks it."""
        if commit is None or self.registry is None:
            return None
        return self.registry.names_at(commit)

    def _sub_plan(self, ref: str, commit: str | None) -> tuple[PhysicalPlan, SubPipelineCall]:
        """What a `pipeline` step runs (see `resolve_in`), and the record of it for the run."""
        resolved = self.resolve_in(ref, commit)
        record = resolved.record
        call = SubPipelineCall(
            caller=None,
            ref=ref,
            name=record.name,
            version=record.version,
            content_hash=record.content_hash,
            commit=resolved.commit,
        )
        return self.plan_resolved(resolved), call

    def chat_endpoint(self, ref: str) -> tuple[Resolved, PhysicalPlan] | None:
        """The pipeline a chat request's `model` names (`f1`, `f1@v1`: `resolve`), planned;
        None when no pipeline has that name. A pipeline whose spec has no `chat` section is
        not a chat model: `InvalidRequestError`."""
        try:
            resolved = self.resolve(ref)
        except PipelineNotFoundError:
            return None
        plan = self.plan_resolved(resolved)
        if plan.spec.chat is None:
            raise InvalidRequestError(
                f"pipeline {ref!r} is not a chat endpoint (its spec has no `chat` section)",
                param="model",
            )
        return resolved, plan

    def explain(self, name: str, version: int | None, fmt: ExplainFormat) -> ExplainResponse:
        """EXPLAIN a version (`name` may be `name@ref`): the plan with estimates and the
        critical path."""
        resolved = self.resolve(_ref(name, version))
        return _explained(resolved.record, self.plan_resolved(resolved), fmt, analyze=None)

    def chat_models(self) -> list[str]:
        """Names of the pipelines whose served version is a chat endpoint (`GET /v1/models`)."""
        return [r.name for r in self.latest_pipelines() if _is_chat(r.spec_text, r.spec_format)]

    def latest_pipelines(self) -> list[PipelineRecord]:
        """The version `name` serves, per pipeline: the branch's for git pipelines (an old
        commit resolved late is stored with a higher number, but does not become latest)."""
        latest = {r.name: r for r in self.store.latest_pipelines()}
        if self.registry is not None:
            latest |= {n: r.record for n, r in self.registry.served().items()}
        return [latest[name] for name in sorted(latest)]

    def git_versions(self, name: str) -> list[GitVersion]:
        """The git history of `name`'s file (empty without a registry or for REST pipelines)."""
        if self.registry is None:
            return []
        return self.registry.versions(name) or []

    def explain_run(self, run_id: str, fmt: ExplainFormat) -> ExplainResponse:
        """EXPLAIN ANALYZE a stored run: estimates next to what each step actually did."""
        run = self.store.get_run(run_id)
        record = self.store.get_pipeline(run.pipeline, run.version)
        analyze = {
            s.step: {
                "latency_s": s.duration_s,
                "tokens": s.tokens,
                "attempts": s.attempts,
                "status": s.status,
            }
            for s in run.steps
        }
        plan = self.plan_resolved(
            Resolved(record=record, ref=run.ref or run.pipeline, commit=run.commit)
        )
        return _explained(record, plan, fmt, analyze=analyze)

    def register_directory(self, directory: str | Path) -> list[PipelineRecord]:
        """Register every spec file of a directory; one that fails is logged and skipped."""
        registered = []
        for path in spec_files(directory):
            try:
                registered.append(self._register_file(path))
            except (PlannerError, OSError) as e:
                logger.error("%s: skipped: %s", path, e)
        return registered

    def _register_file(self, path: Path) -> PipelineRecord:
        text, fmt = path.read_bytes(), spec_format(path) or _sniff(path.read_bytes())
        plan = compile_text(
            text, catalog=self.catalog(), stats=self.stats, fmt=fmt, source=str(path)
        )
        record, created = self.store.register_pipeline(
            plan.spec, text=text.decode("utf-8-sig"), fmt=fmt, actor=STARTUP_ACTOR
        )
        logger.info(
            "pipeline %s@%d %s from %s",
            record.name,
            record.version,
            "registered" if created else "already registered",
            path,
        )
        return record

    def _has_pipeline(self, ref: str) -> bool:
        active: set[str] = self._resolving.__dict__.setdefault("refs", set())
        if ref in active:
            return True
        active.add(ref)
        try:
            self.resolve(ref)
        except (PipelineNotFoundError, PlannerError, GitError):
            return False
        finally:
            active.discard(ref)
        return True

    def _compile_git(
        self, text: bytes, fmt: str, source: str, names: frozenset[str]
    ) -> PhysicalPlan:
        """Compile a spec of the repository; `names` (its commit's other specs) count as known."""
        catalog = build_catalog(
            models=self.models,
            tools=self.tools.schemas(),
            pipelines=lambda ref: split_ref(ref)[0] in names or self._has_pipeline(ref),
        )
        return compile_text(text, catalog=catalog, stats=self.stats, fmt=fmt, source=source)

    def _analyzed(self, _plan: PhysicalPlan, _run: RunRecord) -> None:
        self.refresh_statistics()

    # -- running ---------------------------------------------------------------------------------

    async def start_run(
        self,
        name: str,
        version: int | None,
        inputs: dict[str, Any],
        *,
        actor: str,
        subscribe: bool = False,
    ) -> ActiveRun:
        """Resolve `name` (or `name@ref`, or version `version`), plan it and start a run of it
        (`InputError` before anything starts); the run records the ref and the commit."""
        resolved = await asyncio.to_thread(self.resolve, _ref(name, version))
        return await self.start_resolved(resolved, inputs, actor=actor, subscribe=subscribe)

    async def start_resolved(
        self,
        resolved: Resolved,
        inputs: dict[str, Any],
        *,
        actor: str,
        subscribe: bool = False,
        rerun_of: str | None = None,
        plan: PhysicalPlan | None = None,
    ) -> ActiveRun:
        """Plan a resolved pipeline (unless `plan` is its plan already) and start a run of it,
        recording where its spec came from."""
        if plan is None:
            plan = await asyncio.to_thread(self.plan_resolved, resolved)
        provenance = Provenance(ref=resolved.ref, commit=resolved.commit, rerun_of=rerun_of)
        return await self.runs.start(
            resolved.record,
            plan,
            inputs,
            actor=actor,
            subscribe=subscribe,
            provenance=provenance,
        )

    async def rerun(self, run_id: str, *, actor: str, subscribe: bool = False) -> ActiveRun:
        """Run a recorded run again with the exact spec it ran (checked by content hash) and
        the inputs it was given, whatever the branch says now."""
        resolved = await asyncio.to_thread(self._recorded_spec, run_id)
        run = await asyncio.to_thread(self.store.get_run, run_id)
        return await self.start_resolved(
            resolved, run.inputs, actor=actor, subscribe=subscribe, rerun_of=run_id
        )

    def _recorded_spec(self, run_id: str) -> Resolved:
        run = self.store.get_run(run_id)
        record = self.store.pipeline_by_hash(run.pipeline, run.content_hash)
        actual = content_hash(load_spec(record.spec_text, fmt=record.spec_format))
        if actual != run.content_hash:
            raise RerunMismatchError(run_id, run.content_hash, actual)
        return Resolved(record=record, ref=run.ref or run.pipeline, commit=run.commit)


def _ref(name: str, version: int | None) -> str:
    """`name@version` when a version number is given, else `name` as written (maybe name@ref)."""
    return f"{split_ref(name)[0]}@{version}" if version is not None else name


@functools.lru_cache(maxsize=1024)
def _is_chat(spec_text: str, spec_format: str) -> bool:
    """Whether a stored spec has a `chat` section (stored specs are valid; cached by content)."""
    return load_spec(spec_text, fmt=spec_format).chat is not None  # type: ignore[arg-type]


def _sniff(text: bytes) -> str:
    """JSON when the body starts like a JSON object, else YAML (JSON is YAML too)."""
    return "json" if text.lstrip()[:1] in (b"{", b"[") else "yaml"


def _explained(
    record: PipelineRecord,
    plan: PhysicalPlan,
    fmt: ExplainFormat,
    *,
    analyze: dict[str, Any] | None,
) -> ExplainResponse:
    rendered = explain(plan, fmt, analyze=analyze)
    return ExplainResponse(
        name=record.name,
        version=record.version,
        content_hash=record.content_hash,
        format=fmt,
        plan=json.loads(rendered) if fmt == "json" else rendered,
    )


def spec_document(record: PipelineRecord) -> dict[str, Any]:
    """The stored spec as a JSON object (parsed from its text)."""
    return msgspec.to_builtins(load_spec(record.spec_text, fmt=record.spec_format))
