"""The pipeline spec language as msgspec Structs: the single source of `schemas/pipeline.schema.json`.

A step is one of the kinds `generate`, `tool`, `filter`, `route`, `pipeline`, `plan`, named by the
key it carries (as in the design sketch); `map` fans any `generate`/`tool`/`pipeline` step out over a list.
Policies (`when`, `retries`, `timeout`, `fallback`, `cache`, `budget`) apply to every kind.
Everything a spec names is a name (model alias, registered tool, pipeline): never code or a URL.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# Identifiers of steps, inputs and outputs: usable as Jinja2 attribute names.
Identifier = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
# Dotted registry names (`kb.search`) and model references (`demo-base:router`, `provider/model`).
ToolName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]
ModelRef = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-/]*(:[A-Za-z0-9._\-]+)?$", max_length=128)
]
PipelineRef = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*(@[A-Za-z0-9._\-/]+)?$", max_length=128)
]
Template = Annotated[str, Meta(max_length=32_768)]  # Jinja2 template (sandboxed)
Expression = Annotated[str, Meta(max_length=2_048)]  # bare Jinja2 expression (sandboxed)
# "250ms", "10s", "2m", or seconds as a number.
Duration = Annotated[str, Meta(pattern=r"^\d+(\.\d+)?(ms|s|m)$")] | Annotated[float, Meta(gt=0.0)]

STEP_KINDS = ("generate", "tool", "filter", "route", "pipeline", "plan")

_STRUCT = {"forbid_unknown_fields": True, "frozen": True, "kw_only": True}


class Message(Struct, **_STRUCT):
    """One chat message; `content` is a template."""

    role: Literal["system", "user", "assistant"]
    content: Template


class Generate(Struct, **_STRUCT):
    """A model call: a prompt or chat messages, sampling parameters, output constraints."""

    model: Identifier  # an alias from the pipeline's `models`
    prompt: Template | None = None
    messages: Annotated[list[Message], Meta(min_length=1, max_length=64)] | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=32_768)] = 256
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0
    stop: Annotated[list[str], Meta(max_length=8)] = []
    seed: int | None = None


class Fallback(Struct, **_STRUCT):
    """An alternative tried, in order, when the step's own attempts are exhausted."""

    model: Identifier | None = None  # generate steps: another model alias; plan: another planner
    tool: ToolName | None = None  # tool steps: another registered tool with the same args
    max_tokens: Annotated[int, Meta(ge=1, le=32_768)] | None = None


class Filter(Struct, **_STRUCT):
    """Keep the items of a list for which `where` is true (`item`, `index` in scope)."""

    items: Expression
    where: Expression
    limit: Annotated[int, Meta(ge=1)] | None = None


class Branch(Struct, **_STRUCT):
    """A route branch: the steps it enables when `when` is true."""

    when: Expression
    steps: Annotated[list[Identifier], Meta(min_length=1)]


class Route(Struct, **_STRUCT):
    """Choose the first branch whose condition holds; steps of other branches are skipped."""

    branches: Annotated[list[Branch], Meta(min_length=1, max_length=32)]
    default: list[Identifier] = []


class CallPipeline(Struct, **_STRUCT):
    """Run another registered pipeline (`name` or `name@version`) with templated inputs."""

    name: PipelineRef
    inputs: dict[Identifier, Any] = {}


class PlanSpec(Struct, **_STRUCT):
    """LLMCompiler-style: a planner model writes a plan (`planner/plan_format.py`) over the
    pipeline's tools; each line runs as soon as it is complete and the lines it references are
    done; a joiner model answers from the results. The joiner's answer starting with
    `replan_marker`, a failed task or a plan that does not parse starts another round (the
    planner sees `plan.rounds`), up to `max_rounds`.

    Templates of `planner` and `joiner` see `plan`: `round`, `rounds` (earlier rounds: `text`,
    `error`, `answer`), and for the joiner `text` and `tasks` (each `index`, `tool`, `args` as
    written, `inputs` with `$K` substituted, `output`, `output_text`, and `notes`: for a calc,
    what its `$K` stand for, `plan_format.ref_notes`).
    """

    planner: Generate
    joiner: Generate
    # "parallel": one planner call streams the whole plan, tasks start as their lines complete.
    # "sequential": ReAct-style, one planner call per line (the planner sees `plan.text` so
    # far and stops at the newline), each task run before the next call.
    mode: Literal["parallel", "sequential"] = "parallel"
    constrain: bool = False  # decode the plan under the plan grammar of the declared tools
    # Decode the joiner's answer as a choice: a candidate name of `grounding`, a task's
    # output text, or `replan_marker` (for short answers that cite what the plan found).
    constrain_answer: bool = False
    max_rounds: Annotated[int, Meta(ge=1, le=8)] = 2
    max_tasks: Annotated[int, Meta(ge=1, le=32)] = 16
    replan_marker: Annotated[str, Meta(min_length=1, max_length=64)] = "Replan"
    replan_temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    # Grounding: a plan line whose string argument named in `grounded_args` (e.g. `entity`)
    # does not occur as a whole word in the rendered `grounding` (e.g. the user's question)
    # is rejected before it runs: a model that invents a name gets another round instead.
    grounding: Template | None = None
    grounded_args: Annotated[list[Identifier], Meta(max_length=16)] = []


