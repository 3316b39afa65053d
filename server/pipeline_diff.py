"""`compound diff name@a name@b`: two versions of a pipeline from a git repository, compared.

Prints the unified diff of the two spec texts, then the unified diff of their EXPLAIN plans
(compiled against the configuration's models and tools when there is a `compound.yaml`, else
against any model and the built-in tools), so a reviewer sees what the change does to the
plan, not only to the text. Exit status like diff(1): 0 identical, 1 different, 2 trouble.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

from planner import Catalog, SpecError, SpecErrors, compile_text, explain
from server.catalog import build_catalog, split_ref
from server.errors import GitError, PipelineNotFoundError
from server.git_registry import GitSpec, named, read_specs
from server.git_repo import GitRepo
from server.pipeline_cli import FAILED, OK, USAGE, _config_catalog, _optional_config
from tools import ToolsConfig, default_registry

DEFAULT_REF = "HEAD"


@dataclass(frozen=True, kw_only=True)
class Side:
    """One side of the comparison: the ref as written, its spec file and its plan (or why not)."""

    ref: str
    spec: GitSpec
    plan: str


def diff_refs(
    left: str, right: str, *, repo: str, config_path: str, explicit_config: bool, out: TextIO
) -> int:
    """Write the spec and plan diffs of two `name@ref`s; 0 same, 1 different, 2 trouble."""
    try:
        git = GitRepo(repo)
        sides = [_side(git, ref) for ref in (left, right)]
    except (GitError, PipelineNotFoundError) as e:
        out.write(f"error: {e}\n")
        return USAGE
    names = frozenset(s.loaded.name for side in sides for s in read_specs(git, side.spec.commit))
    catalog = _catalog(config_path, explicit=explicit_config, names=names)
    planned = [_planned(side, catalog) for side in sides]
    spec_diff = _unified(
        [s.spec.loaded.text for s in planned], [_label(s) for s in planned], "spec"
    )
    plan_diff = _unified([s.plan for s in planned], [f"EXPLAIN {s.ref}" for s in planned], "plan")
    out.writelines(spec_diff)
    out.writelines(plan_diff)
    return FAILED if spec_diff or plan_diff else OK


def _side(git: GitRepo, ref: str) -> Side:
    name, label = split_ref(ref)
    commit = git.resolve(label or DEFAULT_REF)
    spec = named(read_specs(git, commit), name)
    if spec is None:
        raise PipelineNotFoundError(ref, reason=f"no spec named {name!r} at commit {commit}")
    return Side(ref=ref, spec=spec, plan="")


def _planned(side: Side, catalog: Catalog) -> Side:
    """The side with its EXPLAIN text, or the problems that keep it from planning."""
    loaded = side.spec.loaded
    source = f"{side.spec.path}@{side.spec.commit[:12]}"
    try:
        plan = explain(
            compile_text(loaded.text, catalog=catalog, fmt=loaded.fmt, source=source), "text"
        )
    except SpecErrors as e:
        plan = "does not validate:\n" + "\n".join(str(err) for err in e.errors)
    except SpecError as e:
        plan = f"does not validate:\n{e}"
    return Side(ref=side.ref, spec=side.spec, plan=plan + "\n")


def _catalog(config_path: str, *, explicit: bool, names: Iterable[str | None]) -> Catalog:
    """The configuration's catalog, or (without one) any model and the built-in tools."""
    pipelines = {n for n in names if n}
    config = _optional_config(config_path, explicit=explicit)
    if config is not None:
        return _config_catalog(config, extra=pipelines)
    tools = default_registry(ToolsConfig()).schemas()
    return build_catalog(models=lambda _: True, tools=tools, pipelines=pipelines)


def _label(side: Side) -> str:
    return f"{side.ref} ({side.spec.path} at {side.spec.commit[:12]})"


def _unified(texts: list[str], labels: list[str], what: str) -> list[str]:
    lines = difflib.unified_diff(
        texts[0].splitlines(keepends=True),
        texts[1].splitlines(keepends=True),
        fromfile=f"{labels[0]} [{what}]",
        tofile=f"{labels[1]} [{what}]",
    )
    return [line if line.endswith("\n") else line + "\n" for line in lines]
