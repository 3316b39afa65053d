"""Every rule's docstring holds a runnable before -> after example; run them all."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import planner.rules

MODULES = [
    importlib.import_module(f"planner.rules.{info.name}")
    for info in pkgutil.iter_modules(planner.rules.__path__)
]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_rule_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, report=True)
    assert result.attempted > 0, f"{module.__name__} has no example"
    assert result.failed == 0


def test_every_rule_module_is_listed() -> None:
    assert {m.__name__.rsplit(".", 1)[1] for m in MODULES} == {
        r.__name__ for r in planner.rules.RULES
    }
