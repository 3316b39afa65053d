"""The logical plan: what a pipeline computes, as a DAG of small frozen operators.

Leaves run one spec step: `Generate`, `CallTool`, `Filter`, `Route`, `Subpipeline`, `Plan` (a
model-written plan run as a dynamic sub-DAG of tool calls, then a joiner model). Wrappers add
behaviour around a leaf: `Map` (fan-out over a list), `Fallback` (alternatives tried in order).
`Batch` (made by a rule) submits several independent `Generate` calls to one model together.
Every operator knows the node ids it waits for (`inputs`) and the spec steps whose outputs it
produces (`step_ids`: several after identical calls are merged). The leaf's `step` is the step
to execute (rules may rewrite it, e.g. narrow a map).

`LogicalPlan.to_s()` prints the indented tree used by EXPLAIN, logs and rule fixtures: the
`Output` root, under each operator the operators it reads (a node already printed appears as
`Ref <ids>`), under a wrapper its body, under a batch its members.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import networkx as nx

from planner import expressions
from planner.bind import DEFAULT_BRANCH, BoundSpec
from planner.fields import Source, step_sources
from planner.spec import PipelineSpec, Step

# ---------------------------------------------------------------------------- operators


@dataclass(frozen=True, kw_only=True)
class _Leaf:
    id: str
    step_ids: tuple[str, ...]
    inputs: frozenset[str]
    step: Step
    enabled_by: tuple[str, str] | None = None  # (route node id, branch label)

    def policies(self) -> str:
        """Policy suffix of the printed line: when, retries, timeout, cache, route branch."""
        step, parts = self.step, []
        if step.when is not None:
            parts.append(f"when=`{step.when}`")
        if step.retries:
            parts.append(f"retries={step.retries}")
        if step.timeout is not None:
            parts.append(f"timeout={step.timeout}")
        if step.cache:
            parts.append("cache")
        if self.enabled_by is not None:
            parts.append(f"branch={self.enabled_by[0]}:{self.enabled_by[1]}")
        return "".join(" " + p for p in parts)


@dataclass(frozen=True, kw_only=True)
class Generate(_Leaf):
    """A model call."""

    alias: str
    target: str

    def label(self) -> str:
        """One printed line."""
        return f"Generate {ids(self)} model={self.alias}({self.target}){self.policies()}"


@dataclass(frozen=True, kw_only=True)
class CallTool(_Leaf):
    """A tool call."""

    tool: str

    def label(self) -> str:
        """One printed line."""
        return f"CallTool {ids(self)} tool={self.tool}{self.policies()}"


@dataclass(frozen=True, kw_only=True)
class Filter(_Leaf):
    """Keep the items of a list for which a predicate holds."""

    def label(self) -> str:
        """One printed line."""
        f = self.step.filter
        limit = f" limit={f.limit}" if f.limit is not None else ""
        return f"Filter {ids(self)} items=`{f.items}` where=`{f.where}`{limit}{self.policies()}"


@dataclass(frozen=True, kw_only=True)
class Route(_Leaf):
    """Choose a branch; the steps of the other branches are skipped."""

    def label(self) -> str:
        """One printed line."""
        route = self.step.route
        branches = [f"{i}=[{', '.join(b.steps)}]" for i, b in enumerate(route.branches)]
        if route.default:
            branches.append(f"{DEFAULT_BRANCH}=[{', '.join(route.default)}]")
        return f"Route {ids(self)} {' '.join(branches)}{self.policies()}"


@dataclass(frozen=True, kw_only=True)
class Subpipeline(_Leaf):
    """A call of another registered pipeline."""

    pipeline: str

    def label(self) -> str:
        """One printed line."""
        return f"Subpipeline {ids(self)} pipeline={self.pipeline}{self.policies()}"


@dataclass(frozen=True, kw_only=True)
class Plan(_Leaf):
    """A planner model writes tool calls that run as a dynamic DAG; a joiner model answers."""

    planner: tuple[str, str]  # (alias, target)
    joiner: tuple[str, str]
    tools: tuple[str, ...]

    def label(self) -> str:
        """One printed line."""
        spec = self.step.plan
        extra = " constrain" if spec.constrain else ""
        extra += " constrain_answer" if spec.constrain_answer else ""
        return (
            f"Plan {ids(self)} planner={_call(self.planner)} joiner={_call(self.joiner)}"
            f" tools=[{', '.join(self.tools)}] mode={spec.mode} rounds<={spec.max_rounds}"
            f" tasks<={spec.max_tasks}{extra}{self.policies()}"
        )


def _call(model: tuple[str, str]) -> str:
    return f"{model[0]}({model[1]})"


Leaf = Generate | CallTool | Filter | Route | Subpipeline | Plan


@dataclass(frozen=True, kw_only=True)
class _Wrapper:
    body: Leaf | Fallback

    @property
    def id(self) -> str:
        """The body's node id."""
        return self.body.id

    @property
    def step_ids(self) -> tuple[str, ...]:
        """The steps the body produces."""
        return self.body.step_ids

    @property
    def inputs(self) -> frozenset[str]:
        """The nodes the body reads."""
        return self.body.inputs

    @property
    def enabled_by(self) -> tuple[str, str] | None:
        """The body's route branch, if any."""
        return self.body.enabled_by

    @property
    def step(self) -> Step:
        """The step the body executes."""
        return self.body.step


