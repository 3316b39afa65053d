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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

from planner import PhysicalPlan, SpecError, SpecErrors, load_spec
from server.catalog import SPEC_SUFFIXES
from server.errors import (
    BadRefError,
    DuplicateNameError,
    GitError,
    PipelineNotFoundError,
    UnknownRefError,
)
from server.git_repo import NO_COMMIT, FileChange, GitRepo, TreeFile, check_ref
from server.store import PipelineRecord, Resolved, Store, content_hash

logger = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")
GIT_ACTOR = "git"
TREE_CACHE = 256  # commits whose spec files are remembered
BLOB_CACHE = 4096  # spec file contents, loaded
CHECK_CACHE = 4096  # validation results, by content and the names around it
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
        self._blobs: Lru[tuple[str, str], LoadedBlob] = Lru(BLOB_CACHE)
        self._checked: Lru[tuple[str, str, frozenset[str]], tuple[str, ...]] = Lru(CHECK_CACHE)
        self._stored: dict[tuple[str, str], PipelineRecord] = {}
        self._trees: Lru[str, list[GitSpec]] = Lru(TREE_CACHE)
        self._scan_context = threading.local()

    # -- following the branch --------------------------------------------------------------------

    def refresh(self) -> bool:
        """Scan the branch head if it moved; True when it did."""
        with self._lock:
            # Read under the lock: a head read before it could be older than one another
            # thread scanned meanwhile, and scanning it would move the registry back.
            head = self.repo.resolve(self.branch)
            if head == self._state.head:
                self._state.checked_at = _now()
                return False
            self._state = self._scan(head, self._state)
        return True

    def _scan(self, head: str, old: _State) -> _State:
        specs = self.specs_at(head)
        # A file that does not load still holds the name it had: it is broken, not deleted.
        by_path = {path: name for name, path in old.paths.items()}
        declared = {s.path: s.loaded.name or by_path.get(s.path) for s in specs}
        present = frozenset(n for n in declared.values() if n)
        new = _State(head=head, checked_at=_now(), paths=dict(old.paths))
        new.removed = {n: c for n, c in old.removed.items() if n not in present}
        new.removed |= {n: head for n in old.current if n not in present}
        try:
            problems, valid = self._head_problems(specs, present)
            for spec in specs:
                self._scan_one(
                    spec,
                    name=declared[spec.path],
                    problems=problems[spec.path],
                    old=old,
                    new=new,
                    names=valid,
                )
        finally:
            self._scan_context.head_names = None
        return new

    def _head_problems(
        self, specs: list[GitSpec], present: frozenset[str]
    ) -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
        """Problems of each spec of a head, and the names that validate there.

        A spec that calls an invalid one of its commit would fail when run, so the invalid
        names are taken away and the rest validated again, until nothing more breaks (each
        round removes a name, so this ends)."""
        counts = _name_counts(specs)
        names = present
        first: dict[str, tuple[str, ...]] | None = None
        while True:
            # While this thread scans, a plain name is what the head has, not the old state.
            self._scan_context.head_names = names
            problems = {s.path: self._problems(s, names, counts) for s in specs}
            first = first or problems
            broken = frozenset(s.loaded.name or "" for s in specs if problems[s.path]) & names
            broken |= present - frozenset(s.loaded.name for s in specs if s.loaded.name)
            if not broken & names:
                return _callee_notes(problems, first, present - names), names
            names -= broken

    def _problems(
        self, spec: GitSpec, names: frozenset[str], counts: dict[str, int]
    ) -> tuple[str, ...]:
        """What is wrong with one spec of a head: load, bind and plan errors, duplicate names."""
        problems = self._validate(spec, names)
        name = spec.loaded.name
        if name and counts[name] > 1:
            problems = (*problems, f"{counts[name]} files at this commit declare name {name!r}")
        return problems

    def _scan_one(
        self,
        spec: GitSpec,
        *,
        name: str | None,
        problems: tuple[str, ...],
        old: _State,
        new: _State,
        names: frozenset[str],
    ) -> None:
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
            commit = self.repo.resolve_published(label, branch=self.branch)
        except (BadRefError, UnknownRefError) as e:
            raise PipelineNotFoundError(ref, reason=_gone(e, label)) from e
        return self.lookup_at(name, commit, ref=ref)

    def lookup_at(self, name: str, commit: str, *, ref: str) -> Resolved:
        """`name` read from `commit` as `ref`: for commits the server resolved itself (the
        commit of a caller being run), so whether a branch or tag still holds it is not asked.
        `PipelineNotFoundError` when that commit has no spec of that name."""
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
        specs = self._trees.get(commit)
        if specs is None:
            specs = [
                GitSpec(commit=commit, path=f.path, blob=f.blob, loaded=self._load(f))
                for f in self.repo.files(commit)
                if _is_spec(f.path)
            ]
            self._trees.put(commit, specs)
        return specs

    def _load(self, file: TreeFile) -> LoadedBlob:
        fmt = SPEC_SUFFIXES[_suffix(file.path)]
        key = (file.blob, fmt)
        loaded = self._blobs.get(key)
        if loaded is None:
            size = file.size if file.size is not None else self.repo.blob_size(file.blob)
            loaded = (
                _load_blob(self.repo.blob(file.blob), fmt, file.path)
                if size <= self.max_spec_bytes
                else _too_large(file.path, size, fmt, self.max_spec_bytes)
            )
            self._blobs.put(key, loaded)
        return loaded

    def _validate(self, spec: GitSpec, names: frozenset[str]) -> tuple[str, ...]:
        """Problems of a spec file: load errors, then bind and plan errors (cached by blob and
        the pipeline names around it: a call to a pipeline binds only where that one exists)."""
        if spec.loaded.problems:
            return spec.loaded.problems
        key = (spec.blob, spec.loaded.fmt, names)
        problems = self._checked.get(key)
        if problems is None:
            try:
                self.compile(spec.loaded.text.encode(), spec.loaded.fmt, _source(spec), names)
                problems = ()
            except SpecErrors as e:
                problems = tuple(str(err) for err in e.errors)
            except SpecError as e:
                problems = (str(e),)
            self._checked.put(key, problems)
        return problems

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


