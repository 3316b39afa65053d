"""One async function per physical operator, plus `map` fan-out and output validation.

A *call* operator (`generate`, `tool`, `pipeline`) runs once per unit of work: the whole step,
or one item of its `map`; the policies (retries, timeout, fallback) wrap each unit. A *local*
operator (`filter`, `route`) only evaluates expressions. `batch` runs its member tasks at once
so the engine sees them together in one continuous batch.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import jsonschema

from executor.backends import Backends, ModelCall, ModelResult
from executor.cache import MISSING, ResultCache
from executor.context import RunContext, StepTally
from executor.errors import FanOutExceeded, OperatorError, OutputError
from executor.slots import Slots
from planner.expressions import evaluate, render, render_value
from planner.spec import Fallback, Generate, Step

T = TypeVar("T")
R = TypeVar("R")


class ToolCaller(Protocol):
    """What the executor needs of a tool registry (`tools.registry.ToolRegistry`)."""

    async def call(self, name: str, args: dict[str, Any], *, timeout_s: float | None = None) -> Any:
        """Validate the arguments, run the tool, return its JSON result."""
        ...


class PipelineResolver(Protocol):
    """Runs another registered pipeline for a `pipeline` step; given by the caller."""

    # What a plain name resolves against (e.g. the commit the caller's spec came from): the
    # same name may run different content in two runs, so it is part of the cache key.
    scope: str | None

    async def run(self, name_ref: str, inputs: dict[str, Any]) -> dict[str, Any]:
        """Resolve `name` or `name@version`, run it with `inputs`, return its outputs."""
        ...


@dataclass(frozen=True, kw_only=True)
class Env:
    """The services and limits every operator of a run shares."""

    backends: Backends
    tools: ToolCaller
    pipelines: PipelineResolver | None
    models: Mapping[str, str]  # alias -> target
    slots: Slots
    cache: ResultCache | None
    max_fan_out: int
    max_concurrency: int
    retry_base_s: float
    retry_max_s: float
    declared_tools: tuple[str, ...] = ()  # the pipeline's `tools`: all a plan step may call


@dataclass
class StepRun:
    """A task's step while it runs: who it is, how urgent, what it has used."""

    task_id: str
    step_ids: tuple[str, ...]
    step: Step
    op: str
    priority: float
    tally: StepTally = field(default_factory=StepTally)

    @property
    def name(self) -> str:
        """The step named in errors (the first of merged steps)."""
        return self.step_ids[0]


CallOp = Callable[[RunContext, Env, StepRun, dict[str, Any], Fallback | None], Awaitable[Any]]


# -- call operators ----------------------------------------------------------------------------


async def generate(
    ctx: RunContext, env: Env, run: StepRun, scope: dict[str, Any], variant: Fallback | None
) -> Any:
    """A model call; the output is the text, checked against `output` / `output_schema`."""
    call = model_call(
        run.step.generate,
        scope,
        models=env.models,
        variant=variant,
        constraint=output_constraint(run.step),
    )
    run.tally.model = call.target

    async def compute() -> ModelResult:
        async with env.slots.hold(f"model:{call.target}", run.priority):
            result = await env.backends.generate(call, partial(ctx.delta, run.step_ids))
        budget = run.step.budget.max_tokens if run.step.budget else None
        ctx.charge(run.tally, result, step=run.name, step_limit=budget)
        return result

    check = partial(_checked_text, run.step)
    return await _through_cache(env, run, ("generate", call), compute, check)


async def call_tool(
    ctx: RunContext, env: Env, run: StepRun, scope: dict[str, Any], variant: Fallback | None
) -> Any:
    """A registered tool called with the rendered `args`; a fallback may name another tool."""
    name = variant.tool if variant is not None and variant.tool else run.step.tool
    args = render_value(dict(run.step.args), scope)

    async def compute() -> Any:
        async with env.slots.hold(f"tool:{name}", run.priority):
            return await env.tools.call(name, args)

    return await _through_cache(env, run, ("tool", name, args), compute, _same)


