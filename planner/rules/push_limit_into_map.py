"""Narrow a map whose only reader uses just its first items."""

from __future__ import annotations

from typing import Any

import msgspec

from planner import expressions
from planner.logical import Batch, LogicalPlan, Map, Node, leaves, rebuild


def push_limit_into_map(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    """When a map with `map_limit: N`, or a filter with `limit: N` whose `where` is always
    true, iterates exactly `steps.M.output` of a map `M` that nothing else reads, `M` needs only
    its first N items: give `M` a `map_limit` of N too. Readers are visited from the sinks up,
    so a limit travels down a chain of maps.

    >>> from planner.examples import plan_from_yaml
    >>> plan = plan_from_yaml('''
    ... models: {w: demo-base}
    ... tools: [kb.search]
    ... steps:
    ...   hits: {tool: kb.search, args: {query: "{{ inputs.q }}"}}
    ...   notes: {map: steps.hits.output, generate: {model: w, prompt: "Note on {{ item }}"}}
    ...   titles:
    ...     map: steps.notes.output
    ...     map_limit: 3
    ...     generate: {model: w, prompt: "Title for {{ item }}"}
    ... outputs: {titles: "{{ steps.titles.output }}"}
    ... ''')
    >>> print(plan.to_s())
    Output titles
      Map titles over=`steps.notes.output` limit=3
        Generate titles model=w(demo-base)
          Map notes over=`steps.hits.output`
            Generate notes model=w(demo-base)
              CallTool hits tool=kb.search
    >>> print(push_limit_into_map(plan).to_s())
    Output titles
      Map titles over=`steps.notes.output` limit=3
        Generate titles model=w(demo-base)
          Map notes over=`steps.hits.output` limit=3
            Generate notes model=w(demo-base)
              CallTool hits tool=kb.search
    """
    nodes = dict(plan.nodes)
    for nid in reversed(list(nodes)):
        narrowing = _narrowing(nodes[nid])
        if narrowing is None:
            continue
        path, source, limit = narrowing
        producer = nodes.get(plan.step_node.get(source, ""))
        if not isinstance(producer, Map) or producer.step_ids != (source,):
            continue
        if plan.readers.get(source) != [(nid, path)] or plan.read_by_outputs(source):
            continue
        current = producer.step.map_limit
        if current is None or current > limit:
            step = msgspec.structs.replace(producer.step, map_limit=limit)
            nodes[producer.id] = rebuild(producer, step=step)
    return plan.with_nodes(nodes.values())


def _narrowing(node: Node) -> tuple[str, str, int] | None:
    """(field pointer, step read, item limit) of a node that reads only a list's first items."""
    if isinstance(node, Batch) or len(node.step_ids) != 1:
        return None
    (leaf,) = leaves(node)
    step, base = leaf.step, f"/steps/{node.id}"
    if step.map is not None and step.map_limit is not None:
        source = expressions.output_of(step.map)
        return (f"{base}/map", source, step.map_limit) if source else None
    f = step.filter
    if f is not None and f.limit is not None and expressions.constant(f.where) == (True, True):
        source = expressions.output_of(f.items)
        return (f"{base}/filter/items", source, f.limit) if source else None
    return None
