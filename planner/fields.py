"""Every template and expression of a spec, with the JSON pointer of its field.

Loading checks them, binding reads their `steps.X` references, rules compare them: all through
this one walk, so a new templated field is added in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from planner.spec import Generate, PipelineSpec, Step


@dataclass(frozen=True)
class Source:
    """One templated field: its pointer, its text, and whether it is a bare expression."""

    path: str
    text: str
    expression: bool


def pointer(*parts: str | int) -> str:
    """A JSON pointer from path parts (RFC 6901 escaping of `~` and `/`)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def step_sources(step_id: str, step: Step) -> Iterator[Source]:
    """The templates and expressions of one step, in document order."""
    base = pointer("steps", step_id)
    if step.when is not None:
        yield Source(f"{base}/when", step.when, True)
    if step.map is not None:
        yield Source(f"{base}/map", step.map, True)
    yield from _kind_sources(base, step)
    yield from value_sources(f"{base}/args", step.args)


def _kind_sources(base: str, step: Step) -> Iterator[Source]:
    if step.generate is not None:
        yield from _generate_sources(f"{base}/generate", step.generate)
    if step.plan is not None:
        yield from _generate_sources(f"{base}/plan/planner", step.plan.planner)
        yield from _generate_sources(f"{base}/plan/joiner", step.plan.joiner)
        if step.plan.grounding is not None:
            yield Source(f"{base}/plan/grounding", step.plan.grounding, False)
    if step.filter is not None:
        yield Source(f"{base}/filter/items", step.filter.items, True)
        yield Source(f"{base}/filter/where", step.filter.where, True)
    if step.route is not None:
        for i, branch in enumerate(step.route.branches):
            yield Source(f"{base}/route/branches/{i}/when", branch.when, True)
    if step.pipeline is not None:
        yield from value_sources(f"{base}/pipeline/inputs", step.pipeline.inputs)


def _generate_sources(path: str, gen: Generate) -> Iterator[Source]:
    if gen.prompt is not None:
        yield Source(f"{path}/prompt", gen.prompt, False)
    for i, message in enumerate(gen.messages or ()):
        yield Source(f"{path}/messages/{i}/content", message.content, False)


def value_sources(path: str, value: Any) -> Iterator[Source]:
    """Every string inside a literal value (tool args, pipeline inputs): each is a template."""
    if isinstance(value, str):
        yield Source(path, value, False)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from value_sources(path + pointer(key), item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from value_sources(f"{path}/{i}", item)


def output_sources(spec: PipelineSpec) -> Iterator[Source]:
    """The output templates."""
    for name, template in spec.outputs.items():
        yield Source(pointer("outputs", name), template, False)


def spec_sources(spec: PipelineSpec) -> Iterator[Source]:
    """Every template and expression in the spec."""
    for step_id, step in spec.steps.items():
        yield from step_sources(step_id, step)
    yield from output_sources(spec)


def is_templated(value: Any) -> bool:
    """Whether a literal string holds Jinja syntax (its value is known only at run time)."""
    return isinstance(value, str) and ("{{" in value or "{%" in value)
