"""calc: the cases in calc_cases.yaml, the size limits, and the tool's registration."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

import tools.calc
from tools.calc import MAX_DEPTH, MAX_LENGTH, MAX_NODES, calc
from tools.errors import ToolArgumentError, ToolError
from tools.registry import ToolRegistry

CASES: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).parent / "calc_cases.yaml").read_text()
)


@pytest.mark.parametrize("case", CASES, ids=[c["expression"] or "<empty>" for c in CASES])
def test_case(case: dict[str, Any]) -> None:
    if "error" in case:
        with pytest.raises(ToolError) as caught:
            calc(case["expression"])
        assert case["error"] in str(caught.value)
    else:
        result = calc(case["expression"])
        assert result == case["value"]
        assert type(result) is type(case["value"])


def test_every_case_is_one_of_value_or_error() -> None:
    for case in CASES:
        assert ("value" in case) != ("error" in case), case


def test_long_expression_is_refused() -> None:
    with pytest.raises(ToolError, match=f"longer than {MAX_LENGTH}"):
        calc("1+" * (MAX_LENGTH // 2) + "1")


def test_too_many_parts_are_refused() -> None:
    expression = "+".join(["1"] * (MAX_NODES // 2))
    assert len(expression) <= MAX_LENGTH
    with pytest.raises(ToolError, match="more than"):
        calc(expression)


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(ToolError, match="nested"):
        calc("-" * (MAX_DEPTH + 5) + "1")
    with pytest.raises(ToolError, match="invalid expression"):
        calc("(" * 300 + "1" + ")" * 300)


def test_the_evaluator_never_calls_eval_or_exec() -> None:
    source = inspect.getsource(tools.calc)
    called = {
        node.func.id
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not called & {"eval", "exec", "compile", "__import__", "getattr"}


async def test_calc_as_a_tool() -> None:
    registry = ToolRegistry()
    registry.register("calc", calc)
    assert await registry.call("calc", {"expression": "120 * 1.2 > 140"}) is True
    with pytest.raises(ToolArgumentError) as caught:
        await registry.call("calc", {"expression": 3})
    assert caught.value.path == "/expression"
    with pytest.raises(ToolError, match="division by zero") as failed:
        await registry.call("calc", {"expression": "1/0"})
    assert failed.value.tool == "calc"
