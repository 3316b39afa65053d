"""Cost of resolving pipelines from a git repository, against the database-only lookup.

    python bench/git_registry.py [--pipelines 20] [--commits 50] [--repeat 50]

Builds a temporary repository of `--pipelines` tool-only specs with `--commits` commits (a
tag every tenth), serves it through `PipelineService.use_git`, and times (median, ms):
the first scan of the head, a poll that finds nothing new, `name` (the served version),
`name@<n>` (a stored version: the baseline, the database-only path every server had before),
`name@<tag>` and `name@<sha>` (git rev-parse + ls-tree; blobs cached), the versions listing
(`log --follow` over the file's history) and a scan after one new commit. Prints one JSON
object, with each lookup's ratio to the baseline.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from executor.backends import Backends
from server.config import LimitsConfig
from server.service import PipelineService
from server.store import Store
from tools import ToolsConfig, default_registry

GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
}
SPEC = """\
name: p{i}
tools: [calc]
steps:
  value:
    tool: calc
    args: {{expression: "{i} + {n}"}}
outputs:
  value: "{{{{ steps.value.output }}}}"
"""


def git(repo: Path, *args: str) -> str:
    """Run git in `repo`."""
    env = {**os.environ, **GIT_ENV}
    done = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, check=True)
    return done.stdout.decode().strip()


def build_repo(repo: Path, pipelines: int, commits: int) -> None:
    """`pipelines` spec files; each commit rewrites one of them; a tag every tenth commit."""
    git(repo, "init", "-q", "-b", "main")
    for i in range(pipelines):
        (repo / f"p{i}.yaml").write_text(SPEC.format(i=i, n=0))
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "initial")
    for n in range(1, commits):
        i = n % pipelines
        (repo / f"p{i}.yaml").write_text(SPEC.format(i=i, n=n))
        git(repo, "commit", "-q", "-am", f"change p{i}")
        if n % 10 == 0:
            git(repo, "tag", f"v{n // 10}")


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of `fn` in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 4)


def service(folder: Path) -> PipelineService:
    """A pipeline service over a scratch SQLite database, no models (specs use tools only)."""
    store = Store.open(f"sqlite:///{folder / 'bench.db'}")
    return PipelineService(
        store,
        backends=Backends([]),
        tools=default_registry(ToolsConfig()),
        models=lambda _: True,
        limits=LimitsConfig(),
    )


def measure(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of the benchmark."""
    repo = folder / "repo"
    repo.mkdir()
    build_repo(repo, args.pipelines, args.commits)
    svc = service(folder)
    start = time.perf_counter()
    svc.use_git(str(repo), branch="main")
    first_scan = (time.perf_counter() - start) * 1000
    sha = git(repo, "rev-parse", "v1")
    version = svc.resolve("p0").record.version
    svc.resolve(f"p0@{sha}")  # warm the blob caches once, as a server that served it has
    figures = {
        "baseline_db_name_at_int_ms": median_ms(lambda: svc.resolve(f"p0@{version}"), args.repeat),
        "name_ms": median_ms(lambda: svc.resolve("p0"), args.repeat),
        "name_at_tag_ms": median_ms(lambda: svc.resolve("p0@v1"), args.repeat),
        "name_at_sha_ms": median_ms(lambda: svc.resolve(f"p0@{sha[:10]}"), args.repeat),
        "versions_listing_ms": median_ms(lambda: svc.git_versions("p0"), max(5, args.repeat // 5)),
        "poll_no_change_ms": median_ms(svc.reload, args.repeat),
    }
    (repo / "p1.yaml").write_text(SPEC.format(i=1, n=10_000))
    git(repo, "commit", "-q", "-am", "one more")
    start = time.perf_counter()
    svc.reload()
    base = figures["baseline_db_name_at_int_ms"]
    svc.store.dispose()
    return {
        "benchmark": "git_registry",
        "pipelines": args.pipelines,
        "commits": args.commits,
        "first_scan_ms": round(first_scan, 1),
        "scan_after_one_commit_ms": round((time.perf_counter() - start) * 1000, 1),
        **figures,
        "ratio_name_vs_baseline": round(figures["name_ms"] / base, 3),
        "ratio_tag_vs_baseline": round(figures["name_at_tag_ms"] / base, 2),
        "ratio_sha_vs_baseline": round(figures["name_at_sha_ms"] / base, 2),
    }


def main() -> None:
    """Parse arguments, run, print the JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=20)
    parser.add_argument("--commits", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(Path(tmp), args)))


if __name__ == "__main__":
    main()
