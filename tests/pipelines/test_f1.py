"""f1 and its sequential baseline on the trained demo zoo (demo-base and its adapters).

The zoo's planner writes a correct plan for about half the held-out questions, so these
tests check the machinery on real model output and a floor on answers, not every answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine import Engine
from executor import events
from executor.backends import Backends, EngineBackend, ModelCall, ModelResult
from executor.run import execute
from models.tasks import execute_plan, final_answer, generate, joiner_user
from planner import Catalog, PhysicalPlan, compile_text
from planner.plan_format import format_plan, parse_plan
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


class GoldPlanner:
    """Routes to `reason`, plans the gold plan, and records the joiner's prompt: what the
    pipeline serves the joiner, without a model's mistakes in the way."""

    def __init__(self, plan: str) -> None:
        self.plan, self.joiner_prompts = plan, []
        self.lines = iter(plan.split("\n"))  # a sequential planner writes one line per call

    def serves(self, target: str) -> bool:
        """Every demo-base target."""
        return target.startswith("demo-base")

    async def generate(
        self, call: ModelCall, on_delta: Callable[[str], None] | None = None
    ) -> ModelResult:
        """The scripted answer of each model of the pipeline, streamed in one piece."""
        text = {"demo-base:router": "compare", "demo-base:planner": self.plan}.get(call.target, "")
        if call.target == "demo-base:joiner":
            self.joiner_prompts.append(call.messages[-1]["content"])
            text = call.choice[0]
        elif call.target == "demo-base:planner" and "\n" in call.stop:
            text = next(self.lines)
        if on_delta is not None:
            on_delta(text)
        return ModelResult(text=text, prompt_tokens=1, completion_tokens=1, finish_reason="stop")


@pytest.mark.parametrize("name", ["f1", "react_baseline"])
async def test_the_served_joiner_prompt_is_the_one_the_joiner_trained_on(
    name: str, tools: ToolRegistry
) -> None:
    world = generate_world(0)
    models = {"demo-base", *(f"demo-base:{t}" for t in ("router", "planner", "joiner"))}
    path = PIPELINES / f"{name}.yaml"
    catalog = Catalog(models=models, tools=tools.schemas())
    plan = compile_text(path.read_bytes(), catalog=catalog, fmt="yaml", source=str(path))
    kinds = set()
    for ex in generate("planner", "heldout", 16, world):
        gold = parse_plan(ex.answer)
        model = GoldPlanner(format_plan(gold))
        result = await execute(
            plan,
            {"messages": [{"role": "user", "content": ex.user}]},
            backends=Backends([model]),
            tools=tools,
        )
        assert result.status == "succeeded", result.error
        assert model.joiner_prompts == [joiner_user(ex.user, gold, execute_plan(gold, world))]
        kinds.add(ex.meta["kind"])
    assert {"pick", "argext"} <= kinds  # the "which" questions, whose calc lines carry notes
