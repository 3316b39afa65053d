"""One error tree for the planner; the server maps these to HTTP in one place.

Every error about a spec carries the JSON pointer of the offending field (`/steps/answer/generate/
model`) and, when the spec text is at hand, the 1-based line and column of that field.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable


class PlannerError(Exception):
    """Base class of every error the planner raises on purpose."""


class SpecError(PlannerError):
    """One problem with a spec, at a JSON pointer (`/` is the whole document)."""

    def __init__(
        self,
        path: str,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.path = path or "/"
        self.message = message
        self.line = line
        self.column = column
        # args stay the constructor's positional arguments so copies and pickles rebuild the error
        super().__init__(self.path, message)

    def __str__(self) -> str:
        where = ""
        if self.line is not None:
            where = f" (line {self.line}, column {self.column})"
        return f"{self.path}: {self.message}{where}"

    def located(self, line: int | None, column: int | None) -> SpecError:
        """The same error at a position in the spec text (kept when the position is unknown)."""
        if line is None:
            return self
        clone = copy.copy(self)
        clone.line, clone.column = line, column
        return clone


class PlanError(SpecError):
    """A bind-time problem: an unknown step, model, tool or pipeline, a cycle, a type mismatch."""

    def __init__(
        self,
        path: str,
        message: str,
        *,
        step: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.step = step
        super().__init__(path, message, line=line, column=column)


class SpecErrors(PlannerError):
    """Every problem found in one spec, sorted by path: users fix them all in one round."""

    def __init__(self, errors: Iterable[SpecError], *, source: str = "<spec>") -> None:
        self.errors = sorted(errors, key=lambda e: (e.path, e.line or 0, e.message))
        self.source = source
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class InvariantError(PlannerError):
    """A rewrite rule produced a plan that breaks an invariant; names the rule (a planner bug)."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        self.message = message
        super().__init__(rule, message)

    def __str__(self) -> str:
        return f"rule {self.rule} broke an invariant: {self.message}"


class ExpressionError(PlannerError):
    """A template or expression failed at run time; the message is safe to show users."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.message = message
        self.source = source
        super().__init__(message)
