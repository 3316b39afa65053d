"""One error tree for the executor; the server maps these to HTTP in one place.

Step failures never escape `execute`: they end up in the `RunResult` and the events. What
escapes is `InputError` (raised before the run starts) and cancellation by the caller.
"""

from __future__ import annotations


class ExecutorError(Exception):
    """Base class of every error the executor raises on purpose."""


class StepFailed(ExecutorError):
    """A step failed for good (attempts and fallbacks spent); raised `from` the cause."""

    def __init__(self, step: str, message: str | None = None) -> None:
        super().__init__(message or f"step {step!r} failed")
        self.step = step


class RunTimeout(ExecutorError):
    """The whole run exceeded its time limit."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"run timed out after {timeout_s:g}s")
        self.timeout_s = timeout_s


class StepTimeout(ExecutorError):
    """One attempt of a step exceeded the step's `timeout`."""

    def __init__(self, step: str, timeout_s: float) -> None:
        super().__init__(f"step {step!r} timed out after {timeout_s:g}s")
        self.step = step
        self.timeout_s = timeout_s


class BudgetExceeded(ExecutorError):
    """A run or step used more tokens or seconds than its budget allows."""


class FanOutExceeded(ExecutorError):
    """A `map` produced more items than `max_fan_out` allows."""


class BackendError(ExecutorError):
    """A model backend could not serve a call (unknown target, bad request, provider error)."""


class OutputError(ExecutorError):
    """A step's output violates its `output` constraint or `output_schema`.

    `path` is a JSON pointer into the parsed output ("" for the whole output).
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class PlanFailed(ExecutorError):
    """A `plan` step found no answer in its rounds (plans rejected, tasks failed, or the
    joiner kept asking to replan). Model output, so a retry or a fallback planner may help."""


class OperatorError(ExecutorError):
    """A step's evaluated values have the wrong shape (e.g. `map` over a non-list)."""


class InputError(ExecutorError):
    """Run inputs that do not match the spec's input schemas; `path` is a JSON pointer."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
