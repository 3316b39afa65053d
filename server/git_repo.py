"""A local git repository of pipeline specs, read (and optionally written) through the git CLI.

The git CLI rather than a Python library: it is installed wherever a pipelines repository is,
adds no dependency, and gives git's exact semantics for what this module needs (`rev-parse`
for tags, branches and unique short commits; `log --follow` for renames; `cat-file` for the
content of any commit still in the object store, reachable or not).

Every user-supplied ref is checked against a strict pattern before git sees it and is passed
after `--end-of-options`, so a ref can never be read as an option. Content is always read from
an exact commit (`<sha>:<path>`), never from the working tree.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from server.errors import (
    BadRefError,
    GitConflictError,
    GitError,
    InvalidAuthorError,
    UnknownRefError,
)

GIT_TIMEOUT_S = 30
ZERO_SHA = "0" * 40
# Branch, tag or (short) commit: no options, ranges, reflog or revision syntax (`~ ^ : @{`).
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_AUTHOR = re.compile(r"^(?P<name>[^<>\n]{1,100}) <(?P<email>[^<>\s]{1,200})>$")
# Git ignores these when it reads identity and commit data; we refuse them outright.
# Literal pathspecs: a spec file named `a*.yaml` is that file, not a glob over its neighbours.
_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",
    "LC_ALL": "C",
    "GIT_LITERAL_PATHSPECS": "1",
}
_HEX = re.compile(r"^[0-9a-f]{4,40}$")
NO_COMMIT = "names no commit"
# One writer per repository at a time, across every GitRepo object of this process.
_WRITE_LOCKS: dict[Path, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(git_dir: Path) -> threading.Lock:
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(git_dir, threading.Lock())


def check_ref(ref: str) -> str:
    """`ref` when it is a plain branch, tag or commit name; `BadRefError` otherwise."""
    if not _REF.match(ref) or ".." in ref or "//" in ref or ref.endswith((".lock", "/", ".")):
        raise BadRefError(ref)
    return ref


def parse_author(author: str) -> tuple[str, str]:
    """`Name <email>` -> (name, email); `GitError` for anything else."""
    match = _AUTHOR.match(author.strip())
    if not match:
        raise InvalidAuthorError(author)
    return match.group("name").strip(), match.group("email")


@dataclass(frozen=True, kw_only=True)
class FileChange:
    """One commit in a file's history: the path it had there and its blob (None: deleted)."""

    commit: str
    path: str
    blob: str | None
    author: str
    date: str
    subject: str


@dataclass(frozen=True, kw_only=True)
class TreeFile:
    """A file of a commit's tree."""

    path: str
    blob: str
    size: int | None = None  # None: not listed (ask `blob_size`)


