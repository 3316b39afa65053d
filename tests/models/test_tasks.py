"""Task generators: deterministic, disjoint splits, gold plans that parse and execute."""

from __future__ import annotations

import json

import pytest

from models import tasks
from planner.plan_format import parse_plan
from tools.kb import World, generate_world


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(0)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_generators_are_deterministic(task: str, world: World) -> None:
    assert tasks.generate(task, "heldout", 30, world) == tasks.generate(task, "heldout", 30, world)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_train_and_heldout_are_disjoint(task: str, world: World) -> None:
    heldout = {e.user for e in tasks.generate(task, "heldout", 200, world)}
    validation = {e.user for e in tasks.generate(task, "validation", 200, world)}
    train = {e.user for e in tasks.generate(task, "train", 300, world)}
    assert not heldout & train
    assert not validation & train
    assert not validation & heldout


def test_router_covers_every_intent(world: World) -> None:
    intents = {e.answer for e in tasks.generate("router", "heldout", 200, world)}
    assert intents == set(tasks.INTENTS)
    assert len(tasks.INTENTS) >= 6


def test_gold_plans_parse_execute_and_end_with_join(world: World) -> None:
    for e in tasks.generate("planner", "heldout", 100, world):
        plan = parse_plan(e.answer)
        assert e.answer.endswith("join()")
        lookups = [s for s in plan.steps if s.tool == "kb.lookup"]
        assert 1 <= len(lookups) <= 5
        results = tasks.execute_plan(plan, world)
        assert tasks.final_answer(plan, results, e.meta["kind"])


def test_joiner_answers_follow_from_results(world: World) -> None:
    for e in tasks.generate("joiner", "heldout", 50, world):
        assert e.user.startswith("Question: ")
        assert e.answer in e.user or e.answer.lstrip("-").replace(".", "").isdigit()


def test_extract_answers_are_json_matching_the_schema(world: World) -> None:
    for e in tasks.generate("extract", "heldout", 50, world):
        schema = json.loads(e.user.split("\n")[0].removeprefix("Schema: "))
        answer = json.loads(e.answer)
        assert list(answer) == list(schema["properties"])


def test_docstring_examples() -> None:
    import doctest

    result = doctest.testmod(tasks)
    assert result.attempted > 0
    assert result.failed == 0
