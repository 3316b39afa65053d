"""`schemas/pipeline.schema.json` is generated from `planner/spec.py`: it must be current."""

from __future__ import annotations

import json

import jsonschema
import yaml

from planner import load_spec
from schemas.generate import SCHEMA_PATH, main, render
from tests.planner.support import TRIAGE


def test_committed_schema_is_fresh() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(), (
        "schemas/pipeline.schema.json is stale: run `python -m schemas.generate`"
    )
    assert main(["--check"]) == 0


def test_schema_is_valid_and_accepts_a_spec_the_loader_accepts() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    load_spec(TRIAGE)
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(TRIAGE))


def test_schema_rejects_a_step_with_two_kinds() -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    document = yaml.safe_load(TRIAGE)
    document["steps"]["facts"]["generate"] = {"model": "small", "prompt": "x"}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(document))
    assert errors
