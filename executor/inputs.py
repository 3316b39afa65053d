"""Run inputs checked against the spec's input schemas, defaults applied, before a run starts."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jsonschema

from executor.errors import InputError
from executor.operators import json_pointer


def validate_inputs(schemas: Mapping[str, dict[str, Any]], inputs: Any) -> dict[str, Any]:
    """The inputs of a run: every declared input present (or defaulted) and valid.

    Raises `InputError` with a JSON pointer into the inputs (`/ticket`, `/items/2/id`) for a
    missing, unknown or invalid input.
    """
    if not isinstance(inputs, Mapping):
        raise InputError("", f"inputs must be an object, got {type(inputs).__name__}")
    unknown = sorted(set(inputs) - set(schemas))
    if unknown:
        declared = ", ".join(sorted(schemas)) or "none"
        raise InputError(json_pointer([unknown[0]]), f"unknown input (declared: {declared})")
    values: dict[str, Any] = {}
    for name, schema in schemas.items():
        if name in inputs:
            _check(name, schema, inputs[name])
            values[name] = inputs[name]
        elif "default" in schema:
            values[name] = copy.deepcopy(schema["default"])
        else:
            raise InputError(json_pointer([name]), "missing required input")
    return values


def _check(name: str, schema: dict[str, Any], value: Any) -> None:
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return
    path = [name, *error.absolute_path]
    if error.validator == "required" and isinstance(error.instance, Mapping):
        # Point at the missing property itself, not at the object that lacks it.
        path.append(next(r for r in error.validator_value if r not in error.instance))
    raise InputError(json_pointer(path), error.message[:300])
