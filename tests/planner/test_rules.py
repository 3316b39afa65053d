"""Rule fixtures: `tests/fixtures/planner/<rule>.yaml` cases {title, spec, expected_plan[, stats]}.

Each case plans `spec`, applies the one rule, checks the optimizer's invariants, and compares the
printed plan with `expected_plan`. Adding a case is a text edit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from planner import rules
from planner.cost import Aggregate, Statistics
from planner.examples import plan_from_yaml
from planner.optimizer import violations

FIXTURES = Path(__file__).parents[1] / "fixtures" / "planner"


def cases() -> list[Any]:
    found = []
    for path in sorted(FIXTURES.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text(encoding="utf-8")):
            found.append(pytest.param(path.stem, case, id=f"{path.stem}: {case['title']}"))
    return found


def statistics(case: dict[str, Any]) -> Statistics:
    steps = case.get("stats") or {}
    return Statistics(
        steps={("example", step): Aggregate(**figures) for step, figures in steps.items()}
    )


@pytest.mark.parametrize(("rule_name", "case"), cases())
def test_rule_fixture(rule_name: str, case: dict[str, Any]) -> None:
    rule = getattr(rules, rule_name)
    before = plan_from_yaml(case["spec"])
    after = rule(before, stats=statistics(case))
    assert list(violations(before, after)) == []
    assert after.to_s() == case["expected_plan"].rstrip("\n")


def test_every_rule_has_fixtures() -> None:
    assert {rule.__name__ for rule in rules.RULES} == {p.stem for p in FIXTURES.glob("*.yaml")}


def test_rules_are_pure() -> None:
    plan = plan_from_yaml(
        "models: {w: demo-base}\nsteps:\n  a: {generate: {model: w, prompt: a}}\n"
        "  b: {generate: {model: w, prompt: a}}\n  dead: {generate: {model: w, prompt: d}}\n"
        "outputs: {o: '{{ steps.a.output }}{{ steps.b.output }}'}\n"
    )
    printed = plan.to_s()
    for rule in rules.RULES:
        rule(plan, stats=Statistics.empty())
    assert plan.to_s() == printed
