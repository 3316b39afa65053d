"""Remove the steps that feed no output."""

from __future__ import annotations

from typing import Any

from planner.logical import LogicalPlan


def prune_dead_steps(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    """Keep only the nodes the outputs read, directly or through other nodes.

    Tools are treated as pure functions here: a tool step whose result nobody reads is not
    run, so a spec must not rely on a tool's side effects without using its output.

    >>> from planner.examples import plan_from_yaml
    >>> plan = plan_from_yaml('''
    ... models: {w: demo-base}
    ... steps:
    ...   draft: {generate: {model: w, prompt: "Draft"}}
    ...   answer: {generate: {model: w, prompt: "Improve {{ steps.draft.output }}"}}
    ...   unused: {generate: {model: w, prompt: "Nobody reads this"}}
    ... outputs: {answer: "{{ steps.answer.output }}"}
    ... ''')
    >>> print(plan.to_s())
    Output answer
      Generate answer model=w(demo-base)
        Generate draft model=w(demo-base)
    Generate unused model=w(demo-base)
    >>> print(prune_dead_steps(plan).to_s())
    Output answer
      Generate answer model=w(demo-base)
        Generate draft model=w(demo-base)
    """
    live: set[str] = set()
    pending = [plan.step_node[s] for refs in plan.outputs.values() for s in refs]
    while pending:
        nid = pending.pop()
        if nid not in live:
            live.add(nid)
            pending.extend(plan.nodes[nid].inputs)
    return plan.with_nodes(node for nid, node in plan.nodes.items() if nid in live)
