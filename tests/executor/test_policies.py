"""Step policies: retries, fallbacks, timeouts, `when`, route branches, budgets, inputs."""

from __future__ import annotations

import time
from typing import Any

import pytest

from executor import events
from executor.backends import ModelCall
from executor.errors import InputError
from executor.run import RunLimits, execute
from tests.executor.conftest import (
    Events,
    Recorder,
    ScriptedModel,
    backends_of,
    compile_dict,
    elapsed,
)
from tools.registry import ToolRegistry

FAST_RETRIES = RunLimits(retry_base_s=0.001, retry_max_s=0.002)
MODELS = {"small": "m-small", "big": "m-big"}


def pipeline(steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A spec over the test tools and models whose outputs read every step."""
    return {
        "name": "test",
        "tools": ["sleep", "other_sleep", "flaky", "echo"],
        "models": MODELS,
        "steps": steps,
        "outputs": {sid: f"{{{{ steps.{sid}.output }}}}" for sid in steps},
        **extra,
    }


async def run(
    spec: dict[str, Any],
    tools: ToolRegistry,
    model: ScriptedModel | None = None,
    inputs: dict[str, Any] | None = None,
    **kwargs: Any,
):
    plan = compile_dict(spec, tools=tools, models=set(MODELS.values()))
    backends = backends_of(model) if model is not None else backends_of()
    kwargs.setdefault("limits", FAST_RETRIES)
    return await execute(plan, inputs or {}, backends=backends, tools=tools, **kwargs)


def flaky(key: str, failures: int, value: Any = "ok", ms: float = 0) -> dict[str, Any]:
    return {"tool": "flaky", "args": {"key": key, "failures": failures, "value": value, "ms": ms}}


async def test_retries_then_success(tools: ToolRegistry, recorder: Recorder) -> None:
    sink = Events()
    result = await run(pipeline({"f": flaky("f", 2) | {"retries": 3}}), tools, emit=sink.append)
    assert result.status == "succeeded"
    assert result.outputs == {"f": "ok"}
    assert result.steps["f"].attempts == 3 and recorder.calls["f"] == 3
    assert sink.types("f") == ["StepStarted", "StepRetried", "StepRetried", "StepFinished"]
    retried = [e for e in sink if isinstance(e, events.StepRetried)]
    assert [e.attempt for e in retried] == [2, 3]
    assert "f failure 1" in retried[0].error


async def test_retries_back_off_exponentially(tools: ToolRegistry) -> None:
    limits = RunLimits(retry_base_s=0.04, retry_max_s=1.0)
    start = time.perf_counter()
    result = await run(pipeline({"f": flaky("f", 2) | {"retries": 2}}), tools, limits=limits)
    assert result.status == "succeeded"
    # waits of 0.02-0.04 s then 0.04-0.08 s
    assert 0.06 <= elapsed(start) < 0.5


async def test_retries_exhausted_then_tool_fallback(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    tools.register("broken", _broken)
    step = {
        "tool": "broken",
        "args": {"value": "from echo"},
        "retries": 1,
        "fallback": [{"tool": "echo"}],
    }
    spec = pipeline({"f": step})
    spec["tools"].append("broken")
    sink = Events()
    result = await run(spec, tools, emit=sink.append)
    assert result.status == "succeeded", result.error
    assert result.outputs == {"f": "from echo"}
    assert result.steps["f"].attempts == 3
    assert [e.attempt for e in sink if isinstance(e, events.StepRetried)] == [2, 3]


def _broken(value: Any) -> Any:
    """Always fails."""
    raise RuntimeError("always")


async def test_retries_exhausted_then_model_fallback(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    def answer(call: ModelCall) -> str:
        return "!small is down" if call.target == "m-small" else f"{call.target}/{call.max_tokens}"

    model = ScriptedModel({"m-small", "m-big"}, answer, recorder=recorder)
    step = {
        "generate": {"model": "small", "prompt": "hi", "max_tokens": 5},
        "retries": 1,
        "fallback": [{"model": "big", "max_tokens": 7}],
    }
    result = await run(pipeline({"g": step}), tools, model)
    assert result.status == "succeeded", result.error
    assert result.outputs == {"g": "m-big/7"}
    assert [c.target for c in model.calls] == ["m-small", "m-small", "m-big"]
    assert result.steps["g"].model == "m-big"


async def test_everything_fails_names_the_last_error(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    model = ScriptedModel({"m-small", "m-big"}, lambda c: f"!{c.target} down", recorder=recorder)
    step = {"generate": {"model": "small", "prompt": "hi"}, "fallback": [{"model": "big"}]}
    result = await run(pipeline({"g": step}), tools, model)
    assert result.status == "failed" and result.failed_step == "g"
    assert result.error == "step 'g' failed: m-big down"
    assert result.steps["g"].attempts == 2


async def test_timeout_then_retry(tools: ToolRegistry, recorder: Recorder) -> None:
    # the first attempt sleeps past the timeout; the retry is fast
    tools.register("slow_once", _slow_once(recorder))
    spec = pipeline({"t": {"tool": "slow_once", "args": {}, "timeout": "50ms", "retries": 1}})
    spec["tools"].append("slow_once")
    sink = Events()
    result = await run(spec, tools, emit=sink.append)
    assert result.status == "succeeded", result.error
    assert result.outputs == {"t": "fast"}
    retried = next(e for e in sink if isinstance(e, events.StepRetried))
    assert retried.error == "step 't' timed out after 0.05s"


def _slow_once(recorder: Recorder):
    async def slow_once() -> str:
        """Slow on the first call, fast after."""
        recorder.calls["slow_once"] += 1
        if recorder.calls["slow_once"] == 1:
            await recorder.hold("tool:slow_once", "slow", 5)
        return "fast"

    return slow_once


async def test_timeout_fails_the_step(tools: ToolRegistry, recorder: Recorder) -> None:
    start = time.perf_counter()
    result = await run(
        pipeline({"t": {"tool": "sleep", "args": {"ms": 5000}, "timeout": 0.05}}), tools
    )
    assert elapsed(start) < 1
    assert result.status == "failed" and result.failed_step == "t"
    assert result.error == "step 't' failed: step 't' timed out after 0.05s"
    assert recorder.cancelled == [""]


async def test_when_false_skips_the_step(tools: ToolRegistry) -> None:
    steps = {
        "maybe": {"tool": "echo", "args": {"value": 1}, "when": "inputs.go"},
        "after": {"tool": "echo", "args": {"value": "{{ steps.maybe.status }}"}},
    }
    spec = pipeline(steps, inputs={"go": {"type": "boolean"}})
    sink = Events()
    result = await run(spec, tools, inputs={"go": False}, emit=sink.append)
    assert result.status == "succeeded"
    assert result.outputs == {"maybe": None, "after": "skipped"}
    assert result.steps["maybe"].status == "skipped"
    skipped = next(e for e in sink if isinstance(e, events.StepSkipped))
    assert skipped.step == "maybe" and "inputs.go" in skipped.reason
    result = await run(spec, tools, inputs={"go": True})
    assert result.outputs == {"maybe": 1, "after": "succeeded"}


async def test_route_runs_the_chosen_branch_only(tools: ToolRegistry, recorder: Recorder) -> None:
    steps = {
        "kind": {
            "route": {
                "branches": [
                    {"when": "inputs.n > 10", "steps": ["big"]},
                    {"when": "inputs.n > 0", "steps": ["small"]},
                ],
                "default": ["none"],
            }
        },
        "big": {"tool": "echo", "args": {"value": "big"}},
        "small": {"tool": "echo", "args": {"value": "small"}},
        "none": {"tool": "echo", "args": {"value": "none"}},
        "joined": {
            "tool": "echo",
            "args": {"value": "{{ [steps.big.output, steps.small.output] }}"},
        },
    }
    spec = pipeline(steps, inputs={"n": {"type": "integer"}})
    result = await run(spec, tools, inputs={"n": 5})
    assert result.status == "succeeded", result.error
    assert result.outputs["kind"] == "1"
    assert result.outputs["joined"] == [None, "small"]
    assert [result.steps[s].status for s in ("big", "small", "none")] == [
        "skipped",
        "succeeded",
        "skipped",
    ]
    assert "chose branch '1'" in result.steps["big"].skip_reason
    result = await run(spec, tools, inputs={"n": -1})
    assert result.outputs["kind"] == "default" and result.outputs["none"] == "none"


async def test_run_token_budget(tools: ToolRegistry, recorder: Recorder) -> None:
    model = ScriptedModel({"m-small"}, lambda c: "one two three four", recorder=recorder)
    steps = {
        "a": {"generate": {"model": "small", "prompt": "p q"}},
        "b": {"generate": {"model": "small", "prompt": "{{ steps.a.output }}"}},
    }
    result = await run(pipeline(steps, limits={"max_total_tokens": 8}), tools, model)
    assert result.status == "failed" and result.failed_step == "b"
    assert "over max_total_tokens 8" in result.error
    assert result.steps["a"].tokens == 6 and result.tokens == 14
    # the server's limit caps the spec's
    result = await run(pipeline(steps), tools, model, limits=RunLimits(max_total_tokens=5))
    assert result.failed_step == "a" and "the run used 6 tokens" in result.error


async def test_step_token_budget_is_final(tools: ToolRegistry, recorder: Recorder) -> None:
    model = ScriptedModel({"m-small"}, lambda c: "one two three", recorder=recorder)
    step = {
        "generate": {"model": "small", "prompt": "p"},
        "budget": {"max_tokens": 3},
        "retries": 3,
    }
    result = await run(pipeline({"a": step}), tools, model)
    assert result.status == "failed"
    assert "step 'a' used 4 tokens, over its budget of 3" in result.error
    assert len(model.calls) == 1  # a budget is not retried


async def test_step_time_budget(tools: ToolRegistry) -> None:
    step = flaky("f", 99, ms=30) | {"retries": 10, "budget": {"max_seconds": 0.1}}
    result = await run(pipeline({"f": step}), tools)
    assert result.status == "failed"
    assert "step 'f' ran longer than its budget of 0.1s" in result.error


async def test_inputs_are_validated_with_paths(tools: ToolRegistry) -> None:
    spec = pipeline(
        {"e": {"tool": "echo", "args": {"value": "{{ inputs.records }}"}}},
        inputs={
            "records": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer"}},
                    "required": ["id"],
                },
            },
            "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
        },
    )
    sink = Events()
    cases = [
        ({"records": [{"id": 1}, {"id": "x"}]}, "/records/1/id", "'x' is not of type 'integer'"),
        ({"records": [{}]}, "/records/0/id", "'id' is a required property"),
        ({}, "/records", "missing required input"),
        ({"records": [], "other": 1}, "/other", "unknown input (declared: mode, records)"),
        ({"records": [], "mode": "c"}, "/mode", "'c' is not one of ['a', 'b']"),
    ]
    for inputs, path, message in cases:
        with pytest.raises(InputError) as error:
            await run(spec, tools, inputs=inputs, emit=sink.append)
        assert (error.value.path, error.value.message) == (path, message)
    assert sink == []  # raised before RunStarted
    result = await run(spec, tools, inputs={"records": [{"id": 1}]}, emit=sink.append)
    assert result.outputs == {"e": [{"id": 1}]}
    assert sink[0].inputs == {"records": [{"id": 1}], "mode": "a"}
