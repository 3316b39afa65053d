"""The `plan` step kind through load, bind, the logical and physical plans, and EXPLAIN."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from planner import Catalog, PlanError, SpecErrors, compile_spec, explain, load_spec
from planner.bind import bind
from planner.logical import Plan, build_logical
from planner.spec import PipelineSpec

TOOLS = {"kb.lookup": {"type": "object"}, "calc": {"type": "object"}}
CATALOG = Catalog(models={"base", "base:planner", "base:joiner"}, tools=TOOLS)


def spec(**changes: Any) -> dict[str, Any]:
    plan = {
        "planner": {"model": "p", "prompt": "{{ inputs.q }}"},
        "joiner": {"model": "j", "prompt": "{% for t in plan.tasks %}{{ t.output }}{% endfor %}"},
    }
    plan.update(changes.pop("plan", {}))
    body = {
        "name": "f",
        "inputs": {"q": {"type": "string"}},
        "models": {"p": "base:planner", "j": "base:joiner"},
        "tools": ["kb.lookup", "calc"],
        "steps": {"answer": {"plan": plan}},
        "outputs": {"answer": "{{ steps.answer.output }}"},
    }
    body.update(changes)
    return body


def load(body: dict[str, Any]) -> PipelineSpec:
    return load_spec(json.dumps(body), fmt="json")


def test_a_plan_step_compiles_to_one_plan_task_and_explains() -> None:
    plan = compile_spec(load(spec()), catalog=CATALOG)
    (task,) = plan.topological()
    assert (task.op, task.resource) == ("plan", "local")
    assert task.estimate.tokens > 0
    text = explain(plan, "text")
    assert "Plan answer [local]" in text
    logical = build_logical(bind(load(spec()), catalog=CATALOG))
    node = logical.nodes["answer"]
    assert isinstance(node, Plan) and node.tools == ("kb.lookup", "calc")
    assert (
        "Plan answer planner=p(base:planner) joiner=j(base:joiner) tools=[kb.lookup, calc]"
        " mode=parallel rounds<=2 tasks<=16" in logical.to_s()
    )


def test_plan_steps_read_other_steps_through_their_templates() -> None:
    body = spec(plan={"planner": {"model": "p", "prompt": "{{ steps.first.output }}"}})
    body["steps"]["first"] = {"tool": "calc", "args": {"expression": "1+1"}}
    plan = compile_spec(load(body), catalog=CATALOG)
    assert plan.task("answer").deps == frozenset({"first"})


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        (spec(tools=[]), "/steps/answer/plan", "needs the tools it may call"),
        (spec(plan={"joiner": {"model": "nope", "prompt": "x"}}), "/steps/answer/plan/joiner/model", "unknown model alias"),
    ],
)  # fmt: skip
def test_bind_errors_name_the_field(body: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises((PlanError, SpecErrors)) as caught:
        compile_spec(load(body), catalog=CATALOG)
    errors = caught.value.errors if isinstance(caught.value, SpecErrors) else [caught.value]
    assert any(e.path == path and message in e.message for e in errors), errors


def test_constrained_plans_bind_now_that_the_plan_grammar_exists() -> None:
    plan = compile_spec(load(spec(plan={"constrain": True})), catalog=CATALOG)
    assert plan.task("answer") is not None


def test_load_checks_the_plan_fields() -> None:
    both = spec(
        plan={
            "planner": {"model": "p", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}
        }
    )
    with pytest.raises(SpecErrors) as caught:
        load(both)
    assert [e.path for e in caught.value.errors] == ["/steps/answer/plan/planner"]
    with pytest.raises(SpecErrors):
        load(spec(plan={"max_tasks": 33}))
    with pytest.raises(SpecErrors):
        load(spec(plan={"mode": "eager"}))
    with pytest.raises(SpecErrors) as caught:
        load(spec(plan={"grounded_args": ["entity"]}))
    assert [e.path for e in caught.value.errors] == ["/steps/answer/plan/grounded_args"]
    unsafe = spec(plan={"joiner": {"model": "j", "prompt": "{{ plan.__class__ }}"}})
    with pytest.raises(SpecErrors):
        load(unsafe)


def test_the_schema_knows_the_plan_kind() -> None:
    schema = msgspec.json.schema(PipelineSpec)
    assert "PlanSpec" in schema["$defs"]
