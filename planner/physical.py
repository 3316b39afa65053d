"""The physical plan: how the executor runs a pipeline, as a networkx DAG of tasks.

A task is one logical operator bound to a concurrency class (`model:<target>`, `tool:<name>`,
`local`) with a cost estimate. Cost-based choices happen here: a `Batch` whose members differ
too much in cost runs as separate tasks. `critical_path()` and `priority()` feed EXPLAIN and the
executor's critical-path-first ready queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx

from planner import expressions
from planner.cost import Estimate, Statistics, batch_pays_off, estimate
from planner.logical import (
    Batch,
    CallTool,
    Filter,
    Generate,
    Leaf,
    LogicalPlan,
    Node,
    Plan,
    Route,
    Subpipeline,
    leaves,
    node_sources,
)
from planner.spec import PipelineSpec, Step

__all__ = ["Estimate", "PhysicalPlan", "Task", "build_physical"]

_OPS = {
    Generate: "generate",
    CallTool: "tool",
    Filter: "filter",
    Route: "route",
    Subpipeline: "pipeline",
    Plan: "plan",
}


@dataclass(frozen=True)
class Task:
    """One schedulable unit of the physical plan."""

    id: str  # the step id, or "batch:<target>:<n>" for a batch
    op: str  # "generate" | "tool" | "filter" | "route" | "pipeline" | "plan" | "batch"
    step_ids: tuple[str, ...]  # spec steps whose outputs this task produces
    step: Step | None  # the step to execute (rules may have rewritten it); None for a batch
    deps: frozenset[str]  # task ids that must finish first
    # concurrency class: "model:<target>", "tool:<name>", "local" (a plan step's own model and
    # tool calls take their slots inside the task)
    resource: str
    estimate: Estimate
    members: tuple[Task, ...] = ()  # batch: the generate tasks submitted together
    enabled_by: tuple[str, str] | None = None  # (route task id, branch label)


@dataclass
class PhysicalPlan:
    """Tasks in a DAG (edge dep -> dependent), with what the executor needs around them."""

    spec: PipelineSpec
    graph: nx.DiGraph  # node = task id, attribute "task"
    models: dict[str, str]  # alias -> target
    step_task: dict[str, str]  # step id -> id of the task producing it
    outputs: Mapping[str, frozenset[str]] = field(default_factory=dict)  # output -> steps read
    logical: LogicalPlan | None = None  # the optimized logical plan it was built from

    def task(self, id: str) -> Task:
        """The task with this id."""
        return self.graph.nodes[id]["task"]

    def topological(self) -> list[Task]:
        """Every task, dependencies first (ties in spec order)."""
        return [self.task(t) for t in self._order]

    @cached_property
    def _order(self) -> list[str]:
        rank = {s: i for i, s in enumerate(self.spec.steps)}

        def key(tid: str) -> tuple[int, str]:
            """Spec order of the first step a task produces, then its id."""
            return (min(rank.get(s, len(rank)) for s in self.task(tid).step_ids), tid)

        return list(nx.lexicographical_topological_sort(self.graph, key=key))

    @cached_property
    def _finish(self) -> dict[str, float]:
        """Earliest finish time of each task with unlimited concurrency."""
        finish: dict[str, float] = {}
        for tid in self._order:
            start = max((finish[d] for d in self.graph.predecessors(tid)), default=0.0)
            finish[tid] = start + self.task(tid).estimate.latency_s
        return finish

    @cached_property
    def _priorities(self) -> dict[str, float]:
        prio: dict[str, float] = {}
        for tid in reversed(self._order):
            rest = max((prio[s] for s in self.graph.successors(tid)), default=0.0)
            prio[tid] = self.task(tid).estimate.latency_s + rest
        return prio

    def critical_path(self) -> tuple[list[str], float]:
        """The longest chain of tasks by estimated latency, and its length in seconds."""
        if not self._order:
            return [], 0.0
        finish = self._finish
        tid = max(self._order, key=lambda t: finish[t])
        total, path = finish[tid], [tid]
        while preds := list(self.graph.predecessors(tid)):
            tid = max(preds, key=lambda t: (finish[t], -self._order.index(t)))
            path.append(tid)
        return path[::-1], total

    def priority(self, id: str) -> float:
        """Estimated longest path from this task to the end (critical-path-first scheduling)."""
        return self._priorities[id]


# ---------------------------------------------------------------------------- building


def build_physical(plan: LogicalPlan, *, stats: Statistics | None = None) -> PhysicalPlan:
    """Bind each logical operator to a task with an estimate; split batches that do not pay."""
    stats = stats or Statistics.empty()
    drafts: list[Task] = []
    for node in plan.nodes.values():
        drafts.extend(_tasks(node, plan, stats))
    step_task = {s: t.id for t in drafts for s in t.step_ids}
    tasks = [_wired(t, step_task) for t in drafts]
    graph = nx.DiGraph()
    for task in tasks:
        graph.add_node(task.id, task=task)
    graph.add_edges_from((d, t.id) for t in tasks for d in t.deps)
    return PhysicalPlan(plan.spec, graph, dict(plan.models), step_task, dict(plan.outputs), plan)


def _tasks(node: Node, plan: LogicalPlan, stats: Statistics) -> list[Task]:
    pipeline = plan.spec.name
    if isinstance(node, Batch):
        members = [_task(m, m, estimate(m, stats=stats, pipeline=pipeline)) for m in node.members]
        if not batch_pays_off([m.estimate for m in members]):
            return members
        own = estimate(node, stats=stats, pipeline=pipeline)
        return [
            Task(
                id=node.id,
                op="batch",
                step_ids=node.step_ids,
                step=None,
                deps=frozenset(),
                resource=f"model:{node.target}",
                estimate=own,
                members=tuple(members),
                enabled_by=node.enabled_by,
            )
        ]
    (leaf,) = leaves(node)
    return [_task(node, leaf, estimate(node, stats=stats, pipeline=pipeline))]


def _task(node: Node, leaf: Leaf, cost: Estimate) -> Task:
    """A task whose deps are the steps it reads (wired to task ids later)."""
    reads = {leaf.enabled_by[0]} if leaf.enabled_by else set()
    for src in node_sources(node):
        reads |= expressions.references(src.text, expression=src.expression)
    return Task(
        id=node.id,
        op=_OPS[type(leaf)],
        step_ids=node.step_ids,
        step=leaf.step,
        deps=frozenset(reads),
        resource=_resource(leaf),
        estimate=cost,
        enabled_by=leaf.enabled_by,
    )


def _resource(leaf: Leaf) -> str:
    if isinstance(leaf, Generate):
        return f"model:{leaf.target}"
    if isinstance(leaf, CallTool):
        return f"tool:{leaf.tool}"
    return "local"


def _wired(task: Task, step_task: Mapping[str, str]) -> Task:
    """Deps as task ids (from the steps read); a batch waits for what its members read."""
    members = tuple(_wired(m, step_task) for m in task.members)
    deps = {step_task[s] for s in task.deps} | {d for m in members for d in m.deps}
    deps.discard(task.id)
    enabled_by = None
    if task.enabled_by is not None:
        enabled_by = (step_task[task.enabled_by[0]], task.enabled_by[1])
    return Task(
        id=task.id,
        op=task.op,
        step_ids=task.step_ids,
        step=task.step,
        deps=frozenset(deps),
        resource=task.resource,
        estimate=task.estimate,
        members=members,
        enabled_by=enabled_by,
    )
