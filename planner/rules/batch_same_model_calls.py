"""Submit independent calls to the same model together."""

from __future__ import annotations

from typing import Any

from planner.logical import Batch, Generate, LogicalPlan, rename_inputs


def batch_same_model_calls(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    """Group plain `Generate` nodes (no map, no fallback) with the same model target, the same
    inputs and the same route branch into one `Batch` node: the engine gets them in one
    submission and decodes them side by side. Equal inputs mean no call waits for another
    to be batched, and no path can join two members. A call with no partner is left alone;
    the cost model may still run a batch's members apart (`cost.batch_pays_off`).

    >>> from planner.examples import plan_from_yaml
    >>> plan = plan_from_yaml('''
    ... models: {w: demo-base}
    ... steps:
    ...   pros: {generate: {model: w, prompt: "Pros of {{ inputs.topic }}"}}
    ...   cons: {generate: {model: w, prompt: "Cons of {{ inputs.topic }}"}}
    ...   verdict: {generate: {model: w, prompt: "{{ steps.pros.output }} {{ steps.cons.output }}"}}
    ... outputs: {verdict: "{{ steps.verdict.output }}"}
    ... ''')
    >>> print(plan.to_s())
    Output verdict
      Generate verdict model=w(demo-base)
        Generate pros model=w(demo-base)
        Generate cons model=w(demo-base)
    >>> print(batch_same_model_calls(plan).to_s())
    Output verdict
      Generate verdict model=w(demo-base)
        Batch batch:demo-base:0 model=demo-base size=2
          Generate pros model=w(demo-base)
          Generate cons model=w(demo-base)
    """
    groups: dict[tuple[Any, ...], list[Generate]] = {}
    for node in plan.nodes.values():
        if isinstance(node, Generate):
            key = (node.target, node.inputs, node.enabled_by)
            groups.setdefault(key, []).append(node)
    batches, renamed = [], {}
    for members in groups.values():
        if len(members) > 1:
            batch = Batch(
                id=f"batch:{members[0].target}:{len(batches)}",
                target=members[0].target,
                members=tuple(members),
            )
            batches.append(batch)
            renamed.update((m.id, batch.id) for m in members)
    if not batches:
        return plan
    kept = [node for nid, node in plan.nodes.items() if nid not in renamed]
    return plan.with_nodes(rename_inputs(node, renamed) for node in [*kept, *batches])