async def call_pipeline(
    ctx: RunContext, env: Env, run: StepRun, scope: dict[str, Any], variant: Fallback | None
) -> Any:
    """Another pipeline run through the caller's resolver; the output is its outputs."""
    target = run.step.pipeline
    if env.pipelines is None:
        raise OperatorError(
            f"step {run.name!r} calls pipeline {target.name!r} but this run has no pipeline resolver"
        )
    inputs = render_value(dict(target.inputs), scope)
    # No slot: the sub-run has its own limits, and holding ours while it waits could starve us.
    compute = partial(env.pipelines.run, target.name, inputs)
    key = ("pipeline", target.name, env.pipelines.scope, inputs)
    return await _through_cache(env, run, key, compute, _same)


CALL_OPS: dict[str, CallOp] = {"generate": generate, "tool": call_tool, "pipeline": call_pipeline}


# -- local operators ---------------------------------------------------------------------------


async def filter_items(ctx: RunContext, run: StepRun) -> list[Any]:
    """The items for which `where` holds, at most `limit` of them."""
    spec = run.step.filter
    scope = ctx.scope()
    items = as_list(evaluate(spec.items, scope), what=f"filter items of step {run.name!r}")
    kept: list[Any] = []
    for index, item in enumerate(items):
        if spec.limit is not None and len(kept) >= spec.limit:
            break
        if evaluate(spec.where, {**scope, "item": item, "index": index}):
            kept.append(item)
    return kept


async def choose_route(ctx: RunContext, run: StepRun) -> str:
    """The label of the first branch whose condition holds ("0", "1", ...), else "default"."""
    scope = ctx.scope()
    for index, branch in enumerate(run.step.route.branches):
        if evaluate(branch.when, scope):
            return str(index)
    return "default"


LOCAL_OPS: dict[str, Callable[[RunContext, StepRun], Awaitable[Any]]] = {
    "filter": filter_items,
    "route": choose_route,
}


async def run_batch(members: Sequence[T], run_member: Callable[[T], Awaitable[Any]]) -> None:
    """Start every member at once (one engine batch); the first failure cancels the others."""
    await bounded_gather(members, run_member, concurrency=max(1, len(members)))


# -- map ---------------------------------------------------------------------------------------


async def fan_out(
    ctx: RunContext, env: Env, run: StepRun, unit: Callable[[dict[str, Any]], Awaitable[Any]]
) -> list[Any]:
    """Run `unit` once per item of the step's `map`, at most `concurrency` at a time, in order."""
    scope = ctx.scope()
    items = as_list(evaluate(run.step.map, scope), what=f"map of step {run.name!r}")
    if run.step.map_limit is not None:
        items = items[: run.step.map_limit]
    if len(items) > env.max_fan_out:
        raise FanOutExceeded(
            f"map of step {run.name!r} has {len(items)} items, over max_fan_out {env.max_fan_out}"
        )
    concurrency = min(run.step.concurrency or env.max_concurrency, env.max_concurrency)
    scopes = [{**scope, "item": item, "index": i} for i, item in enumerate(items)]
    return await bounded_gather(scopes, unit, concurrency=concurrency)


def as_list(value: Any, *, what: str) -> list[Any]:
    """A list from an evaluated expression; None (a skipped step's output) is empty."""
    if value is None:
        return []
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise OperatorError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


async def bounded_gather(
    args: Sequence[T], fn: Callable[[T], Awaitable[R]], *, concurrency: int
) -> list[R]:
    """`fn` over `args` with at most `concurrency` running; results in order.

    The first failure cancels the rest and is raised as itself (not as an exception group).
    """
    results: list[Any] = [None] * len(args)
    indices = iter(range(len(args)))

    async def worker() -> None:
        for i in indices:
            results[i] = await fn(args[i])

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, len(args))):
                group.create_task(worker())
    except BaseExceptionGroup as errors:
        first = _first_leaf(errors)
        raise first from first.__cause__
    return results


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# -- calls and outputs -------------------------------------------------------------------------


