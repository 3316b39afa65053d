"""The `plan` operator: a model-written plan run as a dynamic DAG of tool calls (LLMCompiler).

One round: the planner model writes a plan (`planner/plan_format.py`). In `parallel` mode its
text streams in and every line is parsed the moment its newline arrives; a valid line starts
its tool call at once, which first waits for the lines its `$K` references name. In
`sequential` mode (the ReAct-style baseline) the planner writes one line per call and each
tool call finishes before the next planner call. Then the joiner model answers from the
results. A plan that does not parse, names a tool the pipeline does not declare, or has too
many lines is an error of the round, and so is a failed tool call; such a round, or a joiner
answer that starts with the replan marker, starts the next round, whose planner sees the
earlier rounds (`plan.rounds`). Tools are called only through the registry, which validates
their arguments.

Every planner call, tool call and joiner call is reported as a step of its own,
`<step>.<round>.planner`, `<step>.<round>.<line>`, `<step>.<round>.joiner` (from the step's
second attempt `<step>.a<N>.<round>....`), so the run's trace shows the dynamic DAG.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

from msgspec.structs import replace

from executor import events
from executor.backends import ModelCall, ModelResult
from executor.context import RunContext
from executor.errors import ExecutorError, OperatorError, PlanFailed
from executor.operators import Env, StepRun, model_call
from planner.expressions import render
from planner.plan_format import (
    JOIN,
    PlanStep,
    PlanSyntaxError,
    Ref,
    answer_choices,
    parse_line,
    question_names,
    ref_notes,
    result_text,
    substitute,
)
from planner.spec import Fallback, Generate, PlanSpec


class PlanRejected(ExecutorError):
    """A plan line the executor refuses: bad syntax, an undeclared tool, too many lines."""


class TaskFailed(ExecutorError):
    """A tool call of a plan failed (or a line it references did)."""


@dataclass
class Task:
    """One plan line being run: its parsed call, and what became of it."""

    step: PlanStep
    future: asyncio.Task[Any] | None = None
    inputs: dict[str, Any] | None = None
    output: Any = None
    error: str | None = None

    def _notes(self, lookups: dict[int, tuple[str, str]]) -> str:
        expression = self.step.args.get("expression") if self.step.tool == "calc" else None
        if not isinstance(expression, str) or self.error is not None:
            return ""
        return ref_notes(expression, lookups, result_text(self.output))

    def view(self, lookups: dict[int, tuple[str, str]]) -> dict[str, Any]:
        """What joiner and replanner templates see of a task; `notes` names what a calc's `$K`
        stand for (`ref_notes`, as in models.tasks.joiner_user, which the joiner trained on)."""
        return {
            "index": self.step.index,
            "tool": self.step.tool,
            "args": _printable(self.step.args),
            "inputs": self.inputs,
            "output": self.output,
            "output_text": None if self.error else result_text(self.output),
            "error": self.error,
            "notes": self._notes(lookups),
        }


@dataclass
class Round:
    """One planner -> tools -> joiner round."""

    number: int
    lines: list[str] = field(default_factory=list)
    tasks: dict[int, Task] = field(default_factory=dict)
    joined: bool = False
    error: str | None = None
    answer: str | None = None

    @property
    def text(self) -> str:
        """The plan as written so far (valid lines only)."""
        return "\n".join(self.lines)

    def views(self) -> list[dict[str, Any]]:
        """Every task's view, calc notes resolved against the round's finished lookups."""
        lookups = {
            n: (str(t.inputs["entity"]), result_text(t.output))
            for n, t in self.tasks.items()
            if t.step.tool == "kb.lookup" and t.error is None and t.inputs and "entity" in t.inputs
        }
        return [t.view(lookups) for t in self.tasks.values()]

    def summary(self) -> dict[str, Any]:
        """What the next round's planner sees of this one."""
        return {
            "round": self.number,
            "text": self.text,
            "error": self.error,
            "answer": self.answer,
            "tasks": self.views(),
        }


async def run_plan(
    ctx: RunContext, env: Env, run: StepRun, scope: dict[str, Any], variant: Fallback | None
) -> str:
    """Plan, run the tools, join; replan until an answer or `max_rounds` rounds. A fallback
    (`variant`) names another planner model: its rounds start afresh."""
    spec: PlanSpec = run.step.plan
    history: list[dict[str, Any]] = []
    rounds = _Rounds(ctx, env, run, scope, planner=variant.model if variant else None)
    for number in range(1, spec.max_rounds + 1):
        done = await rounds.run(Round(number), history)
        history.append(done.summary())
        if done.error is None and not _asks_replan(done.answer, spec):
            return done.answer or ""
    last = history[-1]
    why = last["error"] or f"the joiner asked to replan ({last['answer']!r})"
    raise PlanFailed(f"plan step {run.name!r} found no answer in {spec.max_rounds} round(s): {why}")


