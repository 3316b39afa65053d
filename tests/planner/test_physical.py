"""The physical plan: tasks, resources, estimates, critical path, priorities, batching by cost."""

from __future__ import annotations

import pytest

from planner import Aggregate, Statistics
from planner.cost import batch_pays_off
from planner.physical import Estimate
from tests.planner.support import compile_yaml

DIAMOND = """\
name: demo
models: {w: demo-base}
tools: [calc]
steps:
  a: {generate: {model: w, prompt: "A {{ inputs.q }}", max_tokens: 10}}
  b: {generate: {model: w, prompt: "B {{ steps.a.output }}", max_tokens: 100}}
  c: {tool: calc, args: {expression: "{{ steps.a.output }}"}}
  d: {generate: {model: w, prompt: "D {{ steps.b.output }} {{ steps.c.output }}", max_tokens: 5}}
outputs: {d: "{{ steps.d.output }}"}
"""


def test_tasks_resources_and_dependencies() -> None:
    plan = compile_yaml(DIAMOND)
    assert [t.id for t in plan.topological()] == ["a", "b", "c", "d"]
    assert plan.task("c").op == "tool"
    assert plan.task("c").resource == "tool:calc"
    assert plan.task("b").resource == "model:demo-base"
    assert plan.task("d").deps == {"b", "c"}
    assert plan.step_task == {"a": "a", "b": "b", "c": "c", "d": "d"}
    assert set(plan.graph.edges) == {("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")}
    assert plan.models == {"w": "demo-base"}
    assert plan.outputs == {"d": {"d"}}


def test_default_estimates_critical_path_and_priorities() -> None:
    plan = compile_yaml(DIAMOND)
    assert plan.task("a").estimate == Estimate(latency_s=pytest.approx(0.2), tokens=10)
    assert plan.task("c").estimate == Estimate(latency_s=0.05)
    path, total = plan.critical_path()
    assert path == ["a", "b", "d"]
    assert total == pytest.approx(2.3)
    assert plan.priority("a") == pytest.approx(2.3)
    assert plan.priority("b") == pytest.approx(2.1)
    assert plan.priority("c") == pytest.approx(0.15)
    assert plan.priority("d") == pytest.approx(0.1)


def test_statistics_drive_estimates() -> None:
    stats = Statistics(
        models={"demo-base": Aggregate(latency_s=1.0, tokens=100, count=5)},
        tools={"calc": Aggregate(latency_s=0.5, failure_rate=0.5, count=3)},
        steps={("demo", "d"): Aggregate(latency_s=7.0, tokens=3, failure_rate=0.1, count=2)},
    )
    plan = compile_yaml(DIAMOND, stats=stats)
    assert plan.task("a").estimate.latency_s == pytest.approx(0.1)  # 10 tokens at 0.01 s
    assert plan.task("b").estimate == Estimate(latency_s=pytest.approx(1.0), tokens=100)
    assert plan.task("c").estimate == Estimate(latency_s=0.5, failure_rate=0.5)
    assert plan.task("d").estimate == Estimate(latency_s=7.0, tokens=3, failure_rate=0.1)
    assert plan.critical_path() == (["a", "b", "d"], pytest.approx(8.1))


def test_unobserved_aggregates_are_ignored() -> None:
    stats = Statistics(models={"demo-base": Aggregate(latency_s=99.0, tokens=1, count=0)})
    assert compile_yaml(DIAMOND, stats=stats).task("a").estimate.latency_s == pytest.approx(0.2)


def test_retries_fallbacks_and_maps_in_estimates() -> None:
    text = """\
name: demo
models: {w: demo-base, v: demo-base:router}
tools: [calc]
steps:
  t: {tool: calc, args: {expression: "1"}, retries: 2}
  g: {generate: {model: w, prompt: "x", max_tokens: 10}, fallback: [{model: v}]}
  m: {map: inputs.xs, map_limit: 8, concurrency: 2, generate: {model: w, prompt: "{{ item }}", max_tokens: 10}}
outputs: {o: "{{ steps.t.output }}{{ steps.g.output }}{{ steps.m.output }}"}
"""
    stats = Statistics(
        models={"demo-base": Aggregate(latency_s=0.2, tokens=10, failure_rate=0.5, count=1)},
        tools={"calc": Aggregate(latency_s=1.0, failure_rate=0.5, count=1)},
    )
    plan = compile_yaml(text, stats=stats)
    assert plan.task("t").estimate == Estimate(latency_s=1.75, tokens=0, failure_rate=0.125)
    assert plan.task("g").estimate == Estimate(
        latency_s=pytest.approx(0.3), tokens=15, failure_rate=0.25
    )
    m = plan.task("m").estimate
    assert (m.latency_s, m.tokens) == (pytest.approx(0.8), 80)  # 4 waves of 2, 8 items


