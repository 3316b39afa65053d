"""Pipelines kept as spec files in a git repository: `name`, `name@<tag|branch|commit>`.

A pipeline is the spec file (at the top of the repository) whose `name:` is that name. Its
content is always read from one exact commit, so every version stays runnable after the file
changes, moves or is deleted, and after the branch is rewritten, as long as git still holds the
commit. What was ever resolved is also stored in the database with its commit and content
hash, so a commit that git has since garbage-collected still resolves from there.

`refresh()` follows the configured branch: each new head is scanned, every spec compiled
against the server's catalog; a valid one becomes the latest version of its name, an invalid
one is reported (`status()`, the versions listing, the log) and leaves the last good version in
place. Blobs are immutable, so what a blob loads to is cached by its id.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from planner import PhysicalPlan, SpecError, SpecErrors, load_spec
from server.catalog import SPEC_SUFFIXES
from server.errors import (
    BadRefError,
    DuplicateNameError,
    GitError,
    PipelineNotFoundError,
    UnknownRefError,
)
from server.git_repo import FileChange, GitRepo, TreeFile, check_ref
from server.store import PipelineRecord, Resolved, Store, content_hash

logger = logging.getLogger(__name__)

GIT_ACTOR = "git"
TREE_CACHE = 256  # commits whose spec files are remembered
DEFAULT_MAX_SPEC_BYTES = 256 * 1024
# Compiles spec text against the server's catalog: (text, format, source, names) -> plan, where
# `names` are pipeline names that count as registered (the other specs of the same commit).
Compile = Callable[[bytes, str, str, frozenset[str]], PhysicalPlan]


@dataclass(frozen=True, kw_only=True)
class LoadedBlob:
    """What one spec file's content loads to: its name and hash, or why it does not load."""

    text: str
    fmt: str
    name: str | None
    content_hash: str | None
    problems: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class GitSpec:
    """A spec file of one commit."""

    commit: str
    path: str
    blob: str
    loaded: LoadedBlob


@dataclass(frozen=True, kw_only=True)
class Problem:
    """A spec of the branch head that does not validate (its name keeps its last good version)."""

    commit: str
    path: str
    name: str | None
    messages: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class GitVersion:
    """One commit of a pipeline file's history."""

    commit: str
    path: str
    tags: tuple[str, ...]
    author: str
    date: str
    subject: str
    content_hash: str | None
    deleted: bool
    problems: tuple[str, ...]


@dataclass(kw_only=True)
class _State:
    """What the last scan of the branch found."""

    head: str | None = None
    checked_at: datetime | None = None
    current: dict[str, Resolved] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)  # last known path, deleted ones too
    removed: dict[str, str] = field(default_factory=dict)  # name -> commit that removed it
    problems: list[Problem] = field(default_factory=list)


