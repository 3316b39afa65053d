"""Binding: resolve a spec's names against what the server offers, and infer dependencies.

Model aliases must name served targets, tools must be declared and registered (literal args are
checked against the tool's JSON Schema now; templated ones at run time), `pipeline` steps must
name resolvable pipelines. Dependencies come from `steps.X` references in every template and
expression of a step, plus route membership (a step in a route branch waits for the route).
Unknown steps, cycles, and `map` over a value known to be a string are plan-time errors at the
exact field.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import networkx as nx

from planner import expressions, plan_format
from planner.errors import PlanError, SpecError, SpecErrors
from planner.fields import Source, is_templated, output_sources, pointer, step_sources
from planner.load import check_spec
from planner.spec import PipelineSpec, Step

NameSet = Collection[str] | Callable[[str], bool]
DEFAULT_BRANCH = "default"


@dataclass(frozen=True)
class Catalog:
    """What the server can run: model targets, tools (name -> JSON Schema of the args),
    pipelines (`name` or `name@version`). Sets, or predicates for open-ended families."""

    models: NameSet = frozenset()
    tools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    pipelines: NameSet = frozenset()

    def has_model(self, target: str) -> bool:
        """Whether a model target (`demo-base`, `demo-base:router`, a provider model) is served."""
        return _contains(self.models, target)

    def has_pipeline(self, ref: str) -> bool:
        """Whether `name` or `name@version` resolves (a set may list bare names)."""
        return _contains(self.pipelines, ref) or (
            not callable(self.pipelines) and ref.split("@", 1)[0] in self.pipelines
        )


def _contains(names: NameSet, name: str) -> bool:
    return names(name) if callable(names) else name in names


@dataclass(frozen=True)
class BoundSpec:
    """A spec whose names resolved: model targets, dependencies, route membership, output types."""

    spec: PipelineSpec
    models: Mapping[str, str]  # alias -> target
    deps: Mapping[str, frozenset[str]]  # step -> steps it waits for
    enabled_by: Mapping[str, tuple[str, str]]  # step -> (route step, branch label)
    output_refs: Mapping[str, frozenset[str]]  # output name -> steps it reads
    types: Mapping[str, str]  # step -> "string" | "array" | "object" | "number" | ... | "any"


def bind(spec: PipelineSpec, *, catalog: Catalog) -> BoundSpec:
    """Resolve `spec` against `catalog`; raise `PlanError` (one problem) or `SpecErrors` (several)."""
    problems = check_spec(spec)
    if problems:
        raise SpecErrors(problems)
    types = {step_id: output_type(step) for step_id, step in spec.steps.items()}
    errors = [
        *_bind_models(spec, catalog),
        *_bind_tools(spec, catalog),
        *_bind_pipelines(spec, catalog),
        *_check_types(spec, types),
    ]
    refs = {}
    for step_id, step in spec.steps.items():
        refs[step_id] = _references(spec, step_sources(step_id, step), errors, step=step_id)
    output_refs = {
        src.path.rsplit("/", 1)[1]: _references(spec, [src], errors, step=None)
        for src in output_sources(spec)
    }
    enabled_by = _bind_routes(spec, errors)
    deps = {s: refs[s] | ({enabled_by[s][0]} if s in enabled_by else set()) for s in spec.steps}
    if not errors:
        errors.extend(_cycles(spec, deps))
    _raise(errors)
    models = dict(spec.models)
    return BoundSpec(spec, models, _frozen(deps), enabled_by, _frozen(output_refs), types)


def _frozen(sets: Mapping[str, Collection[str]]) -> dict[str, frozenset[str]]:
    return {k: frozenset(v) for k, v in sets.items()}


def _raise(errors: list[PlanError]) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise SpecErrors(errors)


def _hint(name: str, candidates: Collection[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean `{match[0]}`?)" if match else ""


# ---------------------------------------------------------------------------- names


def _bind_models(spec: PipelineSpec, catalog: Catalog) -> Iterator[PlanError]:
    for alias, target in spec.models.items():
        if not catalog.has_model(target):
            yield PlanError(pointer("models", alias), f"model `{target}` is not served here")
    for step_id, step in spec.steps.items():
        base = pointer("steps", step_id)
        aliases = []
        if step.generate is not None:
            aliases.append((f"{base}/generate/model", step.generate.model))
        if step.plan is not None:
            aliases.append((f"{base}/plan/planner/model", step.plan.planner.model))
            aliases.append((f"{base}/plan/joiner/model", step.plan.joiner.model))
        aliases += [
            (f"{base}/fallback/{i}/model", f.model) for i, f in enumerate(step.fallback) if f.model
        ]
        for path, alias in aliases:
            if alias not in spec.models:
                hint = _hint(alias, spec.models) or " (declare it under `models`)"
                yield PlanError(path, f"unknown model alias `{alias}`{hint}", step=step_id)


def _bind_tools(spec: PipelineSpec, catalog: Catalog) -> Iterator[PlanError]:
    for i, name in enumerate(spec.tools):
        if name not in catalog.tools:
            yield PlanError(
                f"/tools/{i}", f"tool `{name}` is not registered{_hint(name, catalog.tools)}"
            )
    for step_id, step in spec.steps.items():
        base = pointer("steps", step_id)
        names = [(f"{base}/tool", step.tool)] if step.tool else []
        names += [
            (f"{base}/fallback/{i}/tool", f.tool) for i, f in enumerate(step.fallback) if f.tool
        ]
        if step.plan is not None:
            yield from _plan_tools(base, spec, step_id)
        for path, name in names:
            if name not in spec.tools:
                yield PlanError(path, f"tool `{name}` is not declared in `tools`", step=step_id)
            elif name in catalog.tools:
                yield from _check_args(f"{base}/args", step.args, catalog.tools[name], step_id)


def _plan_tools(base: str, spec: PipelineSpec, step_id: str) -> Iterator[PlanError]:
    """A plan may call only the pipeline's declared tools: there must be some."""
    if not spec.tools:
        yield PlanError(
            f"{base}/plan",
            "a plan step needs the tools it may call declared in `tools`",
            step=step_id,
        )
    step = spec.steps[step_id]
    if step.plan.constrain and not plan_format.has_grammar():
        yield PlanError(
            f"{base}/plan/constrain",
            "constrained plan decoding is not available on this server (no plan grammar)",
            step=step_id,
        )