class Budget(Struct, **_STRUCT):
    """Per-step limits on tokens generated and wall time."""

    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_seconds: Annotated[float, Meta(gt=0.0)] | None = None


class Step(Struct, **_STRUCT):
    """One step: exactly one kind key, optional `map` fan-out, and policies."""

    # kinds (exactly one)
    generate: Generate | None = None
    tool: ToolName | None = None
    filter: Filter | None = None
    route: Route | None = None
    pipeline: CallPipeline | None = None
    plan: PlanSpec | None = None
    # arguments of a tool step: values are templates (strings) or literals
    args: dict[Identifier, Any] = {}
    # fan-out: evaluate to a list; the step runs once per element (`item`, `index` in scope)
    map: Expression | None = None
    map_limit: Annotated[int, Meta(ge=1)] | None = None  # only the first N items
    concurrency: Annotated[int, Meta(ge=1, le=1024)] | None = None
    # output constraints (generate): validated after generation
    output: dict[str, Any] | None = None  # {enum: [...]} or {type: json}
    output_schema: dict[str, Any] | None = None  # JSON Schema the parsed JSON output must match
    # policies
    when: Expression | None = None
    retries: Annotated[int, Meta(ge=0, le=10)] = 0
    timeout: Duration | None = None
    fallback: Annotated[list[Fallback], Meta(max_length=8)] = []
    cache: bool = False
    budget: Budget | None = None
    description: str | None = None

    @property
    def kind(self) -> str:
        """The kind key this step carries (the loader guarantees exactly one)."""
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)


class Limits(Struct, **_STRUCT):
    """Pipeline-wide limits; the server's own limits cap these."""

    max_fan_out: Annotated[int, Meta(ge=1, le=100_000)] = 256
    run_timeout: Duration = "300s"
    max_total_tokens: Annotated[int, Meta(ge=1)] = 100_000
    max_concurrency: Annotated[int, Meta(ge=1, le=4096)] = 64


class Chat(Struct, **_STRUCT):
    """Expose the pipeline as an OpenAI chat model: which input gets the conversation,
    which output is the answer."""

    input: Identifier = "messages"
    output: Identifier = "answer"


class PipelineSpec(Struct, **_STRUCT):
    """A whole pipeline spec."""

    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")]
    steps: Annotated[dict[Identifier, Step], Meta(min_length=1, max_length=1_000)]
    outputs: Annotated[dict[Identifier, Template], Meta(min_length=1)]
    version: str | None = None
    description: str | None = None
    inputs: dict[Identifier, dict[str, Any]] = {}  # JSON Schema per input
    models: dict[
        Identifier, ModelRef
    ] = {}  # alias -> engine model (`base`, `base:adapter`) or provider model
    tools: list[ToolName] = []
    limits: Limits = Limits()
    chat: Chat | None = None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline spec, as committed in schemas/pipeline.schema.json."""
    schema = msgspec.json.schema(PipelineSpec)
    step = schema["$defs"]["Step"]
    step["oneOf"] = [{"required": [k]} for k in STEP_KINDS]
    _float_bounds(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://compound.dev/schemas/pipeline.schema.json"
    return schema


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _float_bounds(node: Any) -> None:
    """Write bounds of number fields as floats. typing caches `Annotated[...]` by equality
    (2 == 2.0), so a bound can come back as int or float depending on import order."""
    if isinstance(node, dict):
        if node.get("type") == "number":
            for key in _BOUNDS:
                if key in node:
                    node[key] = float(node[key])
        for value in node.values():
            _float_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _float_bounds(value)
