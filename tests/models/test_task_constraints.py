"""The demo tasks' decoding constraints never exclude the right answer: every held-out gold
answer is a sentence of its example's constraint, built from the prompt alone."""

import json
from pathlib import Path

import pytest

from engine.constraints import ConstraintCompiler
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from models import tasks
from models.task_constraints import record_dates, record_numbers, task_constraint
from tools.kb import generate_world

MODEL = Path(__file__).resolve().parents[2] / "models" / "demo-base"


@pytest.fixture(scope="module")
def compiler():
    tok = Tokenizer.from_dir(MODEL)
    return ConstraintCompiler(tok, tok.vocab_size, tok.eos_token_ids), tok


@pytest.mark.parametrize("task", tasks.TASKS)
def test_gold_answers_satisfy_the_constraint(compiler, task):
    comp, tok = compiler
    for ex in tasks.generate(task, "heldout", 100, generate_world(0)):
        constraint = comp.compile(SamplingParams(**task_constraint(task, ex.user)))
        ids = tok.encode(_as_llguidance_writes(task, ex.answer), add_special_tokens=False)
        assert all(constraint.advance(t) for t in ids), (ex.user, ex.answer)
        assert constraint.accepting(), (ex.user, ex.answer)


def _as_llguidance_writes(task: str, answer: str) -> str:
    """JSON enums print integral numbers without `.0` (1.0 -> 1): equal values, other text."""
    if task != "extract":
        return answer
    value = json.loads(
        answer, parse_float=lambda s: int(float(s)) if float(s).is_integer() else float(s)
    )
    return json.dumps(value, ensure_ascii=False)


def test_a_wrong_name_is_refused(compiler):
    comp, tok = compiler
    user = 'Schema: {"type":"object","properties":{"name":{"type":"string"}}}\nRecord: Ukel is old.'
    constraint = comp.compile(SamplingParams(**task_constraint("extract", user)))
    ids = tok.encode('{"name": "Zarnoth"}', add_special_tokens=False)
    assert not all(constraint.advance(t) for t in ids)


def test_record_values_are_read_like_the_answers():
    record = "Ukel was born on 3 March 1950. Ukel is 1.8 km2 wide, 2000 m high; 1999-12-31."
    assert record_dates(record) == ["1999-12-31", "1950-03-03"]
    assert record_numbers(record) == [3, 1950, 1.8, 2000]
