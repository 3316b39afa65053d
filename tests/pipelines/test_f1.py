"""f1 and its sequential baseline on the trained demo zoo (demo-base and its adapters).

The zoo's planner writes a correct plan for about half the held-out questions, so these
tests check the machinery on real model output and a floor on answers, not every answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import Engine
from executor import events
from executor.backends import Backends, EngineBackend
from executor.run import execute
from models.tasks import execute_plan, final_answer, generate
from planner import Catalog, PhysicalPlan, compile_text
from planner.plan_format import parse_plan
from tests.pipelines.conftest import PIPELINES
from tools import ToolRegistry, default_registry
from tools.kb import generate_world

ZOO = Path(__file__).resolve().parents[2] / "models"
QUESTIONS = 6


@pytest.fixture(scope="module")
def zoo_engine() -> Iterator[Engine]:
    """demo-base with the zoo's adapters, on CPU."""
    engine = Engine(memory_budget_bytes=1 << 30, device="cpu")
    engine.load_model("demo-base", ZOO / "demo-base", adapter_dir=str(ZOO / "adapters"))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def tools() -> ToolRegistry:
    """The built-in tools."""
    return default_registry()


def compiled(name: str, engine: Engine, tools: ToolRegistry) -> PhysicalPlan:
    path = PIPELINES / f"{name}.yaml"
    catalog = Catalog(models=engine.serves, tools=tools.schemas())
    return compile_text(path.read_bytes(), catalog=catalog, fmt="yaml", source=str(path))


def heldout() -> list[tuple[str, str]]:
    world = generate_world(0)
    out = []
    for ex in generate("planner", "heldout", QUESTIONS, world):
        plan = parse_plan(ex.answer)
        out.append((ex.user, final_answer(plan, execute_plan(plan, world), ex.meta["kind"])))
    return out


@pytest.mark.parametrize("name", ["f1", "react_baseline"])
async def test_answers_held_out_questions_with_a_traced_dynamic_dag(
    name: str, zoo_engine: Engine, tools: ToolRegistry
) -> None:
    plan = compiled(name, zoo_engine, tools)
    right = 0
    for question, gold in heldout():
        found: list[events.Event] = []
        result = await execute(
            plan,
            {"messages": [{"role": "user", "content": question}]},
            backends=Backends([EngineBackend(zoo_engine)]),
            tools=tools,
            emit=found.append,
        )
        steps = {e.step for e in found if isinstance(e, events.StepStarted)}
        assert any(s.startswith("reason.1.planner") for s in steps)
        if result.status == "succeeded":
            # the tool calls of the plan, and the joiner, are steps of the run's trace
            assert {"reason.1.1", "reason.1.joiner"} <= steps or "reason.2.joiner" in steps
            right += result.outputs["answer"].strip() == gold
            # what a chat client is streamed of the plan step is exactly its answer
            deltas = [e for e in found if isinstance(e, events.TokenDelta) and e.step == "reason"]
            assert "".join(e.text for e in deltas) == result.outputs["answer"]
        else:  # a plan the executor refused or a tool error, recorded on the run
            assert "no answer in 2 round(s)" in (result.error or "")
    assert right >= QUESTIONS // 3
