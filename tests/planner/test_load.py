"""Loading specs: every error carries a JSON pointer and the line/column of the field."""

from __future__ import annotations

import json

import msgspec
import pytest

from planner import SpecError, SpecErrors, load_spec, locate, parse_duration
from planner.load import MAX_SPEC_BYTES
from tests.planner.support import TRIAGE

MINIMAL = """\
name: demo
models: {w: demo-base}
steps:
  a: {generate: {model: w, prompt: "hi"}}
outputs: {a: "{{ steps.a.output }}"}
"""


def errors_of(text: str, **kwargs: object) -> list[SpecError]:
    with pytest.raises(SpecErrors) as info:
        load_spec(text, **kwargs)
    return info.value.errors


def one_error(text: str, **kwargs: object) -> SpecError:
    (error,) = errors_of(text, **kwargs)
    return error


def triage_json() -> str:
    data = msgspec.to_builtins(load_spec(TRIAGE))
    return json.dumps(data, indent=2)


# ---------------------------------------------------------------------------- valid specs


def test_design_sketch_loads() -> None:
    spec = load_spec(TRIAGE, source="triage.yaml")
    assert spec.name == "ticket-triage"
    assert list(spec.steps) == ["intent", "facts", "answer", "fields"]
    assert spec.steps["answer"].generate.model == "writer"
    assert spec.steps["answer"].timeout == "10s"
    assert spec.steps["fields"].kind == "generate"
    assert spec.tools == ["kb.search", "calc"]


def test_json_round_trip_loads_the_same_spec() -> None:
    assert load_spec(triage_json()) == load_spec(TRIAGE)
    assert load_spec(triage_json().encode(), fmt="json") == load_spec(TRIAGE)


def test_bytes_and_byte_order_mark() -> None:
    assert load_spec(b"\xef\xbb\xbf" + MINIMAL.encode()).name == "demo"
    assert load_spec("\ufeff" + MINIMAL).name == "demo"


def test_yaml_1_2_scalars_yes_no_stay_strings() -> None:
    text = MINIMAL.replace('prompt: "hi"}}', 'prompt: "hi"}, output: {enum: [yes, no, on]}}')
    assert load_spec(text).steps["a"].output == {"enum": ["yes", "no", "on"]}
    dated = MINIMAL.replace("name: demo", "name: demo\nversion: 2024-01-01")
    assert load_spec(dated).version == "2024-01-01"


# ---------------------------------------------------------------------------- structure


def test_wrong_type_in_yaml_has_pointer_line_and_column() -> None:
    text = MINIMAL.replace('prompt: "hi"', 'prompt: "hi", max_tokens: many')
    error = one_error(text)
    assert error.path == "/steps/a/generate/max_tokens"
    assert (error.line, error.column) == (4, 54)
    assert "Expected `int`, got `str`" in error.message
    assert str(error) == f"{error.path}: {error.message} (line 4, column 54)"


def test_wrong_type_in_json_has_pointer_line_and_column() -> None:
    text = triage_json().replace('"max_tokens": 4', '"max_tokens": "4"')
    error = one_error(text)
    assert error.path == "/steps/intent/generate/max_tokens"
    line = next(i for i, s in enumerate(text.splitlines(), 1) if '"max_tokens": "4"' in s)
    column = text.splitlines()[line - 1].index('"4"') + 1
    assert (error.line, error.column) == (line, column)


def test_unknown_fields_are_rejected_naming_the_path() -> None:
    text = MINIMAL.replace('prompt: "hi"', 'prompt: "hi", temprature: 1').replace(
        "outputs:", "retry: 2\noutputs:"
    )
    errors = errors_of(text)
    assert [e.path for e in errors] == ["/retry", "/steps/a/generate/temprature"]
    assert errors[1].message == "unknown field `temprature` (did you mean `temperature`?)"
    assert (errors[1].line, errors[1].column) == (4, 42)  # at the key
    assert (errors[0].line, errors[0].column) == (5, 1)