@dataclass(frozen=True, kw_only=True)
class Fallback(_Wrapper):
    """Alternatives (model aliases or tools) tried in order when the body's attempts fail."""

    alternatives: tuple[str, ...]

    def label(self) -> str:
        """One printed line."""
        return f"Fallback {ids(self)} alternatives=[{', '.join(self.alternatives)}]"


@dataclass(frozen=True, kw_only=True)
class Map(_Wrapper):
    """Run the body once per item of a list (`item`, `index` in scope)."""

    def label(self) -> str:
        """One printed line."""
        step = self.step
        extra = f" limit={step.map_limit}" if step.map_limit is not None else ""
        extra += f" concurrency={step.concurrency}" if step.concurrency is not None else ""
        return f"Map {ids(self)} over=`{step.map}`{extra}"


@dataclass(frozen=True, kw_only=True)
class Batch:
    """Independent calls to one model target submitted together (one engine submission)."""

    id: str
    target: str
    members: tuple[Generate, ...]

    @property
    def step_ids(self) -> tuple[str, ...]:
        """Every member's steps, in order."""
        return tuple(s for m in self.members for s in m.step_ids)

    @property
    def inputs(self) -> frozenset[str]:
        """Everything any member reads."""
        return frozenset().union(*(m.inputs for m in self.members))

    @property
    def enabled_by(self) -> tuple[str, str] | None:
        """The members' route branch (they share it)."""
        return self.members[0].enabled_by

    @property
    def step(self) -> None:
        """None: each member carries its own step."""
        return None

    def label(self) -> str:
        """One printed line."""
        return f"Batch {self.id} model={self.target} size={len(self.members)}"


Node = Leaf | Map | Fallback | Batch


def ids(node: Node) -> str:
    """The step ids a node produces, as printed."""
    return ",".join(node.step_ids)


def leaves(node: Node) -> tuple[Leaf, ...]:
    """The leaf operators inside a node (one, or a batch's members)."""
    if isinstance(node, Batch):
        return node.members
    while isinstance(node, _Wrapper):
        node = node.body
    return (node,)


def rebuild(node: Node, **changes: object) -> Node:
    """A copy of `node` with leaf fields changed (through wrappers; for every batch member)."""
    if isinstance(node, Batch):
        return dataclasses.replace(node, members=tuple(rebuild(m, **changes) for m in node.members))
    if isinstance(node, _Wrapper):
        return dataclasses.replace(node, body=rebuild(node.body, **changes))
    return dataclasses.replace(node, **changes)


def rename_inputs(node: Node, renamed: Mapping[str, str]) -> Node:
    """`node` reading `renamed[x]` instead of node `x`."""
    if not renamed.keys() & node.inputs:
        return node
    if isinstance(node, Batch):
        return dataclasses.replace(
            node, members=tuple(rename_inputs(m, renamed) for m in node.members)
        )
    return rebuild(node, inputs=frozenset(renamed.get(i, i) for i in node.inputs))


def node_sources(node: Node) -> Iterator[Source]:
    """Every template and expression a node evaluates."""
    for leaf in leaves(node):
        yield from step_sources(leaf.step_ids[0], leaf.step)


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LogicalPlan:
    """A DAG of operators (in topological order) and the outputs it must produce."""

    spec: PipelineSpec
    models: Mapping[str, str]  # alias -> target
    nodes: Mapping[str, Node]
    outputs: Mapping[str, frozenset[str]]  # output name -> steps it reads

    @cached_property
    def step_node(self) -> dict[str, str]:
        """Step id -> id of the node producing it."""
        return {s: node.id for node in self.nodes.values() for s in node.step_ids}

    def node_of(self, step_id: str) -> Node:
        """The node producing a step's output."""
        return self.nodes[self.step_node[step_id]]

    @cached_property
    def readers(self) -> dict[str, list[tuple[str, str]]]:
        """Step id -> (node id, field pointer) of every node field that reads it."""
        found: dict[str, list[tuple[str, str]]] = {}
        for node in self.nodes.values():
            for src in node_sources(node):
                for step in expressions.references(src.text, expression=src.expression):
                    found.setdefault(step, []).append((node.id, src.path))
        return found

    def read_by_outputs(self, step_id: str) -> bool:
        """Whether an output template reads a step."""
        return any(step_id in refs for refs in self.outputs.values())

    def with_nodes(self, nodes: Iterable[Node]) -> LogicalPlan:
        """A plan over `nodes`, re-sorted topologically (ties in spec order)."""
        return dataclasses.replace(self, nodes=_topological(self.spec, nodes))

    def to_s(self) -> str:
        """The indented tree (STYLE 5): EXPLAIN, logs and rule fixtures print this."""
        return "\n".join(_Printer(self).lines())


