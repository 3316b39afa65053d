"""The plan grammar: parsing, formatting round trips, `$K` substitution, and syntax errors."""

from __future__ import annotations

import pytest

from planner.plan_format import (
    Plan,
    PlanStep,
    PlanSyntaxError,
    Ref,
    format_plan,
    parse_plan,
    substitute,
)

PLAN = """1. kb.lookup(entity="Zarnoth", field="population")
2. kb.lookup(entity="Velmora", field="population")
3. calc(expression="$1 * (1 + 20/100) > $2 * (1 - 10/100)")
4. join()"""


def test_parse_llmcompiler_plan() -> None:
    plan = parse_plan(PLAN)
    assert [s.tool for s in plan.steps] == ["kb.lookup", "kb.lookup", "calc"]
    assert plan.steps[0].args == {"entity": "Zarnoth", "field": "population"}
    assert plan.steps[2].deps == (1, 2)
    assert format_plan(plan) == PLAN


def test_bare_reference_and_literals() -> None:
    plan = parse_plan(
        '1. kb.lookup(entity="Acme", field="ceo")\n'
        '2. kb.lookup(entity=$1, field="height")\n'
        "3. f(a=1, b=-2.5, c=true, d=null, e=1e3)\n"
        "4. join()"
    )
    assert plan.steps[1].args["entity"] == Ref(1)
    assert plan.steps[1].deps == (1,)
    assert plan.steps[2].args == {"a": 1, "b": -2.5, "c": True, "d": None, "e": 1000.0}
    assert parse_plan(format_plan(plan)) == plan


def test_substitute_whole_and_inside_strings() -> None:
    results = {1: "Bern", 2: 1500, 3: True}
    args = {"entity": Ref(1), "expression": "$2 * 2 > 10", "flag": "$3"}
    assert substitute(args, results) == {
        "entity": "Bern",
        "expression": "1500 * 2 > 10",
        "flag": "true",
    }


def test_strings_with_escapes_and_commas() -> None:
    plan = parse_plan('1. kb.search(query="a, \\"b\\" (c)")\n2. join()')
    assert plan.steps[0].args == {"query": 'a, "b" (c)'}


def test_join_only() -> None:
    assert parse_plan("1. join()") == Plan(())


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('1. calc(expression="1")', 1, "last line must be join()"),
        ('2. calc(expression="1")\n3. join()', 1, "expected line number 1"),
        ('1. calc(expression="$2")\n2. join()', 1, "$2 does not refer to an earlier line"),
        ('1. calc(expression="$1")\n2. join()', 1, "$1 does not refer to an earlier line"),
        ("1. join()\n2. join()", 1, "join() must be the last line only"),
        ("1. calc(1)\n2. join()", 1, "expected `name=`"),
        ('1. calc(x="1" y=2)\n2. join()', 1, "expected `,`"),
        ('1. calc(x="1", x=2)\n2. join()', 1, "given twice"),
        ("1. calc(x=oops)\n2. join()", 1, "expected a value"),
        ('1. calc(x="open)\n2. join()', 1, "invalid string"),
        ("hello\n2. join()", 1, "expected `1. tool(arg=value, ...)`"),
        ("1. join(x=1)", 1, "last line must be join()"),
        # model output must fail as a syntax error, never as Python's int/float limits
        (f"1. calc(x={'9' * 5000})\n2. join()", 1, "expected a value"),
        ("1. calc(x=1e999)\n2. join()", 1, "out of range"),
        (f"{'1' * 5000}. calc(x=1)\n2. join()", 1, "expected `1. tool"),
        (f"1. calc(x=1)\n2. calc(x=${'1' * 5000})\n3. join()", 2, "expected a line number"),
    ],
)
def test_syntax_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(PlanSyntaxError) as info:
        parse_plan(text)
    assert info.value.line in (line, len(text.split("\n")))
    assert fragment in str(info.value)


def test_format_is_inverse_of_parse_for_built_plans() -> None:
    plan = Plan((PlanStep(1, "kb.lookup", {"entity": "Ukel", "field": "height"}),))
    assert parse_plan(format_plan(plan)).steps[0].args == plan.steps[0].args


def test_docstring_examples() -> None:
    import doctest

    import planner.plan_format

    result = doctest.testmod(planner.plan_format)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(
    ("question", "values", "want"),
    [
        (  # a comparison among two names: true/false and the numbers are no answer
            "If Ukel's height grew 20% and Orn's shrank 10%, which would be larger?",
            ["12", "9", "true"],
            ("Ukel", "Orn"),
        ),
        ("In which year was Ukel founded?", ["1184"], ("Ukel", "1184")),  # one name: a value
        ("What is the sum of the heights of Ukel and Orn?", ["12", "9", "21"],
         ("Ukel", "Orn", "12", "9", "21")),
        ("Who is taller, Ukel or Orn, and by how much?", ["12", "9", "3"],  # a number answers
         ("Ukel", "Orn", "12", "9", "3")),
        ("Is Ukel taller than Orn?", ["12", "9", "true"], ("Ukel", "Orn", "12", "9", "true")),
    ],
)  # fmt: skip
def test_answer_choices(question: str, values: list[str], want: tuple[str, ...]) -> None:
    from planner.plan_format import answer_choices

    assert answer_choices(question, values) == want
