"""The `plan` operator: tasks start while the plan streams, run in parallel, feed the joiner;
bad plans, undeclared tools and failed tasks are recorded and replanned, never run blindly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from executor import events
from executor.backends import ModelCall, ModelResult
from executor.run import execute
from planner import plan_format
from tests.executor.conftest import Events, Recorder, backends_of, compile_dict
from tools.registry import ToolRegistry

PLANNER, JOINER, BACKUP = "planner-model", "joiner-model", "backup-planner"


class StreamingModel:
    """Planner and joiner in one backend: answers are streamed in small pieces over time.

    `plans` are the planner's answers, one per planner call (the last one repeats);
    `join` makes the joiner's answer from its prompt.
    """

    def __init__(
        self, plans: list[str], join: Callable[[str], str], *, piece_s: float = 0.01
    ) -> None:
        self.plans, self.join, self.piece_s = plans, join, piece_s
        self.calls: list[ModelCall] = []
        self.stream_ended: list[float] = []

    def serves(self, target: str) -> bool:
        """The test models."""
        return target in (PLANNER, JOINER, BACKUP)

    async def generate(self, call: ModelCall, on_delta: Any = None) -> ModelResult:
        """Stream the scripted answer four characters at a time."""
        self.calls.append(call)
        prompt = call.prompt or " ".join(m["content"] for m in call.messages or [])
        if call.target == PLANNER:
            planner_calls = sum(c.target == PLANNER for c in self.calls)
            text = self.plans[min(planner_calls, len(self.plans)) - 1]
            if "\n" in call.stop:  # sequential mode: the next line only
                done = prompt.count("\n", prompt.index("PLAN:")) - 1
                text = text.split("\n")[done]
        elif call.target == BACKUP:
            text = '1. echo(value="from the backup")\n2. join()'
        else:
            text = self.join(prompt)
        for i in range(0, len(text), 4):
            await asyncio.sleep(self.piece_s)
            if on_delta is not None:
                on_delta(text[i : i + 4])
        if call.target == PLANNER:
            self.stream_ended.append(time.perf_counter())
        return ModelResult(
            text=text, prompt_tokens=len(prompt.split()), completion_tokens=len(text.split()),
            finish_reason="stop",
        )  # fmt: skip


def spec(mode: str = "parallel", **plan: Any) -> dict[str, Any]:
    """A pipeline with one plan step over the test tools `sleep` and `echo`."""
    planner = (
        {"prompt": "Q: {{ inputs.q }} round {{ plan.round }} seen {{ plan.rounds | length }}"
         " PLAN:\n{{ plan.text }}"}
    )  # fmt: skip
    joiner = (
        "{% for t in plan.tasks %}{{ t.index }}={{ t.output_text }};{% endfor %}"
        "{% for r in plan.rounds %}[{{ r.error }}]{% endfor %}"
    )
    return {
        "name": "planned",
        "inputs": {"q": {"type": "string"}},
        "models": {"p": PLANNER, "j": JOINER},
        "tools": ["sleep", "echo"],
        "steps": {
            "answer": {
                "plan": {
                    "planner": {"model": "p", **planner},
                    "joiner": {"model": "j", "prompt": joiner},
                    "mode": mode,
                    **plan,
                }
            }
        },
        "outputs": {"answer": "{{ steps.answer.output }}"},
    }


async def run(
    model: StreamingModel,
    tools: ToolRegistry,
    mode: str = "parallel",
    fallback: list[dict[str, Any]] = (),
    **plan: Any,
) -> tuple[Any, Events]:
    body = spec(mode, **plan)
    if fallback:
        body["models"]["b"] = BACKUP
        body["steps"]["answer"]["fallback"] = list(fallback)
    compiled = compile_dict(body, tools=tools, models={PLANNER, JOINER, BACKUP})
    found = Events()
    result = await execute(
        compiled, {"q": "x"}, backends=backends_of(model), tools=tools, emit=found.append
    )
    return result, found


WIDE = (
    '1. sleep(ms=400, label="a", value=2)\n'
    '2. sleep(ms=400, label="b", value=3)\n'
    '3. sleep(ms=400, label="c", value=4)\n'
    '4. echo(value="$1+$2+$3")\n'
    "5. join()"
)


def finished(found: Events) -> list[str]:
    return [e.step for e in found if isinstance(e, events.StepFinished)]


async def test_tasks_start_while_the_plan_streams_and_run_in_parallel(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    model = StreamingModel([WIDE], join=lambda prompt: "answer " + prompt)
    result, found = await run(model, tools)
    assert result.status == "succeeded", result.error
    # the three independent lookups overlapped, and the first began before the plan ended
    assert recorder.peak["tool:sleep"] == 3
    first_tool = next(
        e for e in found if isinstance(e, events.StepStarted) and e.step == "answer.1.1"
    )
    assert found.index(first_tool) < found.index(
        next(e for e in found if getattr(e, "step", "") == "answer.1.planner" and isinstance(e, events.StepFinished))
    )  # fmt: skip
    # $K references substituted; the joiner saw every output
    assert result.outputs["answer"] == "answer 1=2;2=3;3=4;4=2+3+4;"
    assert {"answer.1.1", "answer.1.4", "answer.1.planner", "answer.1.joiner"} <= set(
        finished(found)
    )


async def test_sequential_mode_asks_one_line_per_planner_call(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    model = StreamingModel([WIDE], join=lambda prompt: prompt)
    result, _ = await run(model, tools, mode="sequential")
    assert result.status == "succeeded", result.error
    assert recorder.peak["tool:sleep"] == 1
    planner_calls = [c for c in model.calls if c.target == PLANNER]
    assert len(planner_calls) == 5  # four tasks and join()
    assert planner_calls[-1].prompt.endswith('4. echo(value="$1+$2+$3")\n')
    assert result.outputs["answer"] == "1=2;2=3;3=4;4=2+3+4;"


async def test_an_undeclared_tool_is_never_called_and_the_planner_tries_again(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    bad = '1. flaky(key="k", failures=0)\n2. join()'
    good = '1. echo(value="ok")\n2. join()'
    model = StreamingModel([bad, good], join=lambda prompt: prompt)
    result, found = await run(model, tools)
    assert result.status == "succeeded", result.error
    assert recorder.calls["k"] == 0
    assert "tool 'flaky' is not declared" in result.outputs["answer"]
    second = [c for c in model.calls if c.target == PLANNER][1]
    assert "round 2 seen 1" in second.prompt
    # the rejected plan is recorded, and the planner is stopped rather than left writing
    failed = [e for e in found if isinstance(e, events.StepFailed)]
    assert [e.step for e in failed] == ["answer.1.plan", "answer.1.planner"]
    assert "stopped" in failed[1].error


async def test_bad_plans_fail_the_step_after_max_rounds(tools: ToolRegistry) -> None:
    cases = {
        "not a plan": "plan line 1",
        '1. echo(value="a")\n2. echo(value=$3)\n3. join()': "does not refer to an earlier line",
        '1. echo(value="a")': "does not end with join()",
        '1. echo(value="a")\n2. echo(value="b")\n3. join()': "more than 1 tasks",
    }
    for plan, message in cases.items():
        model = StreamingModel([plan], join=lambda prompt: "never", piece_s=0)
        result, _ = await run(model, tools, max_rounds=2, max_tasks=1)
        assert result.status == "failed"
        assert "no answer in 2 round(s)" in result.error and message in result.error, result.error
        assert sum(c.target == PLANNER for c in model.calls) == 2
        assert not any(c.target == JOINER for c in model.calls)


async def test_a_failed_task_and_a_replan_answer_start_another_round(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    failing = '1. sleep(ms="slow")\n2. echo(value=$1)\n3. join()'
    good = '1. echo(value="fine")\n2. join()'
    answers = iter(["Replan: not enough", "fine"])
    model = StreamingModel([failing, good, good], join=lambda prompt: next(answers))
    result, found = await run(model, tools, max_rounds=3)
    assert result.status == "succeeded", result.error
    assert result.outputs["answer"] == "fine"
    # round 1: the registry refused the argument, line 2 never ran; round 2: the joiner
    # asked to replan; round 3 answered
    failed = {e.step: e.error for e in found if isinstance(e, events.StepFailed)}
    assert "answer.1.1" in failed and "answer.1.2" in failed
    assert "line 1 it references failed" in failed["answer.1.2"]
    assert sum(c.target == PLANNER for c in model.calls) == 3


async def test_the_step_streams_only_the_joiner_text_that_becomes_its_answer(
    tools: ToolRegistry,
) -> None:
    good = '1. echo(value="fine")\n2. join()'
    # round 1 asks to replan (its text must not stream as the answer); round 2's answer is
    # stripped, so its blanks must not stream either; "Rep" could have been a replan
    answers = iter(["  Replan: not enough", "\n Reply: fine and dandy  \n"])
    model = StreamingModel([good, good], join=lambda prompt: next(answers))
    result, found = await run(model, tools, max_rounds=2)
    assert result.status == "succeeded", result.error
    deltas = [e.text for e in found if isinstance(e, events.TokenDelta) and e.step == "answer"]
    assert len(deltas) > 1 and "".join(deltas) == result.outputs["answer"]
    assert result.outputs["answer"] == "Reply: fine and dandy"
    # the joiner's own sub-step still streams everything it wrote
    replan = [
        e.text for e in found if isinstance(e, events.TokenDelta) and e.step == "answer.1.joiner"
    ]
    assert "".join(replan) == "  Replan: not enough"


async def test_replans_sample_at_the_replan_temperature(tools: ToolRegistry) -> None:
    model = StreamingModel(["nonsense", "1. echo(value=1)\n2. join()"], join=lambda p: "ok")
    result, _ = await run(model, tools, replan_temperature=0.7)
    assert result.status == "succeeded", result.error
    temperatures = [c.temperature for c in model.calls if c.target == PLANNER]
    assert temperatures == [0.0, 0.7]


async def test_ungrounded_arguments_are_rejected_before_they_run(
    tools: ToolRegistry, recorder: Recorder
) -> None:
    invented = '1. echo(value="ok")\n2. sleep(ms=1, label="Zar")\n3. join()'
    grounded = '1. sleep(ms=1, label="Zarnoth")\n2. join()'
    model = StreamingModel([invented, grounded], join=lambda prompt: prompt)
    result, found = await run(
        model, tools, grounding="is Zarnoth big? {{ inputs.q }}", grounded_args=["label"]
    )
    assert result.status == "succeeded", result.error
    assert recorder.started == ["Zarnoth"]  # "Zar" is only part of a word of the question
    (rejected,) = [
        e for e in found if isinstance(e, events.StepFailed) and e.step == "answer.1.plan"
    ]
    assert rejected.error == "plan line 2: label 'Zar' is not in the question"


async def test_constrained_plans_carry_the_plan_grammar_to_the_backend(
    tools: ToolRegistry,
) -> None:
    # The grammar itself belongs to planner.plan_format (tests/planner/test_plan_grammar.py);
    # here: the plan step asks for it with the declared tools, the grounding's candidate
    # names and the task limit.
    model = StreamingModel(['1. echo(value="a")\n2. join()'], join=lambda p: "ok")
    grounding = "Is Zarnoth taller than Velmora?"
    result, _ = await run(
        model, tools, constrain=True, grounding=grounding, grounded_args=["value"], max_tasks=3
    )
    assert result.status == "failed"  # "a" is not in the grounding, and the model ignores it
    expected = plan_format.plan_grammar(
        ["echo", "sleep"], names=["Zarnoth", "Velmora"], max_steps=3
    )
    assert [c.grammar for c in model.calls] == [expected, expected]


@pytest.mark.parametrize(
    ("plan", "grounding", "answer", "choice"),
    [
        (  # names, then results without repeats, in order, then the replan marker
            '1. echo(value="Velmora")\n2. sleep(ms=1, value=42)\n3. echo(value=$2)\n4. join()',
            "Is Zarnoth taller than Velmora?",
            "42",
            ["Zarnoth", "Velmora", "42", "Replan"],
        ),
        (  # "which" among names, ending in true/false: only a name can answer
            "1. sleep(ms=1, value=180)\n2. sleep(ms=1, value=172)\n3. echo(value=true)\n4. join()",
            "Which is taller: Zarnoth or Velmora?",
            "Velmora",
            ["Zarnoth", "Velmora", "Replan"],
        ),
    ],
)
async def test_a_constrained_answer_is_a_choice_of_names_results_and_the_replan_marker(
    tools: ToolRegistry, plan: str, grounding: str, answer: str, choice: list[str]
) -> None:
    model = StreamingModel([plan], join=lambda p: answer)
    result, _ = await run(model, tools, constrain_answer=True, grounding=grounding)
    assert result.status == "succeeded", result.error
    (joiner,) = [c for c in model.calls if c.target == JOINER]
    assert joiner.choice == choice


async def test_a_sequential_turn_is_constrained_from_the_line_it_writes(
    tools: ToolRegistry,
) -> None:
    model = StreamingModel(['1. echo(value="a")\n2. echo(value=$1)\n3. join()'], join=str)
    result, _ = await run(model, tools, "sequential", constrain=True)
    assert result.status == "succeeded", result.error
    grammars = [c.grammar for c in model.calls if c.target == PLANNER]
    assert grammars == [
        plan_format.plan_grammar(["echo", "sleep"], first=n, max_steps=16) for n in (1, 2, 3)
    ]


async def test_a_fallback_planner_gets_fresh_rounds(tools: ToolRegistry) -> None:
    model = StreamingModel(["nonsense"], join=lambda prompt: prompt)
    result, found = await run(model, tools, fallback=[{"model": "b"}], max_rounds=2)
    assert result.status == "succeeded", result.error
    assert result.outputs["answer"] == "1=from the backup;"
    assert [c.target for c in model.calls] == [PLANNER, PLANNER, BACKUP, JOINER]
    retried = [e for e in found if isinstance(e, events.StepRetried)]
    assert [(e.step, e.attempt) for e in retried] == [("answer", 2)]
    # the fallback's sub-steps are its own rows of the trace, not the first attempt's again
    finished = [e.step for e in found if isinstance(e, events.StepFinished)]
    assert {"answer.a2.1.planner", "answer.a2.1.1", "answer.a2.1.joiner"} <= set(finished)
    failed = {e.step for e in found if isinstance(e, events.StepFailed)}
    assert failed == {"answer.1.plan", "answer.2.plan"}  # the first attempt's rejected plans
    assert not failed & set(finished), failed