def test_unknown_field_in_json_is_located_at_its_key() -> None:
    text = '{"name": "x",\n "steps": {"a": {"tool": "calc", "bogus": 1}},\n "outputs": {"o": "1"}}'
    error = one_error(text)
    assert error.path == "/steps/a/bogus"
    assert (error.line, error.column) == (2, 34)


def test_every_structural_error_is_reported_sorted_by_path() -> None:
    text = """\
name: bad name
steps:
  intent:
    generate: {model: small, max_tokens: "4", temprature: 1}
  "a b": {tool: calc}
  ok: {tool: calc, retries: 11}
limits: {max_fan_out: 0}
"""
    errors = errors_of(text)
    assert [e.path for e in errors] == [
        "/",
        "/limits/max_fan_out",
        "/name",
        "/steps/a b",
        "/steps/intent/generate/max_tokens",
        "/steps/intent/generate/temprature",
        "/steps/ok/retries",
    ]
    assert errors[0].message == "missing required field `outputs`"
    assert errors[3].message.startswith("invalid name `a b`")
    assert all(e.line is not None for e in errors)


def test_list_items_are_pointed_at_by_index() -> None:
    text = MINIMAL.replace(
        'prompt: "hi"', "messages: [{role: user, content: hi}, {role: robot, content: x}]"
    )
    error = one_error(text)
    assert error.path == "/steps/a/generate/messages/1/role"
    assert error.line == 4


def test_spec_must_be_a_mapping() -> None:
    assert one_error("- 1\n- 2\n").message.startswith("a pipeline spec must be a mapping")
    assert one_error("").message == "the spec is empty"


# ---------------------------------------------------------------------------- parsing


def test_yaml_syntax_error_has_line_and_column() -> None:
    error = one_error("name: x\nsteps: [1\n")
    assert error.path == "/"
    assert error.message.startswith("YAML syntax error")
    assert error.line == 3


def test_json_syntax_error_has_line_and_column() -> None:
    error = one_error('{"name": "x",\n  "steps": }')
    assert error.message == "JSON syntax error: Expecting value"
    assert (error.line, error.column) == (2, 12)


def test_yaml_aliases_are_refused() -> None:
    bomb = "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n"
    error = one_error(bomb)
    assert "aliases are not allowed" in error.message
    assert (error.line, error.column) == (2, 8)


def test_duplicate_keys_are_refused() -> None:
    yaml_error = one_error(MINIMAL + "name: again\n")
    assert (yaml_error.path, yaml_error.line) == ("/name", 6)
    json_error = one_error('{"name": "x", "name": "y"}')
    assert (json_error.path, json_error.message) == ("/name", "duplicate key `name`")


def test_size_limit() -> None:
    error = one_error("#" * (MAX_SPEC_BYTES + 1))
    assert error.path == "/"
    assert "larger than" in error.message


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_nesting_limits(fmt: str) -> None:
    deep = "[" * 100 + "]" * 100
    error = one_error(f'{{"name": {deep}}}', fmt=fmt)
    assert "nested" in error.message


def test_not_utf8() -> None:
    assert "not UTF-8" in one_error(b"name: \xff\n").message


# ---------------------------------------------------------------------------- semantics


