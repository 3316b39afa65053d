"""The optimizer driver: rules in order, invariants after each, the culprit named."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from planner import InvariantError, Statistics
from planner.examples import plan_from_yaml
from planner.logical import Batch, Generate, LogicalPlan, rebuild
from planner.optimizer import optimize
from planner.rules import RULES
from tests.planner.support import TRIAGE

SPEC = """\
models: {w: demo-base}
steps:
  a: {generate: {model: w, prompt: "A {{ inputs.q }}"}}
  b: {generate: {model: w, prompt: "B {{ steps.a.output }}"}}
  c: {generate: {model: w, prompt: "C {{ steps.a.output }}"}}
outputs: {b: "{{ steps.b.output }}", c: "{{ steps.c.output }}"}
"""


def drop_producer_of_a(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    return plan.with_nodes(n for n in plan.nodes.values() if n.id != "a")


def drop_producer_of_c(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    return plan.with_nodes(n for n in plan.nodes.values() if n.id != "c")


def produce_b_twice(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    others = [n for n in plan.nodes.values() if n.id != "c"]
    return plan.with_nodes([*others, rebuild(plan.nodes["c"], step_ids=("c", "b"))])


def add_a_cycle(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    a = rebuild(plan.nodes["a"], inputs=frozenset({"b"}))
    return plan.with_nodes([a, *(n for n in plan.nodes.values() if n.id != "a")])


def forget_an_input(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    b = rebuild(plan.nodes["b"], inputs=frozenset())
    return plan.with_nodes([b, *(n for n in plan.nodes.values() if n.id != "b")])


def change_outputs(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    return dataclasses.replace(plan, outputs={"b": frozenset({"b"})})


def read_a_missing_node(plan: LogicalPlan, **ctx: Any) -> LogicalPlan:
    c = rebuild(plan.nodes["c"], inputs=frozenset({"a", "ghost"}))
    return plan.with_nodes([c, *(n for n in plan.nodes.values() if n.id != "c")])


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (drop_producer_of_a, "node `b` reads `a`, which is not in the plan"),
        (drop_producer_of_c, "output `c` reads `c`, which no node produces"),
        (produce_b_twice, "step `b` is produced by 2 nodes"),
        (add_a_cycle, "the plan has a cycle"),
        (forget_an_input, "node `b` reads `a` but does not wait for `a`"),
        (change_outputs, "the outputs changed"),
        (read_a_missing_node, "reads `ghost`, which is not in the plan"),
    ],
)
def test_broken_rule_is_named(rule: Any, message: str) -> None:
    plan = plan_from_yaml(SPEC)
    with pytest.raises(InvariantError) as info:
        optimize(plan, rules=(RULES[0], rule, *RULES[1:]))
    assert info.value.rule == rule.__name__
    assert message in info.value.message
    assert str(info.value).startswith(f"rule {rule.__name__} broke an invariant")


def test_full_optimization_of_the_design_sketch() -> None:
    plan = optimize(plan_from_yaml(TRIAGE), stats=Statistics.empty())
    assert plan.to_s() == "\n".join(
        [
            "Output intent, reply",
            "  Generate intent model=small(demo-base:router)",
            "  Fallback answer alternatives=[small(demo-base:router)]",
            "    Generate answer model=writer(demo-base) when=`steps.intent.output != 'other'` retries=2 timeout=10s",
            "      Ref intent",
            "      CallTool facts tool=kb.search",
        ]
    )


def test_rules_compose() -> None:
    plan = optimize(
        plan_from_yaml(
            "models: {w: demo-base, v: demo-base}\nsteps:\n"
            "  a: {generate: {model: w, prompt: 'same {{ inputs.q }}'}}\n"
            "  b: {generate: {model: v, prompt: 'same {{ inputs.q }}'}}\n"
            "  c: {generate: {model: w, prompt: 'other {{ inputs.q }}'}}\n"
            "  dead: {generate: {model: w, prompt: 'unused'}}\n"
            "outputs: {o: '{{ steps.a.output }} {{ steps.b.output }} {{ steps.c.output }}'}\n"
        )
    )
    (batch,) = plan.nodes.values()
    assert isinstance(batch, Batch)
    assert batch.step_ids == ("a", "b", "c")
    assert [type(m) for m in batch.members] == [Generate, Generate]


def test_rules_order() -> None:
    assert [r.__name__ for r in RULES] == [
        "prune_dead_steps",
        "merge_identical_calls",
        "push_limit_into_map",
        "order_filters",
        "batch_same_model_calls",
    ]
