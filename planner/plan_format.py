"""The plan format a `plan` step's model writes: LLMCompiler-style numbered tool calls.

A plan is one call per line, numbered from 1, ending with `join()`. An argument is a JSON
literal (string, number, true, false, null) or `$K`, the output of line K; inside a string,
`$K` is replaced by that output's text. Every reference points to an earlier line, so the
lines form a DAG and independent lookups run in parallel.

    1. kb.lookup(entity="Zarnoth", field="population")
    2. kb.lookup(entity="Velmora", field="population")
    3. calc(expression="$1 * (1 + 20/100) > $2 * (1 - 10/100)")
    4. join()

The grammar (EBNF; spaces around `=` and after `,` are optional, blank lines are not allowed):

    plan     = { line "\\n" } join_line [ "\\n" ]
    line     = index ". " call
    join_line = index ". join()"
    index    = digit { digit }                        (1, 2, 3, ... in order)
    call     = tool "(" [ arg { "," " "? arg } ] ")"
    tool     = name { "." name }                      e.g. kb.lookup, calc
    arg      = name "=" value
    value    = string | number | "true" | "false" | "null" | "$" index
    string   = JSON string (double quotes, backslash escapes)
    name     = letter { letter | digit | "_" }

    >>> plan = parse_plan('1. kb.lookup(entity="Ukel", field="height_m")\\n2. join()')
    >>> plan.steps[0].tool, plan.steps[0].args
    ('kb.lookup', {'entity': 'Ukel', 'field': 'height_m'})
    >>> substitute({"expression": "$1 * 2"}, {1: 150})
    {'expression': '150 * 2'}
    >>> format_plan(plan) == '1. kb.lookup(entity="Ukel", field="height_m")\\n2. join()'
    True

For constrained decoding, `plan_grammar(tools, names=...)` writes the same grammar in Lark
(llguidance dialect) with the line numbers and `$K` ranges spelled out per line, tool names
limited to `tools` and, when `names` are given, the `entity` arguments limited to those names
(or a `$K` reference); `question_names` picks the candidate names out of a question.

    >>> "kb.lookup" in plan_grammar(["kb.lookup", "calc"], names=["Ukel"])
    True
    >>> question_names("If Zarnoth's population grew 20% and Velmora's shrank, which is larger?")
    ('Zarnoth', 'Velmora')
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import msgspec

JOIN = "join"
MAX_STEPS = 32

_LINE = re.compile(
    r"(?P<index>\d{1,3})\. (?P<tool>[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*)\((?P<args>.*)\)"
)
_ARG_NAME = re.compile(r"\s*([A-Za-z_]\w*)\s*=\s*")
_REF = re.compile(r"\$(\d{1,3})(?!\d)")
# Bounded digit counts: model output must not reach int()'s 4300-digit limit or overflow a float.
_NUMBER = re.compile(r"-?\d{1,30}(?:\.\d{1,30})?(?:[eE][+-]?\d{1,3})?(?!\d)")
_WORDS = {"true": True, "false": False, "null": None}


class PlanSyntaxError(ValueError):
    """A plan that does not follow the grammar; `line` is 1-based (0: the plan as a whole)."""

    def __init__(self, line: int, message: str) -> None:
        self.line = line
        self.message = message
        super().__init__(line, message)

    def __str__(self) -> str:
        return f"plan line {self.line}: {self.message}" if self.line else f"plan: {self.message}"


class Ref(msgspec.Struct, frozen=True):
    """An argument that is exactly `$K`: the whole output of line K."""

    index: int


class PlanStep(msgspec.Struct, frozen=True):
    """One numbered tool call; `deps` are the lines its arguments refer to."""

    index: int
    tool: str
    args: dict[str, Any]
    deps: tuple[int, ...] = ()


class Plan(msgspec.Struct, frozen=True):
    """The tool calls of a plan, in order, without the final join()."""

    steps: tuple[PlanStep, ...]


def parse_plan(text: str) -> Plan:
    """Parse plan text; PlanSyntaxError names the first line that breaks the grammar."""
    lines = text.strip().split("\n")
    if len(lines) > MAX_STEPS + 1:
        raise PlanSyntaxError(0, f"more than {MAX_STEPS} steps")
    steps = [_parse_line(n, line) for n, line in enumerate(lines, start=1)]
    last = steps.pop()
    if last.tool != JOIN or last.args:
        raise PlanSyntaxError(len(lines), "the last line must be join()")
    for step in steps:
        if step.tool == JOIN:
            raise PlanSyntaxError(step.index, "join() must be the last line only")
    return Plan(tuple(steps))


def _parse_line(n: int, line: str) -> PlanStep:
    match = _LINE.fullmatch(line.strip())
    if match is None:
        raise PlanSyntaxError(n, f"expected `{n}. tool(arg=value, ...)`, got {line.strip()!r}")
    if int(match["index"]) != n:
        raise PlanSyntaxError(n, f"expected line number {n}, got {match['index']}")
    args = _parse_args(n, match["args"])
    deps = sorted({k for value in args.values() for k in _refs(value)})
    for k in deps:
        if not 1 <= k < n:
            raise PlanSyntaxError(n, f"${k} does not refer to an earlier line")
    return PlanStep(n, match["tool"], args, tuple(deps))


def _parse_args(n: int, text: str) -> dict[str, Any]:
    args: dict[str, Any] = {}
    pos = 0
    while pos < len(text.rstrip()):
        if args:
            if text[pos] != ",":
                raise PlanSyntaxError(n, f"expected `,` at column {pos + 1} of the arguments")
            pos += 1
        name = _ARG_NAME.match(text, pos)
        if name is None:
            raise PlanSyntaxError(n, f"expected `name=` at column {pos + 1} of the arguments")
        if name[1] in args:
            raise PlanSyntaxError(n, f"argument {name[1]!r} given twice")
        args[name[1]], pos = _parse_value(n, text, name.end())
        pos = len(text) - len(text[pos:].lstrip())
    return args


def _parse_value(n: int, text: str, pos: int) -> tuple[Any, int]:
    if text.startswith('"', pos):
        try:
            value, end = json.JSONDecoder().raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise PlanSyntaxError(n, f"invalid string ({e.msg})") from e
        return value, end
    if text.startswith("$", pos):
        ref = _REF.match(text, pos)
        if ref is None:
            raise PlanSyntaxError(n, "expected a line number after `$`")
        return Ref(int(ref[1])), ref.end()
    for word, value in _WORDS.items():
        if text.startswith(word, pos):
            return value, pos + len(word)
    number = _NUMBER.match(text, pos)
    if number is None:
        raise PlanSyntaxError(n, f"expected a value at column {pos + 1} of the arguments")
    literal = number[0]
    if not any(c in literal for c in ".eE"):
        return int(literal), number.end()
    value = float(literal)
    if not math.isfinite(value):
        raise PlanSyntaxError(n, f"number {literal!r} is out of range")
    return value, number.end()


def _refs(value: Any) -> list[int]:
    if isinstance(value, Ref):
        return [value.index]
    if isinstance(value, str):
        return [int(k) for k in _REF.findall(value)]
    return []


def substitute(args: dict[str, Any], results: dict[int, Any]) -> dict[str, Any]:
    """Arguments with `$K` replaced: a bare reference by the output, in a string by its text."""
    return {name: _substitute(value, results) for name, value in args.items()}


def _substitute(value: Any, results: dict[int, Any]) -> Any:
    if isinstance(value, Ref):
        return results[value.index]
    if isinstance(value, str):
        return _REF.sub(lambda m: result_text(results[int(m[1])]), value)
    return value


def ref_notes(expression: str, lookups: dict[int, tuple[str, str]], output: str) -> str:
    """What the `$K` of a calc expression stand for, as the joiner's prompt shows them.

    `lookups` maps a lookup line's number to its entity and output text; `output` is the
    calc's own output text. A `$K` whose value is that output is marked `matches` and listed
    first (a min or max picks one of its inputs). A small joiner answering "which" questions then reads the
    entity next to the values on one line instead of tracing `$K` back through earlier lines
    and matching numbers. Calc lines have no entity: skipped.

    >>> ref_notes("min($1, $2)", {1: ("Ukel", "12"), 2: ("Orn", "9")}, "9")
    ' ($2 Orn 9 matches, $1 Ukel 12)'
    """
    keys = [k for k in dict.fromkeys(int(k) for k in _REF.findall(expression)) if k in lookups]
    # the matching $K first: a fixed place to copy the entity from, at the start of the notes
    keys.sort(key=lambda k: lookups[k][1] != output)
    parts = [
        f"${k} {lookups[k][0]} {lookups[k][1]}" + (" matches" if lookups[k][1] == output else "")
        for k in keys
    ]
    return f" ({', '.join(parts)})" if parts else ""


def result_text(value: Any) -> str:
    """How an output reads inside a string argument or a joiner prompt (JSON, bare strings)."""
    return value if isinstance(value, str) else json.dumps(value)


def format_plan(plan: Plan) -> str:
    """The text of a plan, join() included; parse_plan(format_plan(p)) == p."""
    lines = [f"{s.index}. {s.tool}({_format_args(s.args)})" for s in plan.steps]
    lines.append(f"{len(plan.steps) + 1}. {JOIN}()")
    return "\n".join(lines)


def _format_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{name}={_format_value(value)}" for name, value in args.items())


def _format_value(value: Any) -> str:
    if isinstance(value, Ref):
        return f"${value.index}"
    return json.dumps(value, ensure_ascii=False)


def parse_line(n: int, line: str) -> PlanStep:
    """Parse line `n` of a plan on its own (a `join()` line parses to tool `join`), for
    executors that start tasks while the plan is still being written."""
    return _parse_line(n, line)


def has_grammar() -> bool:
    """Whether this build can constrain decoding to the plan grammar (`plan_grammar`)."""
    return callable(globals().get("plan_grammar"))


# -- the grammar for constrained decoding ------------------------------------------------------

# Arguments that name an entity: restricted to the question's names when those are given.
ENTITY_ARGS = ("entity",)
_STRING = r'/"([^"\\\n]|\\.)*"/'
_NUMBER_RE = r"/-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?/"
_CAPITALISED = re.compile(r"\b[A-Z][A-Za-z0-9]*(?:[-'][A-Z][A-Za-z0-9]*)*")
_SENTENCE_START = re.compile(r"(?:^|[.?!]\s+)([A-Z][A-Za-z0-9]*)")


def plan_grammar(
    tools: Sequence[str],
    *,
    names: Sequence[str] = (),
    max_steps: int = MAX_STEPS,
    first: int = 1,
) -> str:
    """The Lark grammar (llguidance dialect) of a plan calling only `tools`.

    Line n is `n. call` or `n. join()`, so numbering is exact; a `$K` on line n has 1 <= K < n.
    With `names`, an `entity` argument is one of those names as a JSON string, or a `$K`.
    `first` > 1 is the rest of a plan whose lines before it are written (a ReAct-style turn).
    """
    if not tools:
        raise ValueError("plan_grammar needs at least one tool")
    if not 1 <= first <= max_steps + 1:
        raise ValueError(f"plan_grammar: first line {first} is not in 1..{max_steps + 1}")
    rules = [
        f"start: line{first}",
        "tool: " + " | ".join(json.dumps(t) for t in sorted(set(tools))),
        'sep: "," " "?',
        'eq: " "? "=" " "?',
        f"STRING: {_STRING}",
        f"NUMBER: {_NUMBER_RE}",
        # With names, the free-argument branch must not accept an entity argument too.
        "NAME: /[A-Za-z_][A-Za-z0-9_]*/" + (f" & ~/{'|'.join(ENTITY_ARGS)}/" if names else ""),
        'literal: STRING | NUMBER | "true" | "false" | "null"',
    ]
    entity = (
        " | ".join(json.dumps(json.dumps(n, ensure_ascii=False)) for n in dict.fromkeys(names))
        if names
        else "STRING"
    )
    for n in range(1, max_steps + 2):
        rules.extend(_line_rules(n, entity, last=n == max_steps + 1))
    return "\n".join(rules) + "\n"


def _line_rules(n: int, entity: str, *, last: bool) -> list[str]:
    """Rules of line n: its number, a call whose references stay below n, or join()."""
    join = f'"{n}. {JOIN}()" "\\n"?'
    if last:
        return [f"line{n}: {join}"]
    refs = " | ".join(f'"${k}"' for k in range(1, n))
    value = f"literal | ref{n}" if refs else "literal"
    entity_value = f"{entity} | ref{n}" if refs else entity
    rules = [
        f'line{n}: "{n}. " call{n} "\\n" line{n + 1} | {join}',
        f'call{n}: tool "(" (arg{n} (sep arg{n})*)? ")"',
        f"arg{n}: "
        + " | ".join(f'"{a}" eq ({entity_value})' for a in ENTITY_ARGS)
        + f" | NAME eq ({value})",
    ]
    if refs:
        rules.append(f"ref{n}: {refs}")
    return rules


def question_names(question: str) -> tuple[str, ...]:
    """Capitalised words of the question (possessive 's dropped), in order, without repeats.

    A sentence's first word counts only when it also occurs elsewhere: questions start with
    "What", "If", "Suppose" far more often than with a name.
    """
    starts = [m.start(1) for m in _SENTENCE_START.finditer(question)]
    found: dict[str, list[int]] = {}
    for m in _CAPITALISED.finditer(question):
        found.setdefault(m[0], []).append(m.start())
    return tuple(word for word, at in found.items() if any(i not in starts for i in at))


_WHICH = re.compile(r"\b(which|who)\b", re.IGNORECASE)
_BOOLEANS = ("true", "false")


def answer_choices(question: str, values: Sequence[str]) -> tuple[str, ...]:
    """What a constrained joiner may answer: the question's names and the tasks' output texts
    (`values`, in plan order, the final task's last).

    Only the names when the answer can only be one of them: the question asks "which"/"who"
    about two or more names and the final output is a comparison's `true`/`false`, which
    cannot answer "which" itself. Any other "which" question keeps the values (a lookup's
    country, a difference).

    >>> answer_choices("Which is taller: Ukel or Orn?", ["12", "9", "true"])
    ('Ukel', 'Orn')
    >>> answer_choices("Which country are Ukel and Orn in?", ["Tarsa", "Tarsa"])
    ('Ukel', 'Orn', 'Tarsa')
    """
    names = question_names(question)
    if len(names) >= 2 and values and values[-1] in _BOOLEANS and _WHICH.search(question):
        return names
    return tuple(a for a in dict.fromkeys([*names, *values]) if a.strip())
