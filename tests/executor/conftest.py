"""Small real tools and a scripted model backend for executor tests, and plan builders.

Tools sleep, fail a given number of times, or echo; they record how many calls were in flight
at once and in which order they started, which is what scheduling tests assert on.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from executor.backends import Backends, ModelCall, ModelResult
from executor.errors import BackendError
from executor.events import Event
from planner import Catalog, PhysicalPlan, compile_spec
from planner.spec import PipelineSpec
from tools.registry import ToolRegistry


@dataclass
class Recorder:
    """What the test tools and model saw: start order, peak concurrency per resource."""

    started: list[str] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    cancelled: list[str] = field(default_factory=list)

    async def hold(self, resource: str, label: str, seconds: float) -> None:
        """Be in flight on `resource` for `seconds`, recording it."""
        self.started.append(label)
        self.calls[label] += 1
        self.in_flight[resource] += 1
        self.in_flight["*"] += 1
        self.peak[resource] = max(self.peak[resource], self.in_flight[resource])
        self.peak["*"] = max(self.peak["*"], self.in_flight["*"])
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.append(label)
            raise
        finally:
            self.in_flight[resource] -= 1
            self.in_flight["*"] -= 1


def make_tools(recorder: Recorder) -> ToolRegistry:
    """A registry of test tools bound to `recorder`."""
    registry = ToolRegistry(default_timeout_s=None)

    async def sleep(ms: float, label: str = "", value: Any = None) -> Any:
        """Sleep `ms` milliseconds, then return `value`."""
        await recorder.hold("tool:sleep", label, ms / 1000)
        return value

    async def other_sleep(ms: float, label: str = "", value: Any = None) -> Any:
        """The same as `sleep`, on another resource."""
        await recorder.hold("tool:other_sleep", label, ms / 1000)
        return value

    async def flaky(key: str, failures: int, value: Any = None, ms: float = 0) -> Any:
        """Fail the first `failures` calls for `key`, then return `value`."""
        await recorder.hold("tool:flaky", key, ms / 1000)
        if recorder.calls[key] <= failures:
            raise RuntimeError(f"{key} failure {recorder.calls[key]}")
        return value

    def echo(value: Any) -> Any:
        """Return `value` (a sync tool: runs in a thread)."""
        recorder.calls["echo"] += 1
        return value

    for name, fn in [
        ("sleep", sleep),
        ("other_sleep", other_sleep),
        ("flaky", flaky),
        ("echo", echo),
    ]:
        registry.register(name, fn)
    return registry


class ScriptedModel:
    """A model backend answering from a function of the call, streamed word by word.

    Tokens are counted as words (prompt and completion). `delay_s` makes each call take time.
    """

    def __init__(
        self,
        targets: set[str],
        answer: Callable[[ModelCall], str],
        *,
        recorder: Recorder,
        delay_s: float = 0.0,
    ) -> None:
        self.targets = targets
        self.answer = answer
        self.recorder = recorder
        self.delay_s = delay_s
        self.calls: list[ModelCall] = []

    def serves(self, target: str) -> bool:
        """The configured targets."""
        return target in self.targets

    async def generate(self, call: ModelCall, on_delta: Any = None) -> ModelResult:
        """Answer after `delay_s`; an answer starting with "!" raises it as a BackendError."""
        self.calls.append(call)
        prompt = call.prompt or " ".join(m["content"] for m in call.messages or [])
        await self.recorder.hold(f"model:{call.target}", prompt, self.delay_s)
        text = self.answer(call)
        if text.startswith("!"):
            raise BackendError(text[1:])
        for word in text.split(" "):
            if on_delta is not None:
                on_delta(word)
        return ModelResult(
            text=text,
            prompt_tokens=len(prompt.split()),
            completion_tokens=len(text.split()),
            finish_reason="stop",
        )


def echo_prompt(call: ModelCall) -> str:
    """The default answer: the rendered prompt back."""
    return call.prompt or ""


@pytest.fixture
def recorder() -> Recorder:
    """A fresh recorder per test."""
    return Recorder()


@pytest.fixture
def tools(recorder: Recorder) -> ToolRegistry:
    """The test tools."""
    return make_tools(recorder)


def compile_dict(spec: dict[str, Any], *, tools: ToolRegistry, models: set[str]) -> PhysicalPlan:
    """Compile a spec written as a dict with the real planner."""
    catalog = Catalog(models=models, tools=tools.schemas(), pipelines={"child"})
    return compile_spec(msgspec.convert(spec, PipelineSpec), catalog=catalog)


def backends_of(*backends: Any) -> Backends:
    """Backends over the given test models."""
    return Backends(list(backends))


class Events(list[Event]):
    """An event sink that keeps events and can list their types."""

    def types(self, step: str | None = None) -> list[str]:
        """Event type tags in order, optionally for one step only."""
        return [type(e).__name__ for e in self if step is None or getattr(e, "step", None) == step]


def elapsed(start: float) -> float:
    """Seconds since `start` (perf counter)."""
    return time.perf_counter() - start
