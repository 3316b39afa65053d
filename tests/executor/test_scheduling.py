"""The ready-queue: concurrency, limits, critical-path-first order, cancellation, events."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from executor import events
from executor.backends import Backends
from executor.run import RunLimits, execute
from executor.slots import PrioritySlots, Slots
from tests.executor.conftest import Events, Recorder, compile_dict, elapsed
from tools.registry import ToolRegistry

NO_MODELS = Backends()


def sleeper(ms: float, label: str, value: Any = None, *, after: list[str] = ()) -> dict[str, Any]:
    """A `sleep` tool step, reading the outputs of `after` so that it depends on them."""
    reads = "".join(f"{{{{ steps.{a}.output }}}}" for a in after)
    return {
        "tool": "sleep",
        "args": {"ms": ms, "label": label + reads if after else label, "value": value},
    }


def pipeline(steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A spec over the test tools whose outputs read every step (so none is pruned)."""
    return {
        "name": "test",
        "tools": ["sleep", "other_sleep", "flaky", "echo"],
        "steps": steps,
        "outputs": {sid: f"{{{{ steps.{sid}.output }}}}" for sid in steps},
        **extra,
    }


async def run(
    spec: dict[str, Any], tools: ToolRegistry, inputs: dict[str, Any] | None = None, **kwargs: Any
):
    plan = compile_dict(spec, tools=tools, models=set())
    return await execute(
        plan, inputs or {}, backends=kwargs.pop("backends", NO_MODELS), tools=tools, **kwargs
    )


async def test_independent_steps_run_concurrently(tools: ToolRegistry, recorder: Recorder) -> None:
    steps = {f"s{i}": sleeper(200, f"s{i}", i) for i in range(5)}
    start = time.perf_counter()
    result = await run(pipeline(steps), tools)
    took = elapsed(start)
    assert result.status == "succeeded", result.error
    assert result.outputs == {f"s{i}": i for i in range(5)}
    assert recorder.peak["*"] == 5
    assert took < 0.5  # about the longest step (0.2 s), far from the 1 s sum


async def test_chain_waits_for_its_inputs(tools: ToolRegistry, recorder: Recorder) -> None:
    steps = {
        "a": sleeper(30, "a", 1),
        "b": {"tool": "echo", "args": {"value": "{{ steps.a.output + 1 }}"}},
        "c": {"tool": "echo", "args": {"value": "{{ [steps.a.output, steps.b.output] }}"}},
    }
    result = await run(pipeline(steps), tools)
    assert result.outputs == {"a": 1, "b": 2, "c": [1, 2]}
    assert [result.steps[s].status for s in "abc"] == ["succeeded"] * 3