SEMANTIC_CASES = [
    ("a: {generate: {model: w, prompt: x}, tool: calc}", "/steps/a", "exactly one of"),
    ("a: {retries: 1}", "/steps/a", "(found none)"),
    ("a: {generate: {model: w, prompt: x}, args: {q: 1}}", "/steps/a/args", "only tool steps"),
    ("a: {filter: {items: inputs.x, where: item}, map: inputs.y}", "/steps/a/map", "`map` applies"),
    ("a: {tool: calc, map_limit: 3}", "/steps/a/map_limit", "needs `map`"),
    ("a: {generate: {model: w}}", "/steps/a/generate", "exactly one of `prompt` and `messages`"),
    (
        "a: {generate: {model: w, prompt: x, messages: [{role: user, content: y}]}}",
        "/steps/a/generate",
        "exactly one of `prompt`",
    ),
    (
        "a: {tool: calc, output_schema: {type: object}}",
        "/steps/a/output_schema",
        "generate steps only",
    ),
    (
        "a: {generate: {model: w, prompt: x}, output: {enum: []}}",
        "/steps/a/output/enum",
        "non-empty",
    ),
    ("a: {generate: {model: w, prompt: x}, output: {type: xml}}", "/steps/a/output/type", "`json`"),
    (
        "a: {generate: {model: w, prompt: x}, output_schema: {type: objekt}}",
        "/steps/a/output_schema/type",
        "invalid JSON Schema",
    ),
    (
        "a: {generate: {model: w, prompt: x}, fallback: [{}]}",
        "/steps/a/fallback/0",
        "names a `model`",
    ),
    (
        "a: {tool: calc, fallback: [{tool: calc, model: w}]}",
        "/steps/a/fallback/0/model",
        "cannot fall back",
    ),
    (
        "a: {tool: calc, fallback: [{tool: kb.lookup, max_tokens: 3}]}",
        "/steps/a/fallback/0/max_tokens",
        "model fallbacks",
    ),
    (
        "a: {filter: {items: inputs.x, where: item}, fallback: [{model: w}]}",
        "/steps/a/fallback",
        "only generate, tool and plan",
    ),
    (
        "a: {generate: {model: w, prompt: '{{ x.__class__ }}'}}",
        "/steps/a/generate/prompt",
        "`__class__`",
    ),
    ("a: {generate: {model: w, prompt: '{{ x }'}}", "/steps/a/generate/prompt", "syntax error"),
    (
        "a: {tool: calc, args: {q: ['{{ x | attr(1) }}']}}",
        "/steps/a/args/q/0",
        "No filter named 'attr'",
    ),
    ("a: {tool: calc, when: 'steps[x]'}", "/steps/a/when", "`steps` must be used"),
    (
        "a: {route: {branches: [{when: '1 +', steps: [b]}]}}",
        "/steps/a/route/branches/0/when",
        "syntax error",
    ),
]


@pytest.mark.parametrize(("step", "path", "message"), SEMANTIC_CASES)
def test_semantic_checks(step: str, path: str, message: str) -> None:
    text = f"name: demo\nmodels: {{w: demo-base}}\nsteps:\n  {step}\noutputs: {{o: x}}\n"
    error = one_error(text)
    assert error.path == path
    assert message in error.message
    assert error.line == 4


def test_semantic_errors_all_reported_with_positions() -> None:
    text = """\
name: demo
inputs:
  q: {type: strin}
models: {w: demo-base}
steps:
  a: {generate: {model: w, prompt: "{{ ''.__class__.__mro__ }}"}}
  b: {tool: calc, args: {x: 1}, map_limit: 2}
outputs: {o: "{{ steps.a.output | attr('x') }}"}
chat: {input: messages, output: o}
"""
    errors = errors_of(text)
    located = [(e.path, e.line) for e in errors]
    assert located == [
        ("/chat/input", 9),
        ("/inputs/q/type", 3),
        ("/outputs/o", 8),
        ("/steps/a/generate/prompt", 6),
        ("/steps/b/map_limit", 7),
    ]


def test_locate_adds_positions_to_later_errors() -> None:
    (error,) = locate([SpecError("/steps/answer/generate/model", "unknown")], TRIAGE)
    assert (error.line, error.column) == (19, 14)
    (unchanged,) = locate([SpecError("/x", "m")], "{")  # text that does not parse: no position
    assert unchanged.line is None


def test_errors_pickle_and_copy() -> None:
    import copy
    import pickle

    error = SpecError("/a", "bad", line=1, column=2)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    assert str(copy.copy(error)) == str(error)
    errors = SpecErrors([SpecError("/b", "x"), error])
    assert [e.path for e in pickle.loads(pickle.dumps(errors)).errors] == ["/a", "/b"]


@pytest.mark.parametrize(
    ("value", "seconds"), [("250ms", 0.25), ("10s", 10.0), ("2m", 120.0), (1.5, 1.5)]
)
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds
