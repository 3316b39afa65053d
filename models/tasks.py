"""Task generators over the synthetic world: router, extract, planner, joiner.

Every example is a chat: a one-word system line naming the task (the tag tells a small model
which task it is doing), the user's text, and the assistant's answer. Splits come from different
seeds (`SPLIT_SEEDS`); train examples whose prompt also occurs in the held-out or validation
split are dropped, so training never sees a prompt it is judged or tuned on.

    >>> from tools.kb import generate_world
    >>> ex = generate("router", "heldout", 1, generate_world(0))[0]
    >>> ex.system, ex.answer in INTENTS
    ('router', True)
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import msgspec

from planner.plan_format import (
    Plan,
    PlanStep,
    Ref,
    format_plan,
    ref_notes,
    result_text,
    substitute,
)
from tools.calc import calc
from tools.kb import World, generate_world
from tools.kb.schema import SCHEMA
from tools.kb.world import _sentence

TASKS = ("router", "extract", "planner", "joiner")
SPLIT_SEEDS = {"train": 1, "heldout": 2, "validation": 3}
INTENTS = ("lookup", "compare", "calculate", "search", "describe", "extract", "chitchat")

# Numeric fields a question may ask about: type -> (kb field alias, words in the question).
NUMERIC: dict[str, tuple[tuple[str, str], ...]] = {
    "country": (("population", "population"), ("area", "area"), ("founded", "founding year")),
    "city": (
        ("population", "population"),
        ("area", "area"),
        ("elevation", "elevation"),
        ("founded", "founding year"),
    ),
    "mountain": (("height", "height"), ("prominence", "prominence"), ("first_ascent", "first ascent year")),
    "river": (("length", "length"), ("discharge", "discharge"), ("basin", "basin area")),
    "company": (("revenue", "revenue"), ("employees", "number of employees"), ("founded", "founding year")),
    "person": (("height", "height"),),
}  # fmt: skip
FLOAT_FIELDS = {"area", "discharge", "revenue"}


class Example(msgspec.Struct, frozen=True):
    """One chat example; `meta` carries what evaluation needs (gold plan, question kind)."""

    task: str
    user: str
    answer: str
    meta: dict = msgspec.field(default_factory=dict)

    @property
    def system(self) -> str:
        """The system line: the task's name."""
        return self.task

    def messages(self, *, with_answer: bool = True) -> list[dict[str, str]]:
        """The chat messages, the assistant's answer last when `with_answer`."""
        msgs = [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]
        if with_answer:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs


def generate(task: str, split: str, n: int, world: World | None = None) -> list[Example]:
    """`n` examples of `task` for `split` (train never repeats a held-out or validation prompt)."""
    world = world or generate_world(0)
    make = GENERATORS[task]
    banned: set[str] = set()
    # Model choices are made on validation, figures reported on held-out: train sees neither
    # split's prompts, and validation none of held-out's.
    for other in {"train": ("heldout", "validation"), "validation": ("heldout",)}.get(split, ()):
        banned |= {e.user for e in _draw(make, world, SPLIT_SEEDS[other], task, 2000)}
    rng = random.Random(f"compound-tasks:{task}:{SPLIT_SEEDS[split]}")
    out: list[Example] = []
    while len(out) < n:
        ex = make(rng, world)
        if ex.user not in banned:
            out.append(ex)
    return out


def _draw(make: Callable, world: World, seed: int, task: str, n: int) -> list[Example]:
    rng = random.Random(f"compound-tasks:{task}:{seed}")
    return [make(rng, world) for _ in range(n)]


# -- planner and joiner ---------------------------------------------------------------------


def _lookup(entity: str | Ref, field: str) -> tuple[str, dict]:
    return "kb.lookup", {"entity": entity, "field": field}


def _pick(rng: random.Random, world: World, k: int) -> tuple[list[str], str, str]:
    """k distinct entities of one type and a numeric field (alias, words) they all have."""
    kind = rng.choice([t for t in NUMERIC if t != "person" or k <= 3])
    names = [e.name for e in rng.sample(world.of_type(kind), k)]
    field, words = rng.choice(NUMERIC[kind])
    return names, field, words


def _listing(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _round(expr: str, field: str) -> str:
    return f"round({expr}, 2)" if field in FLOAT_FIELDS else expr


def _q_growth_compare(rng: random.Random, world: World) -> tuple[str, list, str]:
    (x, y), field, words = _pick(rng, world, 2)
    p, q = rng.choice(range(5, 95, 5)), rng.choice(range(5, 95, 5))
    dx, dy = (
        rng.choice((("grew", "+"), ("shrank", "-"))),
        rng.choice((("grew", "+"), ("shrank", "-"))),
    )
    question = rng.choice(
        (
            f"If {x}'s {words} {dx[0]} {p}% and {y}'s {dy[0]} {q}%, which would be larger?",
            f"Suppose the {words} of {x} {dx[0]} by {p}% and that of {y} {dy[0]} by {q}%. Which would be larger?",
        )
    )
    expr = f"$1 * (1 {dx[1]} {p}/100) > $2 * (1 {dy[1]} {q}/100)"
    return question, [_lookup(x, field), _lookup(y, field), ("calc", {"expression": expr})], "pick"


def _q_sum(rng: random.Random, world: World) -> tuple[str, list, str]:
    names, field, words = _pick(rng, world, rng.randint(2, 5))
    question = rng.choice(
        (
            f"What is the combined {words} of {_listing(names)}?",
            f"What is the total {words} of {_listing(names)}?",
        )
    )
    expr = _round(" + ".join(f"${i}" for i in range(1, len(names) + 1)), field)
    return question, [*(_lookup(n, field) for n in names), ("calc", {"expression": expr})], "value"


def _q_average(rng: random.Random, world: World) -> tuple[str, list, str]:
    names, field, words = _pick(rng, world, rng.randint(2, 5))
    question = f"What is the average {words} of {_listing(names)}?"
    total = " + ".join(f"${i}" for i in range(1, len(names) + 1))
    expr = f"round(({total}) / {len(names)}, 2)"
    return question, [*(_lookup(n, field) for n in names), ("calc", {"expression": expr})], "value"


def _q_difference(rng: random.Random, world: World) -> tuple[str, list, str]:
    (x, y), field, words = _pick(rng, world, 2)
    question = rng.choice(
        (
            f"What is the difference between the {words} of {x} and that of {y}?",
            f"By how much does the {words} of {x} exceed that of {y}?",
        )
    )
    expr = _round("$1 - $2", field)
    return question, [_lookup(x, field), _lookup(y, field), ("calc", {"expression": expr})], "value"


def _q_ratio(rng: random.Random, world: World) -> tuple[str, list, str]:
    (x, y), field, words = _pick(rng, world, 2)
    question = f"How many times the {words} of {y} is the {words} of {x}?"
    expr = "round($1 / $2, 2)"
    return question, [_lookup(x, field), _lookup(y, field), ("calc", {"expression": expr})], "value"


def _q_extreme(rng: random.Random, world: World) -> tuple[str, list, str]:
    names, field, words = _pick(rng, world, rng.randint(2, 5))
    most = rng.random() < 0.5
    question = f"Which has the {'largest' if most else 'smallest'} {words}: {_listing(names).replace(' and ', ' or ')}?"
    refs = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    expr = f"{'max' if most else 'min'}({refs})"
    return question, [*(_lookup(n, field) for n in names), ("calc", {"expression": expr})], "argext"


def _q_density(rng: random.Random, world: World) -> tuple[str, list, str]:
    x = rng.choice(world.of_type(rng.choice(("country", "city")))).name
    question = f"What is the population density of {x} in people per square kilometre?"
    steps = [
        _lookup(x, "population"),
        _lookup(x, "area"),
        ("calc", {"expression": "round($1 / $2, 1)"}),
    ]
    return question, steps, "value"


def _q_growth(rng: random.Random, world: World) -> tuple[str, list, str]:
    (x,), field, words = _pick(rng, world, 1)
    p = rng.choice(range(5, 95, 5))
    sign, verb = rng.choice((("+", "grew"), ("-", "shrank")))
    question = f"What would the {words} of {x} be if it {verb} by {p}%?"
    expr = f"round($1 * (1 {sign} {p}/100), 2)"
    return question, [_lookup(x, field), ("calc", {"expression": expr})], "value"


_CHAINS = (
    ("company", "headquarters", "population", "What is the population of the city where {x} is headquartered?"),
    ("company", "ceo", "height", "How tall is the chief executive of {x}?"),
    ("country", "capital", "population", "What is the population of the capital of {x}?"),
    ("country", "highest_point", "height", "How high is the highest mountain in {x}?"),
    ("river", "source", "height", "How high is the mountain where {x} rises?"),
    ("person", "employer", "revenue", "What is the revenue of the company {x} works for?"),
)  # fmt: skip


def _q_chain(rng: random.Random, world: World) -> tuple[str, list, str]:
    kind, hop, field, template = rng.choice(_CHAINS)
    x = rng.choice(world.of_type(kind)).name
    return template.format(x=x), [_lookup(x, hop), _lookup(Ref(1), field)], "value"


QUESTIONS = (
    _q_growth_compare,
    _q_sum,
    _q_average,
    _q_difference,
    _q_ratio,
    _q_extreme,
    _q_density,
    _q_growth,
    _q_chain,
)


def make_question(rng: random.Random, world: World) -> tuple[str, Plan, str]:
    """A multi-hop numeric question, its gold plan, and how the joiner reads the results."""
    question, calls, kind = rng.choice(QUESTIONS)(rng, world)
    steps = []
    for i, (tool, args) in enumerate(calls, start=1):
        deps = tuple(sorted({a.index for a in args.values() if isinstance(a, Ref)}))
        if tool == "calc":
            deps = tuple(range(1, i))
        steps.append(PlanStep(i, tool, args, deps))
    return question, Plan(tuple(steps)), kind


def execute_plan(plan: Plan, world: World) -> dict[int, object]:
    """Run a plan's steps in order with the real lookups and calc; outputs by line number."""
    results: dict[int, object] = {}
    for step in plan.steps:
        args = substitute(step.args, results)
        if step.tool == "kb.lookup":
            results[step.index] = world.lookup(str(args["entity"]), str(args["field"]))
        elif step.tool == "calc":
            results[step.index] = calc(str(args["expression"]))
        else:
            raise ValueError(f"unknown tool {step.tool!r}")
    return results


def final_answer(plan: Plan, results: dict[int, object], kind: str) -> str:
    """The short answer the joiner must give for these results."""
    last = results[plan.steps[-1].index]
    if kind == "pick":
        first, second = plan.steps[0].args["entity"], plan.steps[1].args["entity"]
        return str(first if last else second)
    if kind == "argext":
        for step in plan.steps[:-1]:
            if results[step.index] == last:
                return str(step.args["entity"])
    return result_text(last)


def joiner_user(question: str, plan: Plan, results: dict[int, object]) -> str:
    """The joiner's prompt: the question, then one short line per plan step with its output.

    A lookup reads `N. <entity> <field> = <output>`, a calc `N. calc <expression> <notes> =
    <output>`, the notes naming the entity and value each `$K` stands for (`ref_notes`);
    executor/planning.py renders served prompts with the same notes.
    """
    lines = []
    lookups: dict[int, tuple[str, str]] = {}
    for step in plan.steps:
        args = substitute(step.args, results)
        output = result_text(results[step.index])
        if step.tool == "kb.lookup":
            what = f"{args['entity']} {args['field']}"
            lookups[step.index] = (str(args["entity"]), output)
        else:
            expression = str(step.args.get("expression", ""))
            what = f"calc {expression}{ref_notes(expression, lookups, output)}"
        lines.append(f"{step.index}. {what} = {output}")
    return f"Question: {question}\n" + "\n".join(lines)


def _planner(rng: random.Random, world: World) -> Example:
    question, plan, kind = make_question(rng, world)
    return Example("planner", question, format_plan(plan), {"kind": kind})


def _joiner(rng: random.Random, world: World) -> Example:
    question, plan, kind = make_question(rng, world)
    results = execute_plan(plan, world)
    return Example(
        "joiner", joiner_user(question, plan, results), final_answer(plan, results, kind)
    )


# -- extract --------------------------------------------------------------------------------

_JSON_TYPES = {"int": "integer", "year": "integer", "float": "number", "bool": "boolean"}


def _extract(rng: random.Random, world: World) -> Example:
    # Records describe entities of other worlds too, so names are new to the model.
    source = world if rng.random() < 0.5 else _other_world(rng.randrange(8))
    entity = rng.choice(source.entities)
    specs = list(SCHEMA[entity.type])
    chosen = sorted(rng.sample(specs, rng.randint(1, 3)), key=specs.index)
    extra = rng.sample([s for s in specs if s not in chosen], rng.randint(0, 2))
    said = [*chosen, *extra]
    rng.shuffle(said)
    record = " ".join(_sentence(entity, spec, rng) for spec in said)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    gold: dict[str, object] = {"name": entity.name}
    for spec in chosen:
        schema["properties"][spec.name] = {"type": _JSON_TYPES.get(spec.kind, "string")}
        gold[spec.name] = entity.fields[spec.name]
    user = f"Schema: {json.dumps(schema, separators=(',', ':'))}\nRecord: {record}"
    return Example("extract", user, json.dumps(gold, ensure_ascii=False))


_WORLDS: dict[int, World] = {}


def _other_world(i: int) -> World:
    if i not in _WORLDS:
        _WORLDS[i] = generate_world(100 + i)
    return _WORLDS[i]


# -- router ---------------------------------------------------------------------------------

_CHAT_OPENERS = (
    "Hi there", "Hello", "Hey", "Good morning", "Good evening", "Thanks a lot", "Thank you",
    "Nice to meet you", "Goodbye", "See you later", "Cheers", "Great", "Hi", "Okay",
)  # fmt: skip
_CHAT_FOLLOWUPS = (
    "", " How are you?", " Who are you?", " What can you do?", " Can you help me?",
    " How is your day going?", " That was helpful.", " You are great.", " Have a nice day.",
    " I am just saying hello.", " What is your name?", " Are you a robot?",
)  # fmt: skip
# Each short template also comes with a country: a template with only a few fill-ins would
# have every one of its prompts in the held-out split, and so none left for training.
_SEARCH = (
    "Find {kind}s in {country}.", "List some {kind}s of {country}.", "Search for {industry} companies.",
    "Which {kind}s are in {country}?", "Show me {industry} companies.", "Find people who work as {occupation}s.",
    "Search the knowledge base for {word}.", "Are there any {climate} cities?",
    "Search for {industry} companies in {country}.", "Show me {industry} companies in {country}.",
    "Find people in {country} who work as {occupation}s.", "Search the knowledge base for {word} in {country}.",
    "Are there any {climate} cities in {country}?",
)  # fmt: skip
_DESCRIBE = (
    "Tell me about {x}.", "Describe {x}.", "What do you know about {x}?", "Give me an overview of {x}.",
    "Who or what is {x}?", "Write a short summary of {x}.",
)  # fmt: skip
_LOOKUP = (
    "What is the {words} of {x}?", "Tell me the {words} of {x}.", "What's {x}'s {words}?",
    "I need the {words} of {x}.", "Look up the {words} of {x}.",
)  # fmt: skip
_EXTRACT = (
    "Extract the {fields} from this record: {record}", "Turn this into JSON with {fields}: {record}",
    "Pull the {fields} out of: {record}", "Record: {record}\nGive me the {fields} as JSON.",
)  # fmt: skip


def _r_lookup(rng: random.Random, world: World) -> str:
    (x,), _, words = _pick(rng, world, 1)
    return rng.choice(_LOOKUP).format(words=words, x=x)


def _r_compare(rng: random.Random, world: World) -> str:
    return make_question(rng, world)[0]


def _r_calculate(rng: random.Random, world: World) -> str:
    a, b, c = rng.randint(2, 9999), rng.randint(2, 999), rng.randint(2, 99)
    op = rng.choice(("+", "-", "*", "/"))
    return rng.choice(
        (
            f"What is {a} {op} {b}?",
            f"Calculate {a} {op} {b} {op} {c}.",
            f"Compute ({a} + {b}) * {c}.",
            f"What is {c}% of {a}?",
            f"How much is {a} divided by {b}?",
            f"What is the square root of {a}?",
        )
    )


def _r_search(rng: random.Random, world: World) -> str:
    from tools.kb.schema import CLIMATES, INDUSTRIES, OCCUPATIONS

    country = rng.choice(world.of_type("country")).name
    return rng.choice(_SEARCH).format(
        kind=rng.choice(("city", "mountain", "river")),
        country=country,
        industry=rng.choice(INDUSTRIES),
        occupation=rng.choice(OCCUPATIONS),
        word=rng.choice(("granite", "glaciers", "shipping", "capital", "coastal")),
        climate=rng.choice(CLIMATES),
    )


def _r_describe(rng: random.Random, world: World) -> str:
    return rng.choice(_DESCRIBE).format(x=rng.choice(world.entities).name)


def _r_extract(rng: random.Random, world: World) -> str:
    entity = rng.choice(world.entities)
    fields = rng.sample(list(entity.fields), min(2, len(entity.fields)))
    record = world.describe(entity.name, variant=rng.randint(1, 10**6))
    sentences = record.split(". ")
    record = ". ".join(sentences[: rng.randint(2, 4)]).rstrip(".") + "."
    return rng.choice(_EXTRACT).format(
        fields=" and ".join(f.replace("_", " ") for f in fields), record=record
    )


def _r_chitchat(rng: random.Random, world: World) -> str:
    # Enough distinct messages that held-out ones can be kept out of training.
    return rng.choice(_CHAT_OPENERS) + rng.choice("!.,") + rng.choice(_CHAT_FOLLOWUPS)


_ROUTES: dict[str, Callable[[random.Random, World], str]] = {
    "lookup": _r_lookup,
    "compare": _r_compare,
    "calculate": _r_calculate,
    "search": _r_search,
    "describe": _r_describe,
    "extract": _r_extract,
    "chitchat": _r_chitchat,
}


def _router(rng: random.Random, world: World) -> Example:
    intent = rng.choice(INTENTS)
    return Example("router", _ROUTES[intent](rng, world), intent)


GENERATORS: dict[str, Callable[[random.Random, World], Example]] = {
    "router": _router,
    "extract": _extract,
    "planner": _planner,
    "joiner": _joiner,
}


def world_texts(world: World, variants: int) -> list[str]:
    """Plain-text descriptions of every entity: the canonical one and `variants - 1` paraphrases."""
    return [world.describe(e.name, variant=v) for v in range(variants) for e in world.entities]
