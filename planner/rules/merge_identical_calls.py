"""Run identical calls once: one node produces the outputs of several steps."""

from __future__ import annotations

from typing import Any

import msgspec

from planner.logical import Batch, LogicalPlan, Node, Route, leaves, rebuild, rename_inputs
from planner.spec import Step


def merge_identical_calls(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    """Merge steps of the same kind that call the same model target or tool with the same
    prompt or args text, parameters, policies, `when` and `map`: the first step's node
    produces every merged step's output, and readers of the others read it instead.

    Model aliases are compared by their targets; descriptions are ignored. Routes are never
    merged (their branches name them). Like `prune_dead_steps`, this treats tools as pure:
    two identical tool calls run once.

    >>> from planner.examples import plan_from_yaml
    >>> plan = plan_from_yaml('''
    ... models: {w: demo-base, writer: demo-base}
    ... steps:
    ...   summary: {generate: {model: w, prompt: "Summarize {{ inputs.doc }}"}}
    ...   abstract: {generate: {model: writer, prompt: "Summarize {{ inputs.doc }}"}}
    ...   title: {generate: {model: w, prompt: "Title for {{ steps.abstract.output }}"}}
    ... outputs: {summary: "{{ steps.summary.output }}", title: "{{ steps.title.output }}"}
    ... ''')
    >>> print(plan.to_s())
    Output summary, title
      Generate summary model=w(demo-base)
      Generate title model=w(demo-base)
        Generate abstract model=writer(demo-base)
    >>> print(merge_identical_calls(plan).to_s())
    Output summary, title
      Generate summary,abstract model=w(demo-base)
      Generate title model=w(demo-base)
        Ref summary,abstract
    """
    kept: dict[bytes, Node] = {}
    renamed: dict[str, str] = {}
    for node in plan.nodes.values():
        key = _signature(node, plan.models)
        if key is None:
            continue
        if key in kept:
            first = kept[key]
            kept[key] = rebuild(first, step_ids=(*first.step_ids, *node.step_ids))
            renamed[node.id] = first.id
        else:
            kept[key] = node
    if not renamed:
        return plan
    merged = {node.id: node for node in kept.values()}
    nodes = (merged.get(nid, node) for nid, node in plan.nodes.items() if nid not in renamed)
    return plan.with_nodes(rename_inputs(node, renamed) for node in nodes)


def _signature(node: Node, models: dict[str, str]) -> bytes | None:
    """What makes two calls identical, as canonical JSON (None: never merged)."""
    if isinstance(node, Batch | Route):
        return None
    (leaf,) = leaves(node)
    shape = {
        "operators": _operators(node),
        "step": _canonical(leaf.step, models),
        "inputs": sorted(node.inputs),
        "enabled_by": node.enabled_by,
    }
    return msgspec.json.encode(shape, order="sorted")


def _operators(node: Node) -> list[str]:
    names = [type(node).__name__]
    while hasattr(node, "body"):
        node = node.body
        names.append(type(node).__name__)
    return names


def _canonical(step: Step, models: dict[str, str]) -> Step:
    """The step with aliases replaced by their targets and the description dropped."""
    generate = step.generate
    if generate is not None:
        generate = msgspec.structs.replace(generate, model=models[generate.model])
    fallback = [
        msgspec.structs.replace(f, model=models[f.model]) if f.model else f for f in step.fallback
    ]
    return msgspec.structs.replace(step, generate=generate, fallback=fallback, description=None)
