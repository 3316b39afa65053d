"""Decoding constraints for the demo tasks, built from the prompt alone (never the answer).

Each function returns the `SamplingParams` fields that constrain one task's output:

- router: `choice` of the intents;
- extract: a JSON schema from the prompt's schema, every property required and in order,
  each value one of the record's own: its words for strings (dates normalised to ISO, as the
  answers write them), its numbers for integers and numbers;
- planner: the plan grammar with entity arguments limited to the question's names;
- joiner: `choice` of the spans an answer can cite: the question's names and the values
  the tool results show.

    >>> router_constraint()["choice"][:2]
    ('lookup', 'compare')
"""

from __future__ import annotations

import json
import re
from typing import Any

from models.tasks import INTENTS
from planner.plan_format import answer_choices, plan_grammar, question_names

PLANNER_TOOLS = ("kb.lookup", "kb.search", "calc")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")  # fmt: skip
# Records write dates as "26 July 1977" or "1977-07-26"; answers as ISO dates.
_SPELLED_DATE = re.compile(r"\b(\d{1,2}) (" + "|".join(MONTHS) + r") (\d{4})\b")
_ISO_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
_NUMBER = re.compile(r"(?<![\w.-])-?\d+(?:\.\d+)?(?![\w-])")
# Every string value of the extract training split is one word of its record or an ISO date
# (33,642 words, 1,031 dates, nothing else), so spans are single words.
MAX_SPAN_WORDS = 1
_WORD = re.compile(r"[A-Za-z][\w'-]*")
_RESULT = re.compile(r"^\d+\. .* = (.+)$", re.MULTILINE)


def router_constraint() -> dict[str, Any]:
    """One of the intents."""
    return {"choice": INTENTS}


def extract_constraint(user: str) -> dict[str, Any]:
    """A JSON schema: the prompt's properties, all required in order, strings from the record."""
    head, _, record = user.partition("\nRecord: ")
    schema = json.loads(head.removeprefix("Schema: "))
    values = {
        "string": [*record_spans(record), *record_dates(record)],
        "integer": [n for n in record_numbers(record) if isinstance(n, int)],
        "number": record_numbers(record),
    }
    properties = {
        name: {"enum": values[spec["type"]]} if values.get(spec.get("type")) else spec
        for name, spec in schema.get("properties", {}).items()
    }
    out = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    return {"json_schema": json.dumps(out)}


def record_dates(record: str) -> list[str]:
    """The record's dates as ISO strings, spelled-out ones converted."""
    dates = dict.fromkeys(_ISO_DATE.findall(record))
    for day, month, year in _SPELLED_DATE.findall(record):
        dates[f"{year}-{MONTHS.index(month) + 1:02d}-{int(day):02d}"] = None
    return list(dates)


def record_numbers(record: str) -> list[int | float]:
    """The record's numbers (not parts of dates or words), as JSON would read them."""
    without_dates = _ISO_DATE.sub(" ", record)
    found = (json.loads(m) for m in _NUMBER.findall(without_dates))
    return list(dict.fromkeys(found))


def record_spans(record: str) -> list[str]:
    """Runs of 1 to MAX_SPAN_WORDS words (not numbers) in one sentence of the record, no repeats."""
    spans: dict[str, None] = {}
    for sentence in re.split(r"(?<=[.!?])\s+", record):
        words = _WORD.findall(sentence.rstrip("."))
        for i in range(len(words)):
            for j in range(i + 1, min(i + MAX_SPAN_WORDS, len(words)) + 1):
                spans[" ".join(words[i:j])] = None
    return list(spans)


def planner_constraint(question: str) -> dict[str, Any]:
    """The plan grammar over the planner's tools, entities limited to the question's names."""
    return {"grammar": plan_grammar(PLANNER_TOOLS, names=question_names(question))}


def joiner_constraint(user: str) -> dict[str, Any]:
    """A choice of the question's names and the values shown after `=` in the results (only the
    names for a "which" question among several: `planner.plan_format.answer_choices`, as the
    served plan step constrains its joiner)."""
    question = user.split("\n", 1)[0].removeprefix("Question: ")
    values = [v.strip() for v in _RESULT.findall(user)]
    return {"choice": answer_choices(question, values)}


def task_constraint(task: str, user: str) -> dict[str, Any]:
    """The constraint fields for one example of `task`, from its user message."""
    if task == "router":
        return router_constraint()
    if task == "extract":
        return extract_constraint(user)
    if task == "planner":
        return planner_constraint(user)
    if task == "joiner":
        return joiner_constraint(user)
    raise ValueError(f"unknown task {task!r}")
