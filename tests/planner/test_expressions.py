"""The sandboxed expression language: rendering, references, and refusing escapes and DoS."""

from __future__ import annotations

import pytest
from jinja2.exceptions import SecurityError

from planner import expressions
from planner.errors import ExpressionError, SpecError
from planner.expressions import (
    SANDBOX,
    Access,
    accesses,
    check,
    evaluate,
    output_of,
    passed_through,
    references,
    render,
    render_value,
)

CONTEXT = {
    "inputs": {"ticket": "printer on fire", "n": 3},
    "steps": {
        "facts": {"output": {"hits": ["a", "b", "c"]}, "status": "finished"},
        "intent": {"output": "outage", "status": "finished"},
    },
}


# ---------------------------------------------------------------------------- rendering


def test_render_template() -> None:
    text = render(
        "Ticket: {{ inputs.ticket }} ({{ steps.facts.output.hits | length }} hits)\n", CONTEXT
    )
    assert text == "Ticket: printer on fire (3 hits)\n"  # the trailing newline is kept


def test_evaluate_returns_native_values() -> None:
    assert evaluate("steps.intent.output != 'other'", CONTEXT) is True
    assert evaluate("steps.facts.output.hits", CONTEXT) == ["a", "b", "c"]
    assert evaluate("steps.facts.output.hits | select('ne', 'b')", CONTEXT) == ["a", "c"]
    assert evaluate("range(inputs.n)", CONTEXT) == [0, 1, 2]
    assert evaluate("{'a': 1}.items()", CONTEXT) == [("a", 1)]


def test_render_value_is_native_for_a_single_expression() -> None:
    value = {
        "query": "{{ inputs.ticket }}",
        "hits": "{{ steps.facts.output.hits }}",
        "text": "n={{ inputs.n }}",
        "nested": [{"k": "{{ inputs.n + 1 }}"}, 7, None],
        "spaced": " {{ inputs.n }}",
    }
    assert render_value(value, CONTEXT) == {
        "query": "printer on fire",
        "hits": ["a", "b", "c"],
        "text": "n=3",
        "nested": [{"k": 4}, 7, None],
        "spaced": " 3",
    }


def test_item_and_index_in_scope() -> None:
    assert render("{{ index }}:{{ item.name }}", {"item": {"name": "x"}, "index": 2}) == "2:x"


def test_tojson_is_plain_json() -> None:
    assert render("{{ x | tojson }}", {"x": {"a": "<é>"}}) == '{"a": "<é>"}'
    assert render("{{ x | tojson(indent=1000) }}", {"x": [1]}) == "[\n        1\n]"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ nope }}", "'nope' is undefined"),
        ("{{ steps.missing.output }}", "has no attribute 'missing'"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ 'a' + 1 }}", "TypeError"),
        ("{{ x | int(base=1000) }}", ""),
    ],
)
def test_runtime_errors_are_expression_errors(source: str, message: str) -> None:
    try:
        render(source, {"x": "12", **CONTEXT})
    except ExpressionError as e:
        assert message in e.message
        assert e.source == source
        assert " at 0x" not in e.message  # no object reprs leak
    else:
        assert message == ""  # `int` of an odd base falls back to 0: no error is fine


def test_undefined_result_of_an_expression_raises() -> None:
    with pytest.raises(ExpressionError, match="undefined"):
        evaluate("steps.facts.output.nothing", CONTEXT)


# ---------------------------------------------------------------------------- references


def test_references_and_accesses() -> None:
    source = "{{ steps.a.output.hits }} {{ steps['b'].status }} {% for x in steps.c.output %}{% endfor %}"
    assert references(source) == {"a", "b", "c"}
    assert Access("a", "output", "hits") in accesses(source)
    assert Access("b", "status", None) in accesses(source)
    assert references("steps.a.output | length > steps.b.output", expression=True) == {"a", "b"}
    assert references("{{ inputs.x }}") == set()


@pytest.mark.parametrize(
    ("template", "steps"),
    [
        ("{{ steps.a.output }}", {"a"}),
        ("{{ steps['a'].output }}", {"a"}),
        ("{{ steps.a.output if steps.a.status == 'succeeded' else steps.b.output }}", {"a", "b"}),
        ("{{ steps.a.output if steps.c.output else 'none' }}", {"a"}),
        ("{{ steps.a.output }}!", set()),  # text around it
        ("{{ steps.a.output | upper }}", set()),
        ("{{ steps.a.output.text }}", set()),
        ("{{ steps.a.output if x else steps.a.output | trim }}", set()),  # transformed too
        ("{{ steps.a.output if x else steps.b.output ~ '.' }}", {"a"}),
    ],
)
def test_passed_through_names_outputs_rendered_unchanged(template: str, steps: set[str]) -> None:
    assert passed_through(template) == steps


def test_output_of() -> None:
    assert output_of("steps.facts.output") == "facts"
    assert output_of("steps.facts.output.hits") is None
    assert output_of("inputs.docs") is None


# ---------------------------------------------------------------------------- escapes

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ x['__class__'] }}",
    "{{ x._private }}",
    "{{ '{0.__class__}'.format(x) }}",
    "{{ '{x.__class__}'.format_map({'x': x}) }}",
    "{{ x | attr('__class__') }}",
    "{{ ''.join.__self__ }}",
    "{{ (1).__class__ }}",
    "{{ _x }}",
    "{{ self }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% include 'etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% extends 'base' %}",
    "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    "{% set steps = 1 %}",
    "{{ steps }}",
    "{{ steps[inputs.k] }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_escapes_are_rejected_at_plan_time(source: str) -> None:
    with pytest.raises(SpecError) as info:
        check(source, expression=False, path="/steps/a/generate/prompt")
    assert info.value.path == "/steps/a/generate/prompt"


@pytest.mark.parametrize("source", ESCAPES)
def test_escapes_fail_safely_at_run_time(source: str) -> None:
    with pytest.raises(ExpressionError):
        render(source, {"x": "s", "inputs": {"k": "a"}})


@pytest.mark.parametrize(
    "expression", ["x.__class__", "x.mro", "steps", "x | attr('y')", "(x ~ '')._y", "cycler"]
)
def test_expression_escapes(expression: str) -> None:
    with pytest.raises(ExpressionError):
        evaluate(expression, {"x": "s", "steps": {}})


@pytest.mark.parametrize(
    ("source", "context"),
    [
        (
            "{{ x[k] }}",
            {"x": "s", "k": "__class__"},
        ),  # the key comes from data: plan time cannot see
        ("{{ x[k][j] }}", {"x": {"a": 1}, "k": "items", "j": "__self__"}),
        ("{{ f.fromkeys }}", {"f": dict}),  # attributes of types and callables
        ("{{ f.upper }}", {"f": str.upper}),
        ("{{ items | map(attribute='__class__') | list }}", {"items": [1]}),
        ("{{ items | sort(attribute='__class__.__name__') }}", {"items": [1, 2]}),
    ],
)
def test_data_driven_escapes_are_refused_by_the_sandbox(source: str, context: dict) -> None:
    check(source, expression=False, path="/p")  # nothing suspicious in the text itself
    with pytest.raises(ExpressionError):
        render(source, context)


def test_format_strings_are_sandboxed_without_the_plan_time_check() -> None:
    template = SANDBOX.from_string("{{ fmt.format(x) }}")
    with pytest.raises(SecurityError):
        template.render(fmt="{0.__class__.__mro__}", x="s")
    assert template.render(fmt="{0}!", x="ok") == "ok!"


def test_no_default_globals() -> None:
    for name in ("cycler", "joiner", "namespace", "lipsum"):
        with pytest.raises(ExpressionError, match="undefined"):
            render("{{ " + name + " }}", {})


def test_immutable_builtins() -> None:
    with pytest.raises(ExpressionError):
        render("{{ x.append(1) }}", {"x": []})
    with pytest.raises(ExpressionError):
        render("{{ x.update({'a': 1}) }}", {"x": {}})


# ---------------------------------------------------------------------------- bounds

BIG = "x" * 600_000


@pytest.mark.parametrize(
    "source",
    [
        "{{ range(10**9) | list }}",
        "{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}",
        "{% for a in big %}{% for b in big %}{% endfor %}{% endfor %}",
        "{{ 'a' * 10**9 }}",
        "{{ [1] * 10**9 }}",
        "{{ 2 ** 10000000 }}",
        "{{ '%99999999d' % 1 }}",
        "{{ '%*d' % (100000000, 1) }}",
        "{{ x ~ x }}",
        "{{ x + x }}",
        "{% set a = 'ab' %}" + "{% set a = a ~ a %}" * 40 + "{{ a | length }}",
        "{{ [x, x] | join }}",
        "{{ x | replace('x', 'yy') }}",
        "{{ [x, x] | tojson }}",
        "{% for i in range(3) %}{{ x }}{% endfor %}",
    ],
)
def test_denial_of_service_is_bounded(source: str) -> None:
    context = {"x": BIG, "big": list(range(1000))}
    check(source, expression=False, path="/p")
    with pytest.raises(ExpressionError, match=r"more than|larger than|too large"):
        render(source, context)


def test_budget_is_per_render() -> None:
    source = "{% for i in range(40000) %}{% endfor %}ok"  # 80k of the 100k budget
    assert render(source, {}) == "ok"
    assert render(source, {}) == "ok"  # a fresh budget each time
    assert expressions.MAX_ITERATIONS < 2 * 80_000


def test_check_reports_syntax_and_unknown_filters() -> None:
    with pytest.raises(SpecError, match="syntax error"):
        check("{{ x }", expression=False, path="/p")
    with pytest.raises(SpecError, match="unexpected text"):
        check("a b", expression=True, path="/p")
    with pytest.raises(SpecError, match="No filter named 'pprint'"):
        check("x | pprint", expression=True, path="/p")
    with pytest.raises(SpecError, match="drop the"):
        check("{{ steps.a.output }}", expression=True, path="/p")
    check("steps.a.output | length > 2 and item.x in ['a']", expression=True, path="/p")