async def test_per_resource_limits_cap_calls_in_flight(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    steps = {f"s{i}": sleeper(40, f"s{i}") for i in range(6)}
    steps |= {
        f"o{i}": {"tool": "other_sleep", "args": {"ms": 40, "label": f"o{i}"}} for i in range(6)
    }
    limits = RunLimits(per_resource={"tool:sleep": 2, "tool:*": 3})
    result = await run(pipeline(steps), tools, limits=limits)
    assert result.status == "succeeded"
    assert recorder.peak["tool:sleep"] == 2
    assert recorder.peak["tool:other_sleep"] == 3


async def test_max_concurrency_caps_running_steps(tools: ToolRegistry, recorder: Recorder) -> None:
    steps = {f"s{i}": sleeper(30, f"s{i}") for i in range(8)}
    spec = pipeline(steps, limits={"max_concurrency": 3})
    result = await run(spec, tools)
    assert result.status == "succeeded"
    assert recorder.peak["*"] == 3
    # the server's limit caps the spec's
    recorder.peak.clear()
    await run(spec, tools, limits=RunLimits(max_concurrency=2))
    assert recorder.peak["*"] == 2


async def test_critical_path_first_when_slots_are_scarce(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    # `short` comes first in the spec, but the chain a1 -> a2 -> a3 is the critical path: with one
    # slot, a1 runs first, and a2 (0.10 s left) wins over the longer-waiting `short` (0.05 s)
    # when a1 ends; a3 and `short` then tie and the one that waited longer goes first.
    steps = {
        "short": sleeper(10, "short"),
        "a1": sleeper(10, "a1"),
        "a2": sleeper(10, "a2", after=["a1"]),
        "a3": sleeper(10, "a3", after=["a2"]),
    }
    result = await run(pipeline(steps, limits={"max_concurrency": 1}), tools)
    assert result.status == "succeeded"
    assert [label[:2] for label in recorder.started] == ["a1", "a2", "sh", "a3"]


async def test_priority_slots_serve_the_most_urgent_waiter() -> None:
    slots = PrioritySlots(1)
    order: list[str] = []

    async def call(name: str, priority: float) -> None:
        await slots.acquire(priority)
        order.append(name)
        await asyncio.sleep(0.001)
        slots.release()

    await slots.acquire()
    waiters = [asyncio.create_task(call(n, p)) for n, p in [("low", 1), ("high", 3), ("mid", 2)]]
    await asyncio.sleep(0.001)
    slots.release()
    await asyncio.gather(*waiters)
    assert order == ["high", "mid", "low"]
    assert slots.peak == 1 and slots.in_use == 0


async def test_a_cancelled_waiter_does_not_leak_its_slot() -> None:
    slots = PrioritySlots(1)
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire(5))
    await asyncio.sleep(0)
    slots.release()  # handed to the waiter ...
    waiter.cancel()  # ... which is cancelled before it runs: the slot must go back
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.wait_for(slots.acquire(), 1)
    assert slots.in_use == 1


def test_resource_defaults_apply_by_kind() -> None:
    slots = Slots({"model:big": 1, "model:*": 4})
    assert slots.pool("model:big").size == 1
    assert slots.pool("model:small").size == 4
    assert slots.pool("tool:calc") is None


async def test_fatal_failure_cancels_the_rest(tools: ToolRegistry, recorder: Recorder) -> None:
    steps = {
        "slow": sleeper(2000, "slow"),
        "bad": {"tool": "flaky", "args": {"key": "bad", "failures": 9, "ms": 20}},
        "after": sleeper(10, "after", after=["bad"]),
    }
    sink = Events()
    start = time.perf_counter()
    result = await run(pipeline(steps), tools, emit=sink.append)
    assert elapsed(start) < 1.0
    assert result.status == "failed"
    assert result.failed_step == "bad"
    assert result.error.startswith("step 'bad' failed: ") and "bad failure 1" in result.error
    assert "slow" in recorder.cancelled
    assert result.steps["slow"].status == "cancelled"
    assert result.steps["after"].status == "cancelled"
    assert result.steps["bad"].status == "failed"
    cause = result.exception.__cause__
    assert type(result.exception).__name__ == "StepFailed" and cause is not None
    assert isinstance(sink[-1], events.RunFailed) and sink[-1].failed_step == "bad"
    assert not any(isinstance(e, events.StepFinished) and e.step == "slow" for e in sink)


async def test_run_timeout_cancels_running_tasks(tools: ToolRegistry, recorder: Recorder) -> None:
    steps = {"a": sleeper(5000, "a"), "b": sleeper(5000, "b")}
    sink = Events()
    start = time.perf_counter()
    result = await run(pipeline(steps, limits={"run_timeout": "150ms"}), tools, emit=sink.append)
    assert elapsed(start) < 1.0
    assert result.status == "failed"
    assert result.error == "run timed out after 0.15s"
    assert result.failed_step is None
    assert sorted(recorder.cancelled) == ["a", "b"]
    assert isinstance(sink[-1], events.RunFailed)


async def test_caller_cancellation_stops_the_run(tools: ToolRegistry, recorder: Recorder) -> None:
    sink = Events()
    job = asyncio.create_task(run(pipeline({"a": sleeper(5000, "a")}), tools, emit=sink.append))
    await asyncio.sleep(0.1)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert recorder.cancelled == ["a"]
    assert isinstance(sink[-1], events.RunCancelled)


async def test_events_come_in_order_and_round_trip(tools: ToolRegistry) -> None:
    steps = {
        "a": sleeper(10, "a", 1),
        "b": {"tool": "echo", "args": {"value": "{{ steps.a.output }}"}},
    }
    sink = Events()
    result = await run(pipeline(steps), tools, emit=sink.append, run_id="r1")
    assert sink.types() == [
        "RunStarted",
        "StepStarted",
        "StepFinished",
        "StepStarted",
        "StepFinished",
        "RunFinished",
    ]
    assert [getattr(e, "step", None) for e in sink][1:5] == ["a", "a", "b", "b"]
    assert all(e.run_id == "r1" for e in sink)
    finished = sink[2]
    assert finished.output == 1 and finished.attempts == 1 and finished.tokens == 0
    assert finished.started_at <= finished.finished_at
    assert sink[-1].outputs == result.outputs
    for event in sink:
        assert events.decode_event(events.encode_event(event)) == event
    assert b'"type":"step_finished"' in events.encode_event(finished)


async def test_a_failing_event_sink_does_not_fail_the_run(tools: ToolRegistry) -> None:
    def sink(event: events.Event) -> None:
        raise RuntimeError("sink is broken")

    result = await run(pipeline({"a": sleeper(1, "a", 1)}), tools, emit=sink)
    assert result.status == "succeeded"


async def test_outputs_nobody_reads_are_dropped(tools: ToolRegistry) -> None:
    steps = {
        "big": {"tool": "echo", "args": {"value": "{{ 'x' * 1000 }}"}},
        "size": {"tool": "echo", "args": {"value": "{{ steps.big.output | length }}"}},
    }
    spec = pipeline(steps) | {"outputs": {"size": "{{ steps.size.output }}"}}
    plan = compile_dict(spec, tools=tools, models=set())
    result = await execute(plan, {}, backends=NO_MODELS, tools=tools, keep_step_outputs=False)
    assert result.outputs == {"size": 1000}
    assert result.steps["big"].output is None and result.steps["big"].status == "succeeded"


async def test_an_output_that_cannot_render_fails_the_run(tools: ToolRegistry) -> None:
    spec = pipeline({"a": sleeper(1, "a", {"x": 1})})
    spec["outputs"] = {"y": "{{ steps.a.output.y }}"}
    sink = Events()
    result = await run(spec, tools, emit=sink.append)
    assert result.status == "failed" and result.failed_step is None
    assert result.error.startswith("output 'y': ")
    assert result.steps["a"].status == "succeeded"
    assert isinstance(sink[-1], events.RunFailed)