def _asks_replan(answer: str | None, spec: PlanSpec) -> bool:
    return answer is None or answer.strip().startswith(spec.replan_marker)


class _Rounds:
    """Runs rounds of one plan step: model calls, line parsing, task dispatch, events."""

    def __init__(
        self,
        ctx: RunContext,
        env: Env,
        run: StepRun,
        scope: dict[str, Any],
        *,
        planner: str | None = None,
    ) -> None:
        self.ctx, self.env, self.run_, self.scope = ctx, env, run, scope
        attempt = run.tally.attempts  # the policy sets it before each attempt
        self.attempt_prefix = f"a{attempt}." if attempt > 1 else ""
        self.spec: PlanSpec = run.step.plan
        self.planner = self.spec.planner
        if planner is not None:  # a fallback's planner model alias
            self.planner = replace(self.planner, model=planner)
        self.tools = frozenset(env.declared_tools)
        grounding = self.spec.grounding
        self.grounding = render(grounding, scope) if grounding is not None else ""

    async def run(self, current: Round, history: list[dict[str, Any]]) -> Round:
        """One round; its errors are recorded on it (and on the run's events), never raised."""
        try:
            if self.spec.mode == "sequential":
                await self._plan_sequentially(current, history)
            else:
                await self._plan_streaming(current, history)
            await self._settle(current)
        except (PlanRejected, TaskFailed) as e:
            current.error = str(e)
            await self._cancel(current)
            return current
        except BaseException:
            await self._cancel(current)
            raise
        current.answer = await self._join(current, history)
        return current

    # -- planning ------------------------------------------------------------------------------

    async def _plan_streaming(self, current: Round, history: list[dict[str, Any]]) -> None:
        """One planner call; each completed line is parsed and dispatched while it streams."""
        feed = _LineFeed(lambda line: self._accept(current, line))
        call = self._planner_call(current, history)
        writing = asyncio.ensure_future(
            self._model(call, f"{current.number}.planner", on_delta=feed.push)
        )
        feed.on_error = writing.cancel  # a rejected plan is not worth finishing
        try:
            result = await writing
        except asyncio.CancelledError:
            if feed.error is None or _cancelling():
                raise
        feed.close()
        if feed.error is not None:
            raise feed.error
        if not current.joined:
            self._reject(current, f"the plan does not end with {JOIN}() ({_tail(result.text)!r})")

    async def _plan_sequentially(self, current: Round, history: list[dict[str, Any]]) -> None:
        """One planner call per line; each tool call finishes before the next line is asked for."""
        for turn in range(1, self.spec.max_tasks + 2):
            call = self._planner_call(current, history)
            call = replace(call, stop=sorted({*call.stop, "\n"}))
            result = await self._model(call, f"{current.number}.planner.{turn}")
            line = result.text.strip().split("\n", 1)[0]
            task = self._accept(current, line)
            if current.joined:
                return
            if task is not None:
                await task.future
        self._reject(current, f"no {JOIN}() after {self.spec.max_tasks} tasks")

    def _planner_call(self, current: Round, history: list[dict[str, Any]]) -> ModelCall:
        plan = {"round": current.number, "rounds": history, "text": current.text}
        if self.spec.mode == "sequential" and current.lines:
            plan["text"] += "\n"  # the next line starts on a line of its own
        call = self._call(self.planner, plan)
        if current.number > 1 and self.spec.replan_temperature is not None:
            call = replace(call, temperature=self.spec.replan_temperature)
        if self.spec.constrain:
            # A sequential turn writes the next line only: its grammar starts there.
            first = len(current.lines) + 1 if self.spec.mode == "sequential" else 1
            grammar = _plan_grammar(
                sorted(self.tools), self._names(), first=first, max_steps=self.spec.max_tasks
            )
            call = replace(call, grammar=grammar)
        return call

    def _names(self) -> list[str]:
        """Names a constrained plan may write in grounded arguments: the grounding's candidate
        names (its capitalised words; none when the step grounds nothing: then names are free)."""
        if not self.spec.grounded_args:
            return []
        return list(question_names(self.grounding))

    def _accept(self, current: Round, line: str) -> Task | None:
        """Parse line N, check it, and start its tool call (join() ends the plan)."""
        if current.joined or not line.strip():
            return None  # text after join() is ignored; blank lines carry nothing
        n = len(current.lines) + 1
        try:
            step = parse_line(n, line)
        except PlanSyntaxError as e:
            self._reject(current, str(e))
        if step.tool == JOIN:
            if step.args:
                self._reject(current, f"plan line {n}: {JOIN}() takes no arguments")
            current.joined = True
            current.lines.append(f"{n}. {JOIN}()")
            return None
        self._admit(current, step)
        task = Task(step)
        current.tasks[n] = task
        current.lines.append(line.strip())
        task.future = asyncio.create_task(self._tool(current, task), name=f"{self.run_.name}:{n}")
        return task

    def _admit(self, current: Round, step: PlanStep) -> None:
        """The policy a line must pass before it runs: a declared tool, the task limit,
        grounded arguments. (The registry checks the arguments against the tool's schema.)"""
        n = step.index
        if step.tool not in self.tools:
            declared = ", ".join(sorted(self.tools))
            self._reject(current, f"plan line {n}: tool {step.tool!r} is not declared ({declared})")
        if n > self.spec.max_tasks:
            self._reject(current, f"the plan has more than {self.spec.max_tasks} tasks")
        for name in self.spec.grounded_args:
            value = step.args.get(name)
            if isinstance(value, str) and not _occurs(value, self.grounding):
                self._reject(current, f"plan line {n}: {name} {value!r} is not in the question")

    def _reject(self, current: Round, message: str) -> NoReturn:
        self._event_failed(f"{current.number}.plan", message)
        raise PlanRejected(message)

    # -- tools ---------------------------------------------------------------------------------

    async def _tool(self, current: Round, task: Task) -> Any:
        """Wait for the referenced lines, substitute their outputs, call the tool."""
        step, sid = task.step, f"{current.number}.{task.step.index}"
        for k in step.deps:
            dep = current.tasks[k]
            try:
                await asyncio.shield(dep.future)
            except TaskFailed:
                task.error = f"line {k} it references failed"
                self._event_failed(sid, task.error)
                raise TaskFailed(f"plan line {step.index}: {task.error}") from None
        results = {k: current.tasks[k].output for k in step.deps}
        task.inputs = substitute(step.args, results)
        started = self._event_started(sid)
        try:
            async with self.env.slots.hold(f"tool:{step.tool}", self.run_.priority):
                task.output = await self.env.tools.call(step.tool, dict(task.inputs))
        except Exception as e:
            task.error = f"{type(e).__name__}: {e}"
            self._event_failed(sid, task.error)
            raise TaskFailed(f"plan line {step.index} ({step.tool}): {task.error}") from e
        self._event_finished(sid, task.output, started, tokens=0, model=None)
        return task.output

    async def _settle(self, current: Round) -> None:
        """Wait for every task; the first failure (in line order) fails the round."""
        futures = [t.future for t in current.tasks.values() if t.future is not None]
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _cancel(self, current: Round) -> None:
        futures = [t.future for t in current.tasks.values() if t.future is not None]
        for future in futures:
            future.cancel()
        await asyncio.gather(*futures, return_exceptions=True)

    # -- joining -------------------------------------------------------------------------------

    async def _join(self, current: Round, history: list[dict[str, Any]]) -> str:
        plan = {
            "round": current.number,
            "rounds": history,
            "text": current.text,
            "tasks": current.views(),
        }
        call = self._call(self.spec.joiner, plan)
        if self.spec.constrain_answer:
            call = replace(call, choice=self._answers(current))
        # The step's own deltas carry only what can become its output: no replan answer,
        # no blanks around it (the answer is stripped), so a chat client can show them at once.
        answer = _AnswerFeed(partial(self.ctx.delta, self.run_.step_ids), self.spec.replan_marker)
        result = await self._model(call, f"{current.number}.joiner", on_delta=answer.push)
        return result.text.strip()

    def _answers(self, current: Round) -> list[str]:
        """What a constrained joiner may answer: the grounding's candidate names, the tasks'
        output texts (not for a "which" question among names: `answer_choices`), or the
        replan marker."""
        values = [result_text(t.output) for t in current.tasks.values() if t.error is None]
        found = [*answer_choices(self.grounding, values), self.spec.replan_marker]
        return [a for a in dict.fromkeys(found) if a.strip()]

    # -- model calls and events ----------------------------------------------------------------

    def _call(self, gen: Generate, plan: dict[str, Any]) -> ModelCall:
        return model_call(gen, {**self.scope, "plan": plan}, models=self.env.models, variant=None)

    async def _model(
        self,
        call: ModelCall,
        sub: str,
        *,
        on_delta: Callable[[str], None] | None = None,
    ) -> ModelResult:
        """A model call under its model's slot, charged to the step, reported as `sub`."""
        run, ctx = self.run_, self.ctx
        sid = self._sid(sub)
        run.tally.model = run.tally.model or call.target
        started = self._event_started(sub)

        def delta(text: str) -> None:
            ctx.emit(events.TokenDelta(run_id=ctx.run_id, step=sid, text=text))
            if on_delta is not None:
                on_delta(text)

        try:
            async with self.env.slots.hold(f"model:{call.target}", run.priority):
                result = await self.env.backends.generate(call, delta)
        except Exception as e:
            self._event_failed(sub, f"{type(e).__name__}: {e}")
            raise
        except asyncio.CancelledError:
            self._event_failed(sub, "stopped: the plan was rejected or the run ended")
            raise
        tokens = result.prompt_tokens + result.completion_tokens
        self._event_finished(sub, result.text, started, tokens=tokens, model=call.target)
        budget = run.step.budget.max_tokens if run.step.budget else None
        ctx.charge(run.tally, result, step=run.name, step_limit=budget)
        return result

    def _sid(self, sub: str) -> str:
        """The trace id of a sub-step: `<step>.<round>.<what>`, and from the step's second
        attempt (a retry or a fallback planner) `<step>.a<N>.<round>.<what>`, so an attempt
        never overwrites an earlier attempt's rows."""
        return f"{self.run_.name}.{self.attempt_prefix}{sub}"

    def _event_started(self, sub: str) -> float:
        ctx = self.ctx
        ctx.emit(events.StepStarted(run_id=ctx.run_id, step=self._sid(sub), attempt=1))
        return time.time()

    def _event_finished(
        self, sub: str, output: Any, started: float, *, tokens: int, model: str | None
    ) -> None:
        ctx = self.ctx
        ctx.emit(
            events.StepFinished(
                run_id=ctx.run_id,
                step=self._sid(sub),
                output=output,
                started_at=started,
                finished_at=time.time(),
                attempts=1,
                tokens=tokens,
                model=model,
            )
        )

    def _event_failed(self, sub: str, error: str) -> None:
        ctx = self.ctx
        ctx.emit(events.StepFailed(run_id=ctx.run_id, step=self._sid(sub), error=error, attempts=1))