def _check_args(
    path: str, args: Mapping[str, Any], schema: Mapping[str, Any], step: str
) -> Iterator[PlanError]:
    """Literal arguments against the tool's schema; templated values are checked at run time."""
    try:
        validator = jsonschema.Draft202012Validator(schema)
        found = list(validator.iter_errors(dict(args)))
    except jsonschema.SchemaError:  # the registry's schema is broken: run time reports it
        return
    for error in found:
        if not is_templated(error.instance):
            where = path + pointer(*error.absolute_path)
            yield PlanError(where, f"invalid argument: {error.message}", step=step)


def _bind_pipelines(spec: PipelineSpec, catalog: Catalog) -> Iterator[PlanError]:
    for step_id, step in spec.steps.items():
        if step.pipeline is None:
            continue
        path, ref = f"{pointer('steps', step_id)}/pipeline/name", step.pipeline.name
        if ref.split("@", 1)[0] == spec.name:
            yield PlanError(path, "a pipeline cannot call itself", step=step_id)
        elif not catalog.has_pipeline(ref):
            yield PlanError(path, f"unknown pipeline `{ref}`", step=step_id)


# ---------------------------------------------------------------------------- references


def _references(
    spec: PipelineSpec,
    sources: Iterator[Source] | list[Source],
    errors: list[PlanError],
    *,
    step: str | None,
) -> set[str]:
    found: set[str] = set()
    reported: set[tuple[str, str]] = set()  # `steps.x` and `steps.x.output` are one problem
    for src in sources:
        for access in sorted(expressions.accesses(src.text, expression=src.expression), key=str):
            error = _reference_error(spec, src, access, step)
            if error is None:
                found.add(access.step)
            elif (error.path, error.message) not in reported:
                reported.add((error.path, error.message))
                errors.append(error)
    return found


def _reference_error(
    spec: PipelineSpec, src: Source, access: expressions.Access, step: str | None
) -> PlanError | None:
    if access.step not in spec.steps:
        hint = _hint(access.step, spec.steps)
        return PlanError(src.path, f"unknown step `{access.step}`{hint}", step=step)
    if access.step == step:
        return PlanError(src.path, "a step cannot read its own output", step=step)
    if access.field not in (None, *expressions.STEP_FIELDS):
        return PlanError(
            src.path,
            f"`steps.{access.step}` has `output` and `status`, not `{access.field}`",
            step=step,
        )
    return None


