"""The plan grammar for constrained decoding accepts exactly plans: every held-out gold plan of
the demo zoo (with the names found in its question), and none with a wrong number, a forward
reference, an unknown tool or an entity the question does not name."""

from pathlib import Path

import pytest

from engine.constraints import ConstraintCompiler
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from models import tasks
from planner.plan_format import parse_plan, plan_grammar, question_names
from tools.kb import generate_world

TOKENIZER = Path(__file__).resolve().parents[2] / "models" / "demo-base"
TOOLS = ("kb.lookup", "kb.search", "calc")


@pytest.fixture(scope="module")
def compiler():
    tok = Tokenizer.from_dir(TOKENIZER)
    return ConstraintCompiler(tok, tok.vocab_size, tok.eos_token_ids), tok


def accepts(compiler, grammar: str, text: str) -> bool:
    comp, tok = compiler
    constraint = comp.compile(SamplingParams(grammar=grammar))
    ids = tok.encode(text, add_special_tokens=False)
    return all(constraint.advance(t) for t in ids) and constraint.accepting()


def test_every_heldout_gold_plan_is_accepted(compiler):
    examples = tasks.generate("planner", "heldout", 200, generate_world(0))
    for ex in examples:
        parse_plan(ex.answer)  # the gold plan is valid
        grammar = plan_grammar(TOOLS, names=question_names(ex.user))
        assert accepts(compiler, grammar, ex.answer), (ex.user, ex.answer)


@pytest.mark.parametrize(
    "plan",
    [
        '1. kb.lookup(entity="Ukel", field="height")\n3. join()',  # wrong number
        '1. kb.lookup(entity=$1, field="height")\n2. join()',  # reference to itself
        '1. kb.lookup(entity="Velmora", field="height")\n2. join()',  # not in the question
        '1. web.get(url="x")\n2. join()',  # unknown tool
        '1. kb.lookup(entity="Ukel", field="height")',  # no join()
    ],
)
def test_invalid_plans_are_rejected(compiler, plan):
    grammar = plan_grammar(TOOLS, names=question_names("How tall is Ukel, and is Zarnoth older?"))
    assert not accepts(compiler, grammar, plan)


def test_without_names_any_entity_string_is_accepted(compiler):
    plan = '1. kb.lookup(entity="Velmora", field="height")\n2. calc(expression="$1 * 2")\n3. join()'
    assert accepts(compiler, plan_grammar(TOOLS), plan)


def test_question_names_skip_question_words_and_possessives():
    q = "Suppose the height of Eisnusk shrank by 45% and Favi's grew. Which would be larger?"
    assert question_names(q) == ("Eisnusk", "Favi")


def test_a_plan_needs_tools():
    with pytest.raises(ValueError, match="at least one tool"):
        plan_grammar(())


def test_a_grammar_from_a_later_line_continues_a_written_plan(compiler):
    grammar = plan_grammar(TOOLS, first=3, max_steps=4)
    assert accepts(compiler, grammar, '3. calc(expression="$1 + $2")\n4. join()')
    assert not accepts(compiler, grammar, '1. calc(expression="1")\n2. join()')  # restarts
    assert accepts(compiler, grammar, '3. kb.lookup(entity=$2, field="area")\n4. join()')
    assert not accepts(compiler, grammar, '3. kb.lookup(entity=$3, field="area")\n4. join()')
    four = '3. calc(expression="1")\n4. calc(expression="2")\n'
    assert accepts(compiler, grammar, four + "5. join()")
    assert not accepts(compiler, grammar, four + '5. calc(expression="3")\n6. join()')  # > 4
    with pytest.raises(ValueError, match="first line"):
        plan_grammar(TOOLS, first=6, max_steps=4)