class _LineFeed:
    """Splits streamed text into lines; calls `on_line` for each complete one, in order.

    The first error `on_line` raises is kept (later text is ignored) and re-raised by the
    caller when the stream ends: the model's stream is not interrupted mid-token.
    """

    def __init__(self, on_line: Callable[[str], Any]) -> None:
        self.on_line = on_line
        self.buffer = ""
        self.error: PlanRejected | None = None
        self.on_error: Callable[[], Any] = lambda: None

    def push(self, text: str) -> None:
        """More streamed text."""
        if self.error is not None:
            return
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self._line(line)

    def close(self) -> None:
        """The stream ended: the last line needs no newline."""
        if self.error is None and self.buffer.strip():
            self._line(self.buffer)
        self.buffer = ""

    def _line(self, line: str) -> None:
        if self.error is not None:
            return
        try:
            self.on_line(line)
        except PlanRejected as e:
            self.error = e
            self.on_error()


class _AnswerFeed:
    """Passes on a joiner's streamed text as the plan step's output will read: stripped, and
    nothing at all when the answer turns out to ask for a replan.

    Text is held back while the answer so far (less leading blanks) could still become the
    replan marker, and trailing blanks are held until something follows them.
    """

    def __init__(self, emit: Callable[[str], None], marker: str) -> None:
        self.emit, self.marker = emit, marker
        self.head = ""  # text before the answer is known not to be a replan
        self.streaming: bool | None = None  # None: undecided; False: a replan, swallowed
        self.blanks = ""

    def push(self, text: str) -> None:
        """More streamed joiner text."""
        if self.streaming is None:
            self.head += text
            start = self.head.lstrip()
            if not start or self.marker.startswith(start):
                return
            self.streaming = not start.startswith(self.marker)
            text = start
        if self.streaming:
            pending = self.blanks + text
            out = pending.rstrip()
            self.blanks = pending[len(out) :]
            if out:
                self.emit(out)


def _plan_grammar(tools: list[str], names: list[str], *, first: int, max_steps: int) -> str:
    """The plan grammar over these tools and names, from line `first`, at most `max_steps`
    calls (constrained decoding: the task limit holds while decoding too)."""
    from planner import plan_format

    if not plan_format.has_grammar():
        raise OperatorError("constrained plan decoding is not available on this server")
    return plan_format.plan_grammar(tools, names=names, first=first, max_steps=max_steps)


def _printable(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments as written: a bare `$K` reads as that text."""
    return {k: (f"${v.index}" if isinstance(v, Ref) else v) for k, v in args.items()}


def _cancelling() -> bool:
    """Whether someone is cancelling the current task (not just the call it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _occurs(value: str, text: str) -> bool:
    """Whether `value` occurs in `text` as whole words (`Mou` is not in `Mounnais`)."""
    return bool(value.strip()) and re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


def _tail(text: str) -> str:
    return text.strip()[-80:]
