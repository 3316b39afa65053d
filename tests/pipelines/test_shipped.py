"""Every shipped spec validates, explains in each format and runs on the tiny demo model.

The tiny checkpoint writes gibberish, so each spec's expectations check what the machinery
does (fan-out sizes, the route taken and the branches skipped, tool results, the retries and
fallback of a step whose output must be JSON), not what the text says.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine import Engine
from executor import events
from executor.backends import Backends, EngineBackend
from executor.run import RunResult, execute
from planner import Catalog, PhysicalPlan, compile_text, explain
from server.catalog import spec_files, spec_format
from server.cli import main
from tests.pipelines.conftest import DEMO_MODEL, PIPELINES
from tools import ToolRegistry, default_registry

SPECS = spec_files(PIPELINES)
ZOO_ADAPTERS = ("router", "extract", "planner", "joiner")
# Specs on the zoo's adapters run on the trained demo zoo in test_f1.py, not on the tiny model.
ZOO_SPECS = {"f1", "react_baseline"}
Events = list[events.Event]


@pytest.fixture(scope="module")
def tools() -> ToolRegistry:
    """The built-in tools, as the server registers them."""
    return default_registry()


def compile_file(path: Path, tools: ToolRegistry) -> PhysicalPlan:
    """The plan of a shipped spec against a catalog serving the demo model (and its zoo
    adapters) and the tools."""
    models = {DEMO_MODEL, *(f"{DEMO_MODEL}:{a}" for a in ZOO_ADAPTERS)}
    catalog = Catalog(models=models, tools=tools.schemas(), pipelines={p.stem for p in SPECS})
    return compile_text(path.read_bytes(), catalog=catalog, fmt=spec_format(path), source=str(path))


def steps_by_status(found: Events, kind: type) -> list[str]:
    """Steps named by events of one kind, in order."""
    return [e.step for e in found if isinstance(e, kind)]


def check_entity_briefs(result: RunResult, found: Events) -> None:
    entities = result.outputs["entities"]
    assert len(entities) == 3 and all(isinstance(e, str) for e in entities)
    briefs = result.outputs["briefs"]
    assert isinstance(briefs, list) and len(briefs) == len(entities)
    assert all(isinstance(b, str) for b in briefs)


def check_ticket_triage(result: RunResult, found: Events) -> None:
    replies = {"0": "billing_reply", "1": "outage_reply", "default": "general_reply"}
    branch = result.outputs["branch"]
    assert branch in replies
    ran = replies[branch]
    assert steps_by_status(found, events.StepFinished) == ["intent", "triage", ran]
    assert sorted(steps_by_status(found, events.StepSkipped)) == sorted(
        set(replies.values()) - {ran}
    )
    assert result.outputs["reply"] == result.steps[ran].output


def check_city_density(result: RunResult, found: Events) -> None:
    outputs = result.outputs
    assert outputs["city"] == "Elsamzix"
    assert (outputs["population"], outputs["area_km2"]) == (215775, 25.1)
    assert outputs["density"] == round(215775 / 25.1, 1)
    assert isinstance(outputs["summary"], str)


def check_city_facts(result: RunResult, found: Events) -> None:
    # Gibberish is never the JSON the schema wants: attempt 1, one retry, then the fallback
    # model; the run fails at `facts` with the last error, after `describe` succeeded.
    assert (result.status, result.failed_step) == ("failed", "facts")
    assert "not valid JSON" in (result.error or "")
    assert steps_by_status(found, events.StepFinished) == ["describe"]
    retried = [e for e in found if isinstance(e, events.StepRetried)]
    assert [(e.step, e.attempt) for e in retried] == [("facts", 2), ("facts", 3)]
    failed = [e for e in found if isinstance(e, events.StepFailed)]
    assert [(e.step, e.attempts) for e in failed] == [("facts", 3)]


EXPECTATIONS: dict[str, tuple[str, Callable[[RunResult, Events], None]]] = {
    "entity-briefs": ("succeeded", check_entity_briefs),
    "ticket-triage": ("succeeded", check_ticket_triage),
    "city-density": ("succeeded", check_city_density),
    "city-facts": ("failed", check_city_facts),
}
INPUTS: dict[str, dict[str, Any]] = {"ticket-triage": {"ticket": "I was charged twice."}}


def test_every_shipped_spec_has_expectations() -> None:
    assert sorted(p.stem for p in SPECS) == sorted([*EXPECTATIONS, *ZOO_SPECS])


def test_the_examples_cover_fan_out_routing_fallback_and_a_tool_chain(tools: ToolRegistry) -> None:
    plans = [compile_file(p, tools) for p in SPECS]
    steps = [s for plan in plans for s in plan.spec.steps.values()]
    assert any(s.map for s in steps)
    assert any(s.route for s in steps)
    assert any(s.fallback for s in steps)
    assert any(sum(s.tool is not None for s in plan.spec.steps.values()) >= 3 for plan in plans)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_name_matches_its_file(path: Path, tools: ToolRegistry) -> None:
    assert compile_file(path, tools).spec.name == path.stem


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_explains_in_every_format(path: Path, tools: ToolRegistry) -> None:
    plan = compile_file(path, tools)
    text = explain(plan, "text")
    assert text.startswith(f"Plan {path.stem}:") and "critical path" in text
    document = json.loads(explain(plan, "json"))
    assert isinstance(document, dict) and document
    assert explain(plan, "mermaid").startswith("flowchart")


def test_compound_validate_accepts_every_shipped_spec(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--config", str(config_file), *map(str, SPECS)]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "path", [p for p in SPECS if p.stem not in ZOO_SPECS], ids=lambda p: p.stem
)
async def test_spec_runs_on_the_tiny_demo_model(
    path: Path, demo_engine: Engine, tools: ToolRegistry
) -> None:
    plan = compile_file(path, tools)
    found: Events = []
    result = await execute(
        plan,
        INPUTS.get(path.stem, {}),
        backends=Backends([EngineBackend(demo_engine)]),
        tools=tools,
        emit=found.append,
    )
    status, check = EXPECTATIONS[path.stem]
    assert result.status == status, result.error
    assert isinstance(found[0], events.RunStarted)
    assert isinstance(found[-1], events.RunFinished if status == "succeeded" else events.RunFailed)
    check(result, found)