def _bind_routes(spec: PipelineSpec, errors: list[PlanError]) -> dict[str, tuple[str, str]]:
    enabled_by: dict[str, tuple[str, str]] = {}
    for route_id, step in spec.steps.items():
        if step.route is None:
            continue
        base = f"{pointer('steps', route_id)}/route"
        members = [
            (f"{base}/branches/{i}/steps", str(i), b.steps)
            for i, b in enumerate(step.route.branches)
        ]
        members.append((f"{base}/default", DEFAULT_BRANCH, step.route.default))
        for path, label, steps in members:
            for j, member in enumerate(steps):
                error = _member_error(spec, route_id, member, enabled_by)
                if error:
                    errors.append(PlanError(f"{path}/{j}", error, step=route_id))
                else:
                    enabled_by[member] = (route_id, label)
    return enabled_by


def _member_error(
    spec: PipelineSpec, route_id: str, member: str, enabled_by: Mapping[str, tuple[str, str]]
) -> str | None:
    if member not in spec.steps:
        return f"unknown step `{member}`{_hint(member, spec.steps)}"
    if member == route_id:
        return "a route cannot enable itself"
    if member in enabled_by:
        other, label = enabled_by[member]
        return f"step `{member}` is already in route `{other}` (branch {label})"
    return None


def _cycles(spec: PipelineSpec, deps: Mapping[str, Collection[str]]) -> Iterator[PlanError]:
    graph = nx.DiGraph()
    graph.add_nodes_from(spec.steps)
    graph.add_edges_from((dep, step) for step, needs in deps.items() for dep in needs)
    try:
        edges = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return
    order = list(spec.steps)
    cycle = [u for u, _ in edges]
    start = cycle.index(min(cycle, key=order.index))
    cycle = cycle[start:] + cycle[:start]
    shown = " -> ".join([*cycle, cycle[0]])
    yield PlanError(pointer("steps", cycle[0]), f"dependency cycle: {shown}", step=cycle[0])


# ---------------------------------------------------------------------------- types


_KIND_TYPES = {
    "filter": "array",
    "route": "string",
    "pipeline": "object",
    "tool": "any",
    "plan": "string",
}


def output_type(step: Step) -> str:
    """What a step's output is known to be: "string", "array", "object", ... or "any"."""
    if step.map is not None:
        return "array"
    if step.kind != "generate":
        return _KIND_TYPES[step.kind]
    if step.output_schema is not None:
        kind = step.output_schema.get("type")
        return kind if isinstance(kind, str) else "any"
    json_output = step.output is not None and step.output.get("type") == "json"
    return "any" if json_output else "string"


def _check_types(spec: PipelineSpec, types: Mapping[str, str]) -> Iterator[PlanError]:
    for step_id, step in spec.steps.items():
        for src in step_sources(step_id, step):
            yield from _list_errors(src, types, step_id)
            yield from _attribute_errors(src, types, step_id)
    for src in output_sources(spec):
        yield from _attribute_errors(src, types, None)


def _list_errors(src: Source, types: Mapping[str, str], step: str) -> Iterator[PlanError]:
    """`map` and `filter.items` iterate a list: a string output there is a mistake."""
    if not src.path.endswith(("/map", "/filter/items")):
        return
    source = expressions.output_of(src.text)
    if source is not None and types.get(source) not in (None, "any", "array"):
        what = "map" if src.path.endswith("/map") else "filter"
        yield PlanError(
            src.path,
            f"`steps.{source}.output` is {_article(types[source])}, but {what} needs a list"
            " (give the step an output_schema of type array)",
            step=step,
        )


def _attribute_errors(
    src: Source, types: Mapping[str, str], step: str | None
) -> Iterator[PlanError]:
    """`steps.X.output.field` where X's output is a plain string (string methods are fine)."""
    for access in expressions.accesses(src.text, expression=src.expression):
        known = types.get(access.step)
        if access.attr is not None and known == "string" and not hasattr(str, access.attr):
            yield PlanError(
                src.path,
                f"`steps.{access.step}.output` is a string; it has no field `{access.attr}`",
                step=step,
            )


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


__all__ = ["BoundSpec", "Catalog", "PlanError", "SpecError", "bind", "output_type"]
