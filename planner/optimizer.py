"""The optimizer: apply the rewrite rules in order, checking the plan's invariants after each.

A rule that breaks an invariant is a planner bug; `InvariantError` names the rule, so the
failing rewrite is found without bisecting the pipeline (DataFusion's optimizer does the same).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import networkx as nx

from planner import expressions
from planner.errors import InvariantError
from planner.logical import LogicalPlan, leaves, node_sources
from planner.rules import RULES

logger = logging.getLogger(__name__)

Rule = Callable[..., LogicalPlan]


def optimize(plan: LogicalPlan, *, rules: Sequence[Rule] = RULES, **ctx: Any) -> LogicalPlan:
    """Apply `rules` in order; raise `InvariantError` naming the first rule that breaks one."""
    reference = plan
    for rule in rules:
        rewritten = rule(plan, **ctx)
        problem = next(violations(reference, rewritten), None)
        if problem is not None:
            raise InvariantError(rule.__name__, problem)
        if rewritten is not plan and logger.isEnabledFor(logging.DEBUG):
            logger.debug("rule %s rewrote the plan:\n%s", rule.__name__, rewritten.to_s())
        plan = rewritten
    return plan


def violations(reference: LogicalPlan, plan: LogicalPlan) -> Iterator[str]:
    """Every invariant `plan` breaks, compared with the unoptimized `reference`."""
    if plan.spec != reference.spec or plan.outputs != reference.outputs:
        yield "the outputs changed"
    yield from _production(plan)
    yield from _inputs(plan)
    if not nx.is_directed_acyclic_graph(_graph(plan)):
        cycle = " -> ".join(u for u, _ in nx.find_cycle(_graph(plan)))
        yield f"the plan has a cycle: {cycle}"
    yield from _references(plan)


def _production(plan: LogicalPlan) -> Iterator[str]:
    """Every step is produced by at most one node, and every node id is its key."""
    counts = Counter(s for node in plan.nodes.values() for s in node.step_ids)
    for step, n in counts.items():
        if n > 1:
            yield f"step `{step}` is produced by {n} nodes"
        if step not in plan.spec.steps:
            yield f"node produces `{step}`, which is not a step of the spec"
    for key, node in plan.nodes.items():
        if key != node.id:
            yield f"node `{node.id}` is stored under `{key}`"


def _inputs(plan: LogicalPlan) -> Iterator[str]:
    for node in plan.nodes.values():
        for nid in sorted(node.inputs):
            if nid not in plan.nodes:
                yield f"node `{node.id}` reads `{nid}`, which is not in the plan"


def _graph(plan: LogicalPlan) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(plan.nodes)
    graph.add_edges_from(
        (i, n.id) for n in plan.nodes.values() for i in n.inputs if i in plan.nodes
    )
    return graph


def _references(plan: LogicalPlan) -> Iterator[str]:
    """Every step an output or a node reads is produced, and a node waits for its producer."""
    for name, steps in plan.outputs.items():
        for step in sorted(steps - plan.step_node.keys()):
            yield f"output `{name}` reads `{step}`, which no node produces"
    for node in plan.nodes.values():
        needed = {leaf.enabled_by[0] for leaf in leaves(node) if leaf.enabled_by}
        for src in node_sources(node):
            needed |= expressions.references(src.text, expression=src.expression)
        for step in sorted(needed):
            producer = plan.step_node.get(step)
            if producer is None:
                yield f"node `{node.id}` reads `{step}`, which no node produces"
            elif producer != node.id and producer not in node.inputs:
                yield f"node `{node.id}` reads `{step}` but does not wait for `{producer}`"
