"""Operators: generate (outputs, chat, deltas), map fan-out, filter, batch, pipeline, cache."""

from __future__ import annotations

from typing import Any

import pytest

from executor import events
from executor.backends import ModelCall
from executor.cache import MISSING, ResultCache
from executor.errors import OutputError
from executor.operators import check_output, parse_json
from executor.run import RunLimits, execute
from planner.spec import Step
from tests.executor.conftest import (
    Events,
    Recorder,
    ScriptedModel,
    backends_of,
    compile_dict,
    echo_prompt,
)
from tools.registry import ToolRegistry

FAST_RETRIES = RunLimits(retry_base_s=0.001, retry_max_s=0.002)
MODELS = {"small": "m-small", "big": "m-big"}


def pipeline(steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A spec over the test tools and models whose outputs read every step."""
    return {
        "name": "test",
        "tools": ["sleep", "flaky", "echo"],
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


def model_of(recorder: Recorder, answer=echo_prompt, delay_s: float = 0.0) -> ScriptedModel:
    return ScriptedModel(set(MODELS.values()), answer, recorder=recorder, delay_s=delay_s)


LIST_INPUT = {"xs": {"type": "array"}}


async def test_generate_streams_deltas_and_counts_tokens(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    step = {"generate": {"model": "small", "prompt": "say {{ inputs.word }} twice", "stop": ["."]}}
    sink = Events()
    result = await run(
        pipeline({"g": step}, inputs={"word": {"type": "string"}}),
        tools,
        model_of(recorder),
        inputs={"word": "hi"},
        emit=sink.append,
    )
    assert result.outputs == {"g": "say hi twice"}
    assert [e.text for e in sink if isinstance(e, events.TokenDelta)] == ["say", "hi", "twice"]
    finished = next(e for e in sink if isinstance(e, events.StepFinished))
    assert (finished.tokens, finished.model, finished.cached) == (6, "m-small", False)
    assert result.tokens == 6


async def test_generate_renders_chat_messages(tools: ToolRegistry, recorder: Recorder) -> None:
    model = model_of(recorder, answer=lambda c: c.messages[-1]["content"].upper())
    step = {
        "generate": {
            "model": "big",
            "messages": [
                {"role": "system", "content": "be loud"},
                {"role": "user", "content": "hello {{ inputs.who }}"},
            ],
            "temperature": 0.5,
            "seed": 3,
        }
    }
    spec = pipeline({"g": step}, inputs={"who": {"type": "string"}})
    result = await run(spec, tools, model, inputs={"who": "you"})
    assert result.outputs == {"g": "HELLO YOU"}
    (call,) = model.calls
    assert call.messages[0] == {"role": "system", "content": "be loud"}
    assert (call.target, call.prompt, call.temperature, call.seed) == ("m-big", None, 0.5, 3)


async def test_output_enum(tools: ToolRegistry, recorder: Recorder) -> None:
    answers = iter([" maybe\n", " billing\n"])
    model = model_of(recorder, answer=lambda c: next(answers))
    step = {
        "generate": {"model": "small", "prompt": "intent?"},
        "output": {"enum": ["billing", "outage"]},
        "retries": 1,
    }
    sink = Events()
    result = await run(pipeline({"intent": step}), tools, model, emit=sink.append)
    assert result.outputs == {"intent": "billing"}
    retried = next(e for e in sink if isinstance(e, events.StepRetried))
    assert retried.error == "output 'maybe' is not one of ['billing', 'outage']"
    step["retries"] = 0
    result = await run(pipeline({"intent": step}), tools, model_of(recorder, lambda c: "no"))
    assert result.failed_step == "intent"
    assert result.error == "step 'intent' failed: output 'no' is not one of ['billing', 'outage']"


async def test_output_schema(tools: ToolRegistry, recorder: Recorder) -> None:
    schema = {
        "type": "object",
        "properties": {"ids": {"type": "array", "items": {"type": "string"}}},
        "required": ["ids"],
    }
    step = {"generate": {"model": "small", "prompt": "x"}, "output_schema": schema}
    good = model_of(recorder, lambda c: '```json\n{"ids": ["a", "b"]}\n```')
    result = await run(pipeline({"s": step}), tools, good)
    assert result.outputs == {"s": {"ids": ["a", "b"]}}
    bad = model_of(recorder, lambda c: '{"ids": ["a", 2]}')
    result = await run(pipeline({"s": step}), tools, bad)
    assert result.error == "step 's' failed: /ids/1: 2 is not of type 'string'"
    assert isinstance(result.exception.__cause__, OutputError)
    assert result.exception.__cause__.path == "/ids/1"
    broken = model_of(recorder, lambda c: "not json")
    result = await run(pipeline({"s": step}), tools, broken)
    assert "output is not valid JSON" in result.error


def test_check_output_without_constraints_keeps_the_text() -> None:
    assert check_output(Step(tool="x"), "  text \n") == "  text \n"
    assert check_output(Step(tool="x", output={"type": "json"}), " [1, 2] ") == [1, 2]
    assert check_output(Step(tool="x", output={"enum": [1, 2]}), " 2") == 2
    assert parse_json("```\n{}\n```") == {}


async def test_map_fans_out_with_a_concurrency_cap(tools: ToolRegistry, recorder: Recorder) -> None:
    model = model_of(recorder, delay_s=0.02)
    step = {
        "map": "inputs.xs",
        "concurrency": 3,
        "generate": {"model": "small", "prompt": "item {{ index }}: {{ item }}"},
    }
    xs = [f"x{i}" for i in range(10)]
    result = await run(pipeline({"each": step}, inputs=LIST_INPUT), tools, model, inputs={"xs": xs})
    assert result.outputs == {"each": [f"item {i}: x{i}" for i in range(10)]}
    assert recorder.peak["model:m-small"] == 3
    assert result.steps["each"].tokens == 60  # 3 prompt + 3 completion words per item


async def test_map_limit_and_tools(tools: ToolRegistry, recorder: Recorder) -> None:
    step = {
        "map": "inputs.xs",
        "map_limit": 2,
        "tool": "echo",
        "args": {"value": "{{ item * 10 }}"},
    }
    result = await run(pipeline({"m": step}, inputs=LIST_INPUT), tools, inputs={"xs": [1, 2, 3]})
    assert result.outputs == {"m": [10, 20]}


async def test_map_over_too_many_items_fails(tools: ToolRegistry) -> None:
    step = {"map": "inputs.xs", "tool": "echo", "args": {"value": "{{ item }}"}, "retries": 2}
    spec = pipeline({"m": step}, inputs=LIST_INPUT, limits={"max_fan_out": 3})
    result = await run(spec, tools, inputs={"xs": [1, 2, 3]})
    assert result.outputs == {"m": [1, 2, 3]}
    result = await run(spec, tools, inputs={"xs": [1, 2, 3, 4]})
    assert result.error == "step 'm' failed: map of step 'm' has 4 items, over max_fan_out 3"
    result = await run(spec, tools, inputs={"xs": [1, 2]}, limits=RunLimits(max_fan_out=1))
    assert "over max_fan_out 1" in result.error


async def test_map_over_a_skipped_step_is_empty_and_over_a_scalar_fails(
    tools: ToolRegistry,
) -> None:
    steps = {
        "src": {"tool": "echo", "args": {"value": [1]}, "when": "inputs.go"},
        "m": {"map": "steps.src.output", "tool": "echo", "args": {"value": "{{ item }}"}},
    }
    spec = pipeline(steps, inputs={"go": {"type": "boolean"}})
    result = await run(spec, tools, inputs={"go": False})
    assert result.outputs == {"src": None, "m": []}
    steps["src"]["args"]["value"] = "text"
    result = await run(spec, tools, inputs={"go": True})
    assert result.error == "step 'm' failed: map of step 'm' must be a list, got str"


async def test_a_failing_map_item_is_retried_alone(tools: ToolRegistry, recorder: Recorder) -> None:
    step = {
        "map": "inputs.xs",
        "tool": "flaky",
        "args": {
            "key": "{{ item }}",
            "failures": "{{ 1 if item == 'b' else 0 }}",
            "value": "{{ item }}",
        },
        "retries": 1,
    }
    result = await run(pipeline({"m": step}, inputs=LIST_INPUT), tools, inputs={"xs": ["a", "b"]})
    assert result.outputs == {"m": ["a", "b"]}
    assert (recorder.calls["a"], recorder.calls["b"]) == (1, 2)
    assert result.steps["m"].attempts == 2


async def test_filter(tools: ToolRegistry) -> None:
    steps = {
        "f": {"filter": {"items": "inputs.xs", "where": "item % 2 == 0 and index > 0", "limit": 2}}
    }
    spec = pipeline(steps, inputs={"xs": {}})
    result = await run(spec, tools, inputs={"xs": [0, 1, 2, 3, 4, 6, 8]})
    assert result.outputs == {"f": [2, 4]}
    result = await run(spec, tools, inputs={"xs": {"a": 1}})
    assert result.error == "step 'f' failed: filter items of step 'f' must be a list, got dict"


async def test_batch_submits_members_together(tools: ToolRegistry, recorder: Recorder) -> None:
    steps = {
        "pros": {"generate": {"model": "small", "prompt": "pros of {{ inputs.t }}"}},
        "cons": {"generate": {"model": "small", "prompt": "cons of {{ inputs.t }}"}},
    }
    spec = pipeline(steps, inputs={"t": {"type": "string"}})
    plan = compile_dict(spec, tools=tools, models=set(MODELS.values()))
    assert [t.op for t in plan.topological()] == ["batch"]
    model = model_of(recorder, delay_s=0.05)
    sink = Events()
    result = await execute(
        plan,
        {"t": "tea"},
        backends=backends_of(model),
        tools=tools,
        limits=RunLimits(max_concurrency=1),
        emit=sink.append,
    )
    assert result.outputs == {"pros": "pros of tea", "cons": "cons of tea"}
    assert recorder.peak["model:m-small"] == 2  # one task slot, both calls in flight
    assert {e.step for e in sink if isinstance(e, events.StepFinished)} == {"pros", "cons"}


class Children:
    """A pipeline resolver that answers from the inputs."""

    def __init__(self, scope: str | None = None) -> None:
        self.scope = scope
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def run(self, name_ref: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Echo the inputs back as outputs."""
        self.calls.append((name_ref, inputs))
        return {"echo": inputs}


async def test_pipeline_step_calls_the_resolver(tools: ToolRegistry) -> None:
    step = {"pipeline": {"name": "child@v1", "inputs": {"q": "{{ inputs.n + 1 }}"}}}
    spec = pipeline({"sub": step}, inputs={"n": {"type": "integer"}})
    children = Children()
    result = await run(spec, tools, inputs={"n": 1}, pipelines=children)
    assert result.outputs == {"sub": {"echo": {"q": 2}}}
    assert children.calls == [("child@v1", {"q": 2})]
    result = await run(spec, tools, inputs={"n": 1})
    assert "no pipeline resolver" in result.error


async def test_cached_pipeline_calls_are_kept_apart_by_the_resolver_scope(
    tools: ToolRegistry,
) -> None:
    # The same plain name resolves inside the caller's commit: one commit's result must not
    # answer a run whose caller came from another.
    step = {"pipeline": {"name": "child", "inputs": {"q": "{{ inputs.n }}"}}, "cache": True}
    spec = pipeline({"sub": step}, inputs={"n": {"type": "integer"}})
    cache = ResultCache(max_entries=8)
    old, new, again = Children("c1"), Children("c2"), Children("c2")
    for children in (old, new, again):
        await run(spec, tools, inputs={"n": 1}, pipelines=children, cache=cache)
    assert (len(old.calls), len(new.calls), len(again.calls)) == (1, 1, 0)


async def test_cache_is_shared_across_runs(tools: ToolRegistry, recorder: Recorder) -> None:
    model = model_of(recorder)
    steps = {
        "g": {"generate": {"model": "small", "prompt": "hi {{ inputs.n }}"}, "cache": True},
        "t": {"tool": "echo", "args": {"value": "{{ inputs.n }}"}, "cache": True},
        "u": {"tool": "echo", "args": {"value": "{{ inputs.n }}!"}},
    }
    spec = pipeline(steps, inputs={"n": {"type": "integer"}})
    cache = ResultCache(max_entries=8)
    first = Events()
    await run(spec, tools, model, inputs={"n": 1}, cache=cache, emit=first.append)
    second = Events()
    result = await run(spec, tools, model, inputs={"n": 1}, cache=cache, emit=second.append)
    assert result.outputs == {"g": "hi 1", "t": 1, "u": "1!"}
    assert len(model.calls) == 1 and recorder.calls["echo"] == 3
    cached = {e.step: e.cached for e in second if isinstance(e, events.StepFinished)}
    assert cached == {"g": True, "t": True, "u": False}
    assert not any(e.cached for e in first if isinstance(e, events.StepFinished))
    assert result.steps["g"].tokens == 0
    await run(spec, tools, model, inputs={"n": 2}, cache=cache)
    assert len(model.calls) == 2  # another rendered call, another key


def test_result_cache_evicts_the_least_recently_used() -> None:
    cache = ResultCache(max_entries=2)
    a, b, c = (ResultCache.key("tool", n, {"x": 1}) for n in "abc")
    cache.put(a, None)
    cache.put(b, 2)
    assert cache.get(a) is None  # a cached None is a hit, and now the most recent
    cache.put(c, 3)
    assert cache.get(b) is MISSING and len(cache) == 2
    assert ResultCache.key("tool", "a", {"y": 1, "x": 2}) == ResultCache.key(
        "tool", "a", {"x": 2, "y": 1}
    )
    assert ResultCache.key("tool", object()) is None
    with pytest.raises(ValueError, match="at least 1"):
        ResultCache(0)


def test_model_call_defaults() -> None:
    call = ModelCall(target="m", prompt="p")
    assert (call.max_tokens, call.temperature, call.stop, call.seed) == (256, 0.0, [], None)
