"""EXPLAIN and EXPLAIN ANALYZE in text, JSON and Mermaid."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from planner import explain
from tests.planner.support import compile_yaml
from tests.planner.test_physical import DIAMOND

BATCHED = """\
name: demo
models: {w: demo-base}
steps:
  pros: {generate: {model: w, prompt: "Pros {{ inputs.t }}", max_tokens: 100}}
  cons: {generate: {model: w, prompt: "Cons {{ inputs.t }}", max_tokens: 80}}
  verdict: {generate: {model: w, prompt: "{{ steps.pros.output }} {{ steps.cons.output }}", max_tokens: 10}}
outputs: {v: "{{ steps.verdict.output }}"}
"""


@dataclass
class StepRun:
    started_at: float
    finished_at: float
    tokens: int
    attempts: int


def test_text_is_an_indented_tree_with_the_critical_path_marked() -> None:
    assert explain(compile_yaml(DIAMOND)) == "\n".join(
        [
            "Plan demo: 4 tasks, estimated 2.30 s, 115 tokens; critical path: a -> b -> d",
            "Output d",
            "  * Generate d [model:demo-base] est 0.10 s, 5 tok, prio 0.10 s",
            "    * Generate b [model:demo-base] est 2.00 s, 100 tok, prio 2.10 s",
            "      * Generate a [model:demo-base] est 0.20 s, 10 tok, prio 2.30 s",
            "    CallTool c [tool:calc] est 0.05 s, 0 tok, prio 0.15 s",
            "      Ref a",
        ]
    )


def test_text_shows_batch_members() -> None:
    text = explain(compile_yaml(BATCHED))
    assert text.splitlines()[2:] == [
        "  * Generate verdict [model:demo-base] est 0.20 s, 10 tok, prio 0.20 s",
        "    * Batch batch:demo-base:0 [model:demo-base] est 2.00 s, 180 tok, prio 2.20 s",
        "      Generate pros [model:demo-base] est 2.00 s, 100 tok",
        "      Generate cons [model:demo-base] est 1.60 s, 80 tok",
    ]


def test_analyze_puts_actuals_beside_estimates() -> None:
    plan = compile_yaml(DIAMOND)
    analyze = {
        "a": {"latency_s": 0.31, "tokens": 12, "attempts": 1, "status": "finished"},
        "b": StepRun(started_at=10.0, finished_at=12.5, tokens=90, attempts=2),
    }
    lines = explain(plan, analyze=analyze).splitlines()
    assert lines[3].endswith("prio 2.10 s | actual 2.50 s, 90 tok, 2 attempts")
    assert lines[4].endswith("prio 2.30 s | actual 0.31 s, 12 tok, 1 attempt, finished")
    assert "actual" not in lines[5]


def test_json() -> None:
    plan = compile_yaml(BATCHED)
    body = json.loads(explain(plan, "json", analyze={"pros": {"latency_s": 1.0, "tokens": 50}}))
    assert body["pipeline"] == "demo"
    assert body["critical_path"] == ["batch:demo-base:0", "verdict"]
    assert body["estimate"] == {"latency_s": pytest.approx(2.2), "tokens": 190}
    assert body["outputs"] == {"v": ["verdict"]}
    batch, verdict = body["tasks"]
    assert batch["op"] == "batch" and batch["critical"] is True
    assert [m["id"] for m in batch["members"]] == ["pros", "cons"]
    assert batch["members"][0]["actual"] == {"latency_s": 1.0, "tokens": 50}
    assert verdict["deps"] == ["batch:demo-base:0"]
    assert verdict["priority_s"] == pytest.approx(0.2)


def test_json_route_branch() -> None:
    text = DIAMOND.replace(
        "  d:", "  r: {route: {branches: [{when: 'inputs.x', steps: [d]}]}}\n  d:"
    )
    tasks = {t["id"]: t for t in json.loads(explain(compile_yaml(text), "json"))["tasks"]}
    assert tasks["d"]["enabled_by"] == {"route": "r", "branch": "0"}


def test_mermaid() -> None:
    chart = explain(compile_yaml(DIAMOND), "mermaid", analyze={"c": {"latency_s": 0.04}})
    lines = chart.splitlines()
    assert lines[0] == "flowchart TD"
    assert '  t0["Generate a<br/>model:demo-base<br/>est 0.20 s, 10 tok"]' in lines
    assert (
        '  t2["CallTool c<br/>tool:calc<br/>est 0.05 s, 0 tok<br/>actual 0.04 s, 0 tok"]' in lines
    )
    assert {"  t0 --> t1", "  t0 --> t2", "  t1 --> t3", "  t2 --> t3", "  t3 --> out"} <= set(
        lines
    )
    assert '  out(["Output: d"])' in lines
    assert lines[-1] == "  class t0,t1,t3 critical"


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown EXPLAIN format"):
        explain(compile_yaml(DIAMOND), "dot")
