"""Evaluate the cheapest, most selective predicate of a filter chain first."""

from __future__ import annotations

from typing import Any

import msgspec

from planner import cost, expressions
from planner.cost import Statistics
from planner.logical import Filter, LogicalPlan, Node, rebuild


def order_filters(plan: LogicalPlan, *, stats: Statistics | None = None, **ctx: Any) -> LogicalPlan:
    """In a chain of filters, each iterating exactly the previous one's output (read by
    nothing else), reorder the `where` predicates by rank = cost / (1 - selectivity),
    lowest first: cost is the predicate's size, selectivity the fraction of items its step
    kept in past runs (0.5 when unknown). The chain's final output is the same set of items;
    only predicates without `limit`, `when`, `index` or step references are moved, so the
    step ids keep their dependencies.

    >>> from planner.examples import plan_from_yaml
    >>> plan = plan_from_yaml('''
    ... steps:
    ...   recent:
    ...     filter: {items: inputs.docs, where: "item.year > 2020 and item.lang in ['en', 'de'] and item.pages > 2"}
    ...   short: {filter: {items: steps.recent.output, where: "item.pages < 10"}}
    ... outputs: {docs: "{{ steps.short.output }}"}
    ... ''')
    >>> print(plan.to_s())
    Output docs
      Filter short items=`steps.recent.output` where=`item.pages < 10`
        Filter recent items=`inputs.docs` where=`item.year > 2020 and item.lang in ['en', 'de'] and item.pages > 2`
    >>> print(order_filters(plan).to_s())
    Output docs
      Filter short items=`steps.recent.output` where=`item.year > 2020 and item.lang in ['en', 'de'] and item.pages > 2`
        Filter recent items=`inputs.docs` where=`item.pages < 10`
    """
    stats = stats or Statistics.empty()
    nodes = dict(plan.nodes)
    for chain in _chains(plan):
        ranked = sorted(chain, key=lambda f: _rank(f, plan, stats))
        for node, source in zip(chain, ranked, strict=True):
            where = source.step.filter.where
            step = msgspec.structs.replace(
                node.step, filter=msgspec.structs.replace(node.step.filter, where=where)
            )
            nodes[node.id] = rebuild(node, step=step)
    return plan.with_nodes(nodes.values())


def _rank(node: Filter, plan: LogicalPlan, stats: Statistics) -> float:
    where = node.step.filter.where
    kept = cost.selectivity(node, stats=stats, pipeline=plan.spec.name)
    return expressions.complexity(where, expression=True) / max(1.0 - kept, 1e-3)


def _chains(plan: LogicalPlan) -> list[list[Filter]]:
    """Maximal chains of movable filters, upstream first."""
    following: dict[str, Filter] = {}
    for node in plan.nodes.values():
        source = _source(node)
        upstream = plan.nodes.get(plan.step_node.get(source or "", ""))
        if upstream is not None and _linked(plan, upstream, node):
            following[upstream.id] = node
    starts = set(following) - {f.id for f in following.values()}
    chains = []
    for nid in plan.nodes:
        if nid in starts:
            chain = [plan.nodes[nid]]
            while chain[-1].id in following:
                chain.append(following[chain[-1].id])
            chains.append(chain)
    return chains


def _source(node: Node) -> str | None:
    return expressions.output_of(node.step.filter.items) if _movable(node) else None


def _movable(node: Node) -> bool:
    if not isinstance(node, Filter) or len(node.step_ids) != 1:
        return False
    step = node.step
    read = expressions.names(step.filter.where, expression=True)
    return step.filter.limit is None and step.when is None and not read & {"index", "steps"}


def _linked(plan: LogicalPlan, upstream: Node, node: Filter) -> bool:
    """`node` iterates `upstream`'s output, which nothing else reads."""
    step = upstream.id
    return (
        _movable(upstream)
        and upstream.enabled_by == node.enabled_by
        and plan.readers.get(step) == [(node.id, f"/steps/{node.id}/filter/items")]
        and not plan.read_by_outputs(step)
    )