def output_constraint(step: Step) -> dict[str, Any]:
    """What the backend should enforce while decoding: the `output` enum or the JSON schema.

    `{enum: [...]}` becomes a choice of the members' text (what `check_output` compares),
    `{type: json}` any JSON value, `output_schema` that schema.
    """
    constraint = step.output or {}
    if "enum" in constraint:
        return {"choice": [str(c) for c in constraint["enum"]]}
    if step.output_schema is not None:
        return {"json_schema": step.output_schema}
    if constraint.get("type") == "json":
        return {"json_schema": {}}
    return {}


def model_call(
    gen: Generate,
    scope: dict[str, Any],
    *,
    models: Mapping[str, str],
    variant: Fallback | None,
    constraint: Mapping[str, Any] | None = None,
) -> ModelCall:
    """Render a `generate` spec into a call; a fallback swaps the model alias or `max_tokens`.

    `constraint` (from `output_constraint`) rides along for backends that decode under it.
    """
    alias = variant.model if variant is not None and variant.model else gen.model
    if alias not in models:
        raise OperatorError(f"model alias {alias!r} is not declared in the pipeline's models")
    max_tokens = variant.max_tokens if variant is not None and variant.max_tokens else None
    messages = None
    if gen.messages is not None:
        messages = [{"role": m.role, "content": render(m.content, scope)} for m in gen.messages]
    return ModelCall(
        target=models[alias],
        prompt=render(gen.prompt, scope) if gen.prompt is not None else None,
        messages=messages,
        max_tokens=max_tokens or gen.max_tokens,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        stop=list(gen.stop),
        seed=gen.seed,
        **(constraint or {}),
    )


def check_output(step: Step, text: str) -> Any:
    """The step's output from model text: an `enum` member, parsed JSON, or the text itself."""
    constraint = step.output or {}
    if "enum" in constraint:
        return _enum_member(constraint["enum"], text)
    if constraint.get("type") == "json" or step.output_schema is not None:
        value = parse_json(text)
        if step.output_schema is not None:
            validate_schema(step.output_schema, value)
        return value
    return text


def _enum_member(choices: list[Any], text: str) -> Any:
    answer = text.strip()
    for choice in choices:
        if str(choice) == answer:
            return choice
    raise OutputError(f"output {answer[:200]!r} is not one of {choices}")


def parse_json(text: str) -> Any:
    """JSON from model text, tolerating surrounding blanks and a ``` code fence."""
    body = text.strip()
    if body.startswith("```"):
        body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        return json.loads(body)
    except ValueError as e:
        raise OutputError(f"output is not valid JSON ({e}): {body[:200]!r}") from e


def validate_schema(schema: dict[str, Any], value: Any) -> None:
    """Raise `OutputError` with a JSON pointer when `value` does not match `schema`."""
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except jsonschema.SchemaError as e:
        raise OutputError(f"output_schema is not a valid JSON Schema: {e.message}") from e
    if error is not None:
        raise OutputError(error.message[:300], path=json_pointer(error.absolute_path))


def json_pointer(parts: Iterable[Any]) -> str:
    """A JSON pointer (RFC 6901) from path parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _checked_text(step: Step, result: ModelResult) -> Any:
    return check_output(step, result.text)


def _same(value: Any) -> Any:
    return value


async def _through_cache(
    env: Env,
    run: StepRun,
    key_parts: tuple[Any, ...],
    compute: Callable[[], Awaitable[Any]],
    check: Callable[[Any], Any],
) -> Any:
    """`check(compute())`, answered from the run's cache for `cache: true` steps.

    Only results that pass `check` are stored: a retry after a bad output must call again.
    """
    run.tally.calls += 1
    key = ResultCache.key(*key_parts) if run.step.cache and env.cache is not None else None
    if key is not None:
        hit = env.cache.get(key)
        if hit is not MISSING:
            run.tally.cached_calls += 1
            return check(hit)
    value = await compute()
    output = check(value)
    if key is not None:
        env.cache.put(key, value)
    return output