def test_similar_calls_run_as_one_batch_task() -> None:
    text = """\
name: demo
models: {w: demo-base}
steps:
  pros: {generate: {model: w, prompt: "Pros {{ inputs.t }}", max_tokens: 100}}
  cons: {generate: {model: w, prompt: "Cons {{ inputs.t }}", max_tokens: 80}}
  verdict: {generate: {model: w, prompt: "{{ steps.pros.output }} {{ steps.cons.output }}"}}
outputs: {v: "{{ steps.verdict.output }}"}
"""
    plan = compile_yaml(text)
    batch = plan.task("batch:demo-base:0")
    assert batch.op == "batch"
    assert batch.step is None
    assert batch.step_ids == ("pros", "cons")
    assert [m.id for m in batch.members] == ["pros", "cons"]
    assert all(m.op == "generate" and m.step is not None for m in batch.members)
    assert batch.estimate.latency_s == pytest.approx(2.0)  # the slowest member
    assert batch.estimate.tokens == 180
    assert plan.step_task["cons"] == "batch:demo-base:0"
    assert plan.task("verdict").deps == {"batch:demo-base:0"}


def test_dissimilar_calls_are_not_batched() -> None:
    text = """\
name: demo
models: {w: demo-base}
steps:
  label: {generate: {model: w, prompt: "Label {{ inputs.t }}", max_tokens: 4}}
  essay: {generate: {model: w, prompt: "Essay {{ inputs.t }}", max_tokens: 400}}
  use: {generate: {model: w, prompt: "{{ steps.label.output }}"}}
outputs: {o: "{{ steps.use.output }} {{ steps.essay.output }}"}
"""
    plan = compile_yaml(text)
    assert sorted(plan.graph.nodes) == ["essay", "label", "use"]
    assert plan.task("use").deps == {"label"}  # not the slow essay
    assert not batch_pays_off([Estimate(0.08), Estimate(8.0)])
    assert batch_pays_off([Estimate(1.0), Estimate(3.0)])


def test_routes_merges_and_rewritten_steps_reach_the_tasks() -> None:
    text = """\
name: demo
models: {w: demo-base}
steps:
  r: {route: {branches: [{when: "inputs.x", steps: [a]}], default: [b]}}
  a: {generate: {model: w, prompt: "A"}}
  b: {map: inputs.xs, generate: {model: w, prompt: "B {{ item }}"}}
  c: {map: steps.b.output, map_limit: 2, generate: {model: w, prompt: "C {{ item }}"}}
  s: {pipeline: {name: summarize, inputs: {text: "{{ steps.a.output }}"}}}
  s2: {pipeline: {name: summarize, inputs: {text: "{{ steps.a.output }}"}}}
outputs: {o: "{{ steps.c.output }} {{ steps.s.output }} {{ steps.s2.output }}"}
"""
    plan = compile_yaml(text)
    assert plan.task("a").enabled_by == ("r", "0")
    assert plan.task("b").enabled_by == ("r", "default")
    assert plan.task("r").resource == "local"
    assert plan.task("s").op == "pipeline"
    assert plan.task("s").step_ids == ("s", "s2")
    assert plan.step_task["s2"] == "s"
    assert plan.task("b").step.map_limit == 2  # narrowed by push_limit_into_map


def test_rules_can_be_turned_off() -> None:
    text = DIAMOND.replace("outputs:", "  dead: {tool: calc, args: {expression: '1'}}\noutputs:")
    assert "dead" not in compile_yaml(text).graph
    assert "dead" in compile_yaml(text, rules=()).graph