def _topological(spec: PipelineSpec, nodes: Iterable[Node]) -> dict[str, Node]:
    by_id = {node.id: node for node in nodes}
    order = {step: i for i, step in enumerate(spec.steps)}
    graph = nx.DiGraph()
    graph.add_nodes_from(by_id)
    graph.add_edges_from((i, node.id) for node in by_id.values() for i in node.inputs if i in by_id)
    rank = {
        nid: min(order.get(s, len(order)) for s in node.step_ids) for nid, node in by_id.items()
    }
    try:
        ordered = nx.lexicographical_topological_sort(graph, key=lambda nid: (rank[nid], nid))
        return {nid: by_id[nid] for nid in ordered}
    except nx.NetworkXUnfeasible:  # a cyclic plan is kept as is for the invariant check to name
        return by_id


class _Printer:
    def __init__(self, plan: LogicalPlan) -> None:
        self.plan = plan
        self.order = {nid: i for i, nid in enumerate(plan.nodes)}
        self.printed: set[str] = set()
        self.out: list[str] = []

    def lines(self) -> list[str]:
        """The printed plan, one line per operator."""
        plan = self.plan
        self.out.append(f"Output {', '.join(plan.outputs)}")
        producers = [
            plan.step_node.get(s, s)  # an unproduced step prints as `Missing` (broken plans)
            for refs in plan.outputs.values()
            for s in sorted(refs, key=self._step_rank)
        ]
        for nid in dict.fromkeys(producers):
            self._node(nid, 1)
        read = {i for node in plan.nodes.values() for i in node.inputs}
        for nid in plan.nodes:
            if nid not in self.printed and nid not in read:
                self._node(nid, 0)
        return self.out

    def _step_rank(self, step: str) -> int:
        return self.order.get(self.plan.step_node.get(step, ""), 0)

    def _node(self, nid: str, depth: int) -> None:
        node = self.plan.nodes.get(nid)
        if node is None:
            self.out.append("  " * depth + f"Missing {nid}")
        elif nid in self.printed:
            self.out.append("  " * depth + f"Ref {ids(node)}")
        else:
            self.printed.add(nid)
            self._operator(node, depth)

    def _operator(self, node: Node, depth: int) -> None:
        self.out.append("  " * depth + node.label())
        if isinstance(node, _Wrapper):
            self._operator(node.body, depth + 1)
        elif isinstance(node, Batch):
            for member in node.members:
                self._operator(member, depth + 1)
        else:
            for nid in sorted(node.inputs, key=lambda i: self.order.get(i, -1)):
                self._node(nid, depth + 1)


# ---------------------------------------------------------------------------- building


def build_logical(bound: BoundSpec) -> LogicalPlan:
    """One operator per step, in spec order; `Map` and `Fallback` wrap the step's leaf."""
    nodes = [_node(step_id, step, bound) for step_id, step in bound.spec.steps.items()]
    return LogicalPlan(bound.spec, dict(bound.models), {}, dict(bound.output_refs)).with_nodes(
        nodes
    )


def _node(step_id: str, step: Step, bound: BoundSpec) -> Node:
    common = {
        "id": step_id,
        "step_ids": (step_id,),
        "inputs": bound.deps[step_id],
        "step": step,
        "enabled_by": bound.enabled_by.get(step_id),
    }
    node: Node
    if step.generate is not None:
        alias = step.generate.model
        node = Generate(alias=alias, target=bound.models[alias], **common)
    elif step.tool is not None:
        node = CallTool(tool=step.tool, **common)
    elif step.filter is not None:
        node = Filter(**common)
    elif step.route is not None:
        node = Route(**common)
    elif step.plan is not None:
        node = Plan(
            planner=_model(step.plan.planner.model, bound.models),
            joiner=_model(step.plan.joiner.model, bound.models),
            tools=tuple(bound.spec.tools),
            **common,
        )
    else:
        node = Subpipeline(pipeline=step.pipeline.name, **common)
    if step.fallback:
        node = Fallback(body=node, alternatives=_alternatives(step, bound.models))
    if step.map is not None:
        node = Map(body=node)
    return node


def _model(alias: str, models: Mapping[str, str]) -> tuple[str, str]:
    return alias, models[alias]


def _alternatives(step: Step, models: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(f"{f.model}({models[f.model]})" if f.model else f.tool for f in step.fallback)