class GitRepo:
    """Read-mostly access to one local repository (bare or not)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        if not self.path.exists():
            raise GitError(f"{self.path}: no such directory")
        self.git_dir = Path(self.run("rev-parse", "--absolute-git-dir").strip())

    def run(self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
        """Run git in the repository; its stdout, or `GitError` with its stderr."""
        return self.run_bytes(*args, stdin=stdin, env=env).decode("utf-8", "replace")

    def run_bytes(
        self, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
    ) -> bytes:
        """Run git; raw stdout."""
        try:
            done = subprocess.run(
                ["git", "-C", str(self.path), *args],
                input=stdin,
                capture_output=True,
                timeout=GIT_TIMEOUT_S,
                env={**os.environ, **_ENV, **(env or {})},
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise GitError(f"git {args[0]}: {e}") from e
        if done.returncode != 0:
            message = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise GitError(f"git {args[0]}: {message[-1] if message else done.returncode}")
        return done.stdout

    # -- commits and refs ------------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """The full sha of the commit `ref` names (branch, tag, full or unique short sha)."""
        check_ref(ref)
        try:
            out = self.run("rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}")
        except GitError as e:
            reason = "is an ambiguous short commit" if _ambiguous(self, ref) else NO_COMMIT
            raise UnknownRefError(ref, reason) from e
        return out.strip()

    def resolve_published(self, ref: str, *, branch: str) -> str:
        """The commit a request's `ref` names among what the server publishes: a tag, a branch,
        or a commit (full or unique short sha) in the history of `branch` or of a tag.

        Never HEAD, the stash, remote-tracking refs, notes, or commits no branch or tag holds:
        they carry content nobody committed to the served history. `UnknownRefError` otherwise.
        """
        check_ref(ref)
        for full in (f"refs/tags/{ref}", f"refs/heads/{ref}"):
            sha = self._peeled(full)
            if sha is not None:
                return sha
        sha = self._commit_by_id(ref)
        if not self.published(sha, branch):
            raise UnknownRefError(ref, f"is not in the history of branch {branch} or of a tag")
        return sha

    def published(self, sha: str, branch: str) -> bool:
        """Whether commit `sha` is in the history of `branch` or of any tag."""
        out = self.run(
            "for-each-ref",
            "--count=1",
            "--format=%(refname)",
            "--contains",
            sha,
            f"refs/heads/{check_ref(branch)}",
            "refs/tags",
        )
        return bool(out.strip())

    def _peeled(self, full_ref: str) -> str | None:
        """The commit of a full ref name (`refs/tags/x`), None when there is no such ref."""
        try:
            out = self.run(
                "rev-parse", "--verify", "-q", "--end-of-options", f"{full_ref}^{{commit}}"
            )
        except GitError:
            return None
        return out.strip()

    def _commit_by_id(self, ref: str) -> str:
        """The commit whose sha is (or starts with) `ref`, by object id only, never by ref name."""
        if not _HEX.match(ref):
            raise UnknownRefError(ref, NO_COMMIT)
        candidates = [ref] if len(ref) == 40 else _prefixed(self, ref)
        listing = self.run(
            "cat-file",
            "--batch-check=%(objecttype) %(objectname)",
            stdin="\n".join(candidates).encode(),
        )
        commits = [line.split()[1] for line in listing.splitlines() if line.startswith("commit ")]
        if len(commits) > 1:
            raise UnknownRefError(ref, "is an ambiguous short commit")
        if not commits:
            raise UnknownRefError(ref, NO_COMMIT)
        return commits[0]

    def has_commit(self, sha: str) -> bool:
        """Whether the object store still holds commit `sha` (reachable or not)."""
        if not _SHA.match(sha):
            return False
        try:
            self.run("cat-file", "-e", f"{sha}^{{commit}}")
        except GitError:
            return False
        return True

    def tags(self) -> dict[str, list[str]]:
        """Commit sha -> names of the tags on it (annotated tags peeled to their commit)."""
        out = self.run(
            "for-each-ref", "--format=%(objectname) %(*objectname) %(refname:short)", "refs/tags"
        )
        tags: dict[str, list[str]] = {}
        for line in out.splitlines():
            obj, peeled, name = line.split(" ", 2)
            tags.setdefault(peeled or obj, []).append(name)
        return tags

    def is_ancestor(self, sha: str, branch: str) -> bool:
        """Whether `sha` is in the history of `branch` (False after a history rewrite)."""
        try:
            self.run("merge-base", "--is-ancestor", sha, f"refs/heads/{check_ref(branch)}")
        except GitError:
            return False
        return True

    # -- trees and content -----------------------------------------------------------------------

    def files(self, sha: str) -> list[TreeFile]:
        """The files at the top of commit `sha`'s tree, with their sizes."""
        out = self.run("ls-tree", "-l", "-z", sha)
        files = []
        for entry in filter(None, out.split("\0")):
            meta, path = entry.split("\t", 1)
            _mode, kind, blob, size = meta.split()
            if kind == "blob":
                files.append(TreeFile(path=path, blob=blob, size=int(size)))
        return files

    def blob_size(self, blob: str) -> int:
        """The size of a blob in bytes, without reading it."""
        return int(self.run("cat-file", "-s", blob).strip())

    def blob(self, blob: str) -> bytes:
        """The content of a blob."""
        return self.run_bytes("cat-file", "blob", blob)

    def history(self, branch_or_sha: str, path: str) -> list[FileChange]:
        """Commits that changed `path` (following renames), newest first, from `branch_or_sha`."""
        out = self.run(
            "log",
            "--follow",
            "--no-abbrev",
            "--raw",
            "-z",
            "--format=%x01%H%x00%an <%ae>%x00%aI%x00%s%x00",
            branch_or_sha,
            "--",
            path,
        )
        return [change for record in out.split("\x01")[1:] if (change := _change(record))]

    # -- writing ---------------------------------------------------------------------------------

    def commit_file(
        self, *, branch: str, path: str, content: bytes, author: str, message: str
    ) -> str:
        """Commit `content` at `path` on `branch` without touching any working tree.

        Plumbing only (hash-object, a private index, write-tree, commit-tree) and a
        compare-and-swap `update-ref`, so a concurrent push makes this fail instead of being
        overwritten. Returns the new commit's sha (the branch head when nothing changed).
        """
        name, email = parse_author(author)
        # Serialized per repository: each commit's parent is the one before it, so concurrent
        # posts all land instead of failing the compare-and-swap (or worse, racing on an index).
        with _write_lock(self.git_dir):
            return self._commit_file(
                branch=branch, path=path, content=content, identity=(name, email), message=message
            )

    def _commit_file(
        self, *, branch: str, path: str, content: bytes, identity: tuple[str, str], message: str
    ) -> str:
        parent = self.resolve(branch)
        blob = self.run("hash-object", "-w", "--stdin", stdin=content).strip()
        tree = self._tree_with(parent, path, blob)
        if tree == self.run("rev-parse", f"{parent}^{{tree}}").strip():
            return parent  # the branch holds this content already: nothing to commit
        env = {
            "GIT_AUTHOR_NAME": identity[0],
            "GIT_AUTHOR_EMAIL": identity[1],
            "GIT_COMMITTER_NAME": "compound",
            "GIT_COMMITTER_EMAIL": "compound@localhost",
        }
        sha = self.run("commit-tree", tree, "-p", parent, stdin=message.encode(), env=env).strip()
        try:
            self.run("update-ref", f"refs/heads/{branch}", sha, parent)
        except GitError as e:
            raise GitConflictError(f"branch {branch} moved while committing; try again") from e
        return sha

    def _tree_with(self, parent: str, path: str, blob: str) -> str:
        """The tree of `parent` with `blob` at `path`, built in a scratch index of its own (a
        shared one would let one commit write another's half-built tree)."""
        with tempfile.TemporaryDirectory(dir=self.git_dir, prefix="compound-index-") as scratch:
            index = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
            self.run("read-tree", parent, env=index)
            self.run("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=index)
            return self.run("write-tree", env=index).strip()


def _prefixed(repo: GitRepo, prefix: str) -> list[str]:
    """Every object whose sha starts with `prefix` (4 hex digits or more)."""
    try:
        return repo.run("rev-parse", "--disambiguate=" + prefix).split()
    except GitError:
        return []


def _ambiguous(repo: GitRepo, ref: str) -> bool:
    """Whether a hex `ref` is the prefix of more than one object."""
    if not re.fullmatch(r"[0-9a-f]{4,39}", ref):
        return False
    try:
        matches = repo.run("rev-parse", "--disambiguate=" + ref).split()
    except GitError:
        return False
    return len(matches) > 1


def _change(record: str) -> FileChange | None:
    """One `log --raw -z` record: sha, author, date, subject, then `:modes shas status`, path
    (a rename or copy names the old path, then the new one)."""
    fields = record.split("\0")
    raw_at = next((i for i, f in enumerate(fields) if f.lstrip().startswith(":")), None)
    if raw_at is None or raw_at < 4 or len(fields) <= raw_at + 1:
        return None
    meta = fields[raw_at].split()
    new_blob, status = meta[3], meta[4]
    renamed = status[:1] in ("R", "C") and len(fields) > raw_at + 2
    return FileChange(
        commit=fields[0].strip(),
        path=fields[raw_at + 2] if renamed else fields[raw_at + 1],
        blob=None if new_blob == ZERO_SHA else new_blob,
        author=fields[1],
        date=fields[2],
        subject=fields[3],
    )