class GitRegistry:
    """The git-backed registry over one repository and branch; safe across threads."""

    def __init__(
        self,
        repo: GitRepo,
        *,
        branch: str,
        store: Store,
        compile: Compile,
        max_spec_bytes: int = DEFAULT_MAX_SPEC_BYTES,
    ) -> None:
        self.repo = repo
        self.max_spec_bytes = max_spec_bytes
        self.branch = check_ref(branch)
        self.store = store
        self.compile = compile
        self._state = _State()
        self._lock = threading.Lock()
        self._blobs: dict[tuple[str, str], LoadedBlob] = {}
        self._checked: dict[tuple[str, str, frozenset[str]], tuple[str, ...]] = {}
        self._stored: dict[tuple[str, str], PipelineRecord] = {}
        self._trees: dict[str, list[GitSpec]] = {}
        self._cache_lock = threading.Lock()
        self._scan_context = threading.local()

    # -- following the branch --------------------------------------------------------------------

    def refresh(self) -> bool:
        """Scan the branch head if it moved; True when it did."""
        head = self.repo.resolve(self.branch)
        with self._lock:
            if head == self._state.head:
                self._state.checked_at = _now()
                return False
            self._state = self._scan(head, self._state)
        return True

    def _scan(self, head: str, old: _State) -> _State:
        specs = self.specs_at(head)
        names = frozenset(s.loaded.name for s in specs if s.loaded.name)
        new = _State(head=head, checked_at=_now(), paths=dict(old.paths))
        new.removed = {n: c for n, c in old.removed.items() if n not in names}
        new.removed |= {n: head for n in old.current if n not in names}
        counts = _name_counts(specs)
        # While this thread scans, a plain name is what the new head has, not the old state.
        self._scan_context.head_names = names
        try:
            for spec in specs:
                self._scan_one(spec, names, counts, old, new)
        finally:
            self._scan_context.head_names = None
        return new

    def _scan_one(
        self, spec: GitSpec, names: frozenset[str], counts: dict[str, int], old: _State, new: _State
    ) -> None:
        name = spec.loaded.name
        problems = self._validate(spec, names)
        if name and counts[name] > 1:
            problems = (*problems, f"{counts[name]} files at this commit declare name {name!r}")
        if name:
            new.paths[name] = spec.path
        if problems or name is None:  # no name: the file did not load, so it has problems
            new.problems.append(
                Problem(commit=spec.commit, path=spec.path, name=name, messages=problems)
            )
            logger.warning("%s@%s: invalid, not served: %s", spec.path, spec.commit[:12], problems)
            if name and name in old.current:
                new.current[name] = old.current[name]  # the last good version stays
            return
        new.current[name] = self._ingest(spec, ref=name, names=names)

    # -- resolving -------------------------------------------------------------------------------

    def lookup(self, name: str, label: str | None) -> Resolved | None:
        """`name` (latest good version on the branch) or `name@label`; None when git does not
        know the name at all (REST-registered pipelines), `PipelineNotFoundError` naming the
        ref when the name is known but the ref does not resolve."""
        if label is None:
            return self._latest(name)
        ref = f"{name}@{label}"
        try:
            commit = self.repo.resolve(label)
        except (BadRefError, UnknownRefError) as e:
            raise PipelineNotFoundError(ref, reason=_gone(str(e), label)) from e
        specs = self.specs_at(commit)
        spec = named(specs, name)
        if spec is None:
            raise PipelineNotFoundError(ref, reason=f"no spec named {name!r} at commit {commit}")
        # Pipelines its steps call by plain name count as known if that commit had them.
        names = frozenset(s.loaded.name for s in specs if s.loaded.name)
        return self._ingest(spec, ref=ref, names=names)

    def names_at(self, commit: str) -> frozenset[str] | None:
        """The pipeline names the specs of `commit` declare; None when git does not have it."""
        if not commit or any(c not in "0123456789abcdef" for c in commit):
            return None  # not a commit id this server recorded
        try:
            specs = self.specs_at(commit)
        except GitError:
            logger.warning("commit %s is not in the repository: plain names resolve today", commit)
            return None
        return frozenset(s.loaded.name for s in specs if s.loaded.name)

    def _latest(self, name: str) -> Resolved | None:
        state = self._state
        scanning = getattr(self._scan_context, "head_names", None)
        if scanning is not None and name not in scanning and name in state.paths:
            raise PipelineNotFoundError(name, reason="not in the commit being scanned")
        if name in state.current:
            return state.current[name]
        if name in state.removed:
            at = state.removed[name]
            raise PipelineNotFoundError(
                name, reason=f"deleted from branch {self.branch} at commit {at}"
            )
        return None

    def _ingest(self, spec: GitSpec, *, ref: str, names: frozenset[str]) -> Resolved:
        """Compile and store the spec (`SpecErrors` when it does not validate); a blob is
        stored once, later resolutions of the same content skip the database."""
        key = (spec.blob, spec.loaded.fmt)
        record = self._stored.get(key)
        if record is None:
            plan = self.compile(spec.loaded.text.encode(), spec.loaded.fmt, _source(spec), names)
            record, _ = self.store.register_pipeline(
                plan.spec,
                text=spec.loaded.text,
                fmt=spec.loaded.fmt,
                actor=GIT_ACTOR,
                commit=spec.commit,
            )
            self._stored[key] = record
        return Resolved(record=record, ref=ref, commit=spec.commit, path=spec.path)

    # -- reading ---------------------------------------------------------------------------------

    def specs_at(self, commit: str) -> list[GitSpec]:
        """The spec files at the top of a commit (dot files left out), loaded; a commit's tree
        never changes, so the newest `TREE_CACHE` of them are remembered."""
        with self._cache_lock:
            specs = self._trees.pop(commit, None)
        if specs is None:
            specs = [
                GitSpec(commit=commit, path=f.path, blob=f.blob, loaded=self._load(f))
                for f in self.repo.files(commit)
                if _is_spec(f.path)
            ]
        with self._cache_lock:
            self._trees[commit] = specs  # re-inserted: dicts keep order, the oldest goes first
            while len(self._trees) > TREE_CACHE:
                self._trees.pop(next(iter(self._trees)))
        return specs

    def _load(self, file: TreeFile) -> LoadedBlob:
        fmt = SPEC_SUFFIXES[_suffix(file.path)]
        key = (file.blob, fmt)
        if key not in self._blobs:
            size = file.size if file.size is not None else self.repo.blob_size(file.blob)
            self._blobs[key] = (
                _load_blob(self.repo.blob(file.blob), fmt, file.path)
                if size <= self.max_spec_bytes
                else _too_large(file.path, size, fmt, self.max_spec_bytes)
            )
        return self._blobs[key]

    def _validate(self, spec: GitSpec, names: frozenset[str]) -> tuple[str, ...]:
        """Problems of a spec file: load errors, then bind and plan errors (cached by blob and
        the pipeline names around it: a call to a pipeline binds only where that one exists)."""
        if spec.loaded.problems:
            return spec.loaded.problems
        key = (spec.blob, spec.loaded.fmt, names)
        if key not in self._checked:
            try:
                self.compile(spec.loaded.text.encode(), spec.loaded.fmt, _source(spec), names)
                self._checked[key] = ()
            except SpecErrors as e:
                self._checked[key] = tuple(str(err) for err in e.errors)
            except SpecError as e:
                self._checked[key] = (str(e),)
        return self._checked[key]

    def served(self) -> dict[str, Resolved]:
        """The version each pipeline of the branch serves as `name`."""
        return dict(self._state.current)

    def path_of(self, name: str) -> str | None:
        """The file that holds (or last held) `name` on the branch."""
        return self._state.paths.get(name)

    def versions(self, name: str) -> list[GitVersion] | None:
        """The history of the file holding `name` on the branch (renames followed), newest
        first; None when git does not know the name."""
        path = self.path_of(name)
        if path is None:
            return None
        tags = self.repo.tags()
        names = frozenset(self._state.current) | {name}
        return [
            self._version(change, tags.get(change.commit, []), names)
            for change in self.repo.history(f"refs/heads/{self.branch}", path)
        ]

    def _version(self, change: FileChange, tags: list[str], names: frozenset[str]) -> GitVersion:
        """One history entry: what the file held at that commit, and whether it validates."""
        spec = None
        if change.blob is not None:
            loaded = self._load(TreeFile(path=change.path, blob=change.blob))
            spec = GitSpec(commit=change.commit, path=change.path, blob=change.blob, loaded=loaded)
        return GitVersion(
            commit=change.commit,
            path=change.path,
            tags=tuple(tags),
            author=change.author,
            date=change.date,
            subject=change.subject,
            content_hash=spec.loaded.content_hash if spec else None,
            deleted=spec is None,
            problems=self._validate(spec, names) if spec else (),
        )

    def status(self) -> _State:
        """A snapshot of what the last scan found."""
        return self._state