class Lru(Generic[K, V]):
    """A thread-safe map that keeps its `size` most recently used entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value of `key` (now the most recently used), None when not held."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: K, value: V) -> None:
        """Hold `value`, dropping the least recently used entries beyond `size`."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _callee_notes(
    problems: dict[str, tuple[str, ...]], first: dict[str, tuple[str, ...]], dropped: frozenset[str]
) -> dict[str, tuple[str, ...]]:
    """Say why a spec that validated on its own broke once invalid names were taken away."""
    note = f"calls a pipeline that does not validate at this commit ({', '.join(sorted(dropped))})"
    return {
        path: (*found, note) if found and not first[path] else found
        for path, found in problems.items()
    }


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


def _gone(error: GitError, label: str) -> str:
    """The reason a ref does not resolve, with a hint when it looks like a vanished commit."""
    vanished = isinstance(error, UnknownRefError) and error.reason == NO_COMMIT
    if vanished and len(label) == 40 and all(c in "0123456789abcdef" for c in label):
        return f"commit {label} is not in the repository (history rewritten and collected?)"
    return str(error)


def _is_spec(path: str) -> bool:
    return not path.startswith(".") and _suffix(path) in SPEC_SUFFIXES


def _suffix(path: str) -> str:
    dot = path.rfind(".")
    return path[dot:].lower() if dot > 0 else ""


def _source(spec: GitSpec) -> str:
    return f"{spec.path}@{spec.commit[:12]}"


def _now() -> datetime:
    return datetime.now(UTC)