def named(specs: list[GitSpec], name: str) -> GitSpec | None:
    """The spec of `specs` declaring `name`; `DuplicateNameError` when several do."""
    found = [s for s in specs if s.loaded.name == name]
    if len(found) > 1:
        raise DuplicateNameError(name, found[0].commit, [s.path for s in found])
    return found[0] if found else None


def read_specs(
    repo: GitRepo, commit: str, *, max_bytes: int = DEFAULT_MAX_SPEC_BYTES
) -> list[GitSpec]:
    """The spec files at the top of `commit`, loaded (no cache: for one-off commands)."""
    specs = []
    for f in repo.files(commit):
        if not _is_spec(f.path):
            continue
        fmt = SPEC_SUFFIXES[_suffix(f.path)]
        size = f.size or 0
        loaded = (
            _load_blob(repo.blob(f.blob), fmt, f.path)
            if size <= max_bytes
            else _too_large(f.path, size, fmt, max_bytes)
        )
        specs.append(GitSpec(commit=commit, path=f.path, blob=f.blob, loaded=loaded))
    return specs


def _load_blob(data: bytes, fmt: str, path: str) -> LoadedBlob:
    text = data.decode("utf-8-sig", "replace")
    try:
        spec = load_spec(data, fmt=fmt, source=path)  # type: ignore[arg-type]
    except SpecErrors as e:
        problems = tuple(str(err) for err in e.errors)
        return LoadedBlob(text=text, fmt=fmt, name=None, content_hash=None, problems=problems)
    return LoadedBlob(
        text=text, fmt=fmt, name=spec.name, content_hash=content_hash(spec), problems=()
    )


def _too_large(path: str, size: int, fmt: str, limit: int) -> LoadedBlob:
    """A file over the spec size limit: reported, never read (a repository is input too)."""
    problem = f"{path}: {size} bytes; the limit for a spec is {limit}"
    return LoadedBlob(text="", fmt=fmt, name=None, content_hash=None, problems=(problem,))


def _name_counts(specs: list[GitSpec]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in specs:
        if s.loaded.name:
            counts[s.loaded.name] = counts.get(s.loaded.name, 0) + 1
    return counts


def _gone(message: str, label: str) -> str:
    """The reason a ref does not resolve, with a hint when it looks like a vanished commit."""
    if len(label) == 40 and all(c in "0123456789abcdef" for c in label):
        return f"commit {label} is not in the repository (history rewritten and collected?)"
    return message


def _is_spec(path: str) -> bool:
    return not path.startswith(".") and _suffix(path) in SPEC_SUFFIXES


def _suffix(path: str) -> str:
    dot = path.rfind(".")
    return path[dot:].lower() if dot > 0 else ""


def _source(spec: GitSpec) -> str:
    return f"{spec.path}@{spec.commit[:12]}"


def _now() -> datetime:
    return datetime.now(UTC)
