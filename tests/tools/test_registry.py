"""The registry: schemas from type hints, argument validation, calls, time limits, results."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from typing import Annotated, Any, Literal

import jsonschema
import msgspec
import pytest

from tools.errors import (
    ToolArgumentError,
    ToolError,
    ToolNotFound,
    ToolRegistrationError,
    ToolTimeout,
)
from tools.registry import ToolRegistry, parse_docstring


class Point(msgspec.Struct):
    """A point in the plane."""

    x: float
    y: float


def everything(
    *,
    text: str,
    count: int,
    ratio: float,
    flag: bool,
    tags: list[str],
    weights: dict[str, float],
    mode: Literal["fast", "slow"] = "fast",
    limit: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3,
    note: str | None = None,
    point: Point | None = None,
) -> dict[str, Any]:
    """Take one argument of every supported kind.

    Args:
        text: some text.
        count: how many.
        ratio: a fraction,
            explained over two lines.
        flag: on or off.
        tags: labels.
        weights: label -> weight.
        mode: how to run.
        limit: at most this many.
        note: optional remark.
        point: optional location.
    """
    return {"text": text, "point": point, "when": datetime.date(2024, 1, 2), "tags": tuple(tags)}


REQUIRED = {"text": "a", "count": 1, "ratio": 0.5, "flag": True, "tags": [], "weights": {}}


@pytest.fixture
def registry() -> ToolRegistry:
    registry = ToolRegistry()
    registry.register("test.everything", everything)
    return registry


def test_schema_from_type_hints(registry: ToolRegistry) -> None:
    schema = registry.schemas()["test.everything"]
    props = schema["properties"]
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["text", "count", "ratio", "flag", "tags", "weights"]
    assert props["text"]["type"] == "string"
    assert props["count"]["type"] == "integer"
    assert props["ratio"]["type"] == "number"
    assert props["flag"]["type"] == "boolean"
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "description": "labels."}
    assert props["weights"]["additionalProperties"] == {"type": "number"}
    assert props["mode"]["enum"] == ["fast", "slow"]
    assert props["mode"]["default"] == "fast"
    assert (props["limit"]["minimum"], props["limit"]["maximum"]) == (1, 10)
    assert {"type": "null"} in props["note"]["anyOf"]
    assert props["point"]["anyOf"][0] == {"$ref": "#/$defs/Point"}
    assert schema["$defs"]["Point"]["required"] == ["x", "y"]
    assert props["ratio"]["description"] == "a fraction, explained over two lines."
    jsonschema.Draft202012Validator.check_schema(schema)


def test_description_and_returns(registry: ToolRegistry) -> None:
    tool = registry.get("test.everything")
    assert tool.description == "Take one argument of every supported kind."
    assert tool.returns == {"type": "object"}
    assert tool.spec()["name"] == "test.everything"
    assert registry.specs() == [tool.spec()]


def test_explicit_description_wins() -> None:
    registry = ToolRegistry()

    def echo(a: str) -> str:
        """Docstring."""
        return a

    assert (
        registry.register("t.echo", echo, description="Echo a text.").description == "Echo a text."
    )


def test_parse_docstring_sections() -> None:
    summary, params = parse_docstring(
        """Do a thing.

        More about it.

        Args:
            a (int): first.
            b: second,
                continued.

        Returns:
            c: not a parameter.
        """
    )
    assert summary == "Do a thing. More about it."
    assert params == {"a": "first.", "b": "second, continued."}


@pytest.mark.parametrize(
    ("args", "path", "message"),
    [
        ({**REQUIRED, "count": "3"}, "/count", "expected integer, got string"),
        ({**REQUIRED, "count": True}, "/count", "expected integer, got boolean"),
        ({**REQUIRED, "count": 1.5}, "/count", "expected integer, got number"),
        ({**REQUIRED, "tags": ["a", 2]}, "/tags/1", "expected string, got integer"),
        ({**REQUIRED, "weights": {"a": "x"}}, "/weights/a", "expected number, got string"),
        ({**REQUIRED, "mode": "medium"}, "/mode", "is not one of"),
        ({**REQUIRED, "limit": 11}, "/limit", "maximum"),
        ({**REQUIRED, "note": 5}, "/note", "expected string or null, got integer"),
        ({**REQUIRED, "point": {"x": 1}}, "/point", "expected"),
        ({**REQUIRED, "extra": 1}, "/extra", "unknown argument"),
        (
            {k: v for k, v in REQUIRED.items() if k != "ratio"},
            "/ratio",
            "missing required argument",
        ),
        ({**REQUIRED, "count": 3.0}, "/count", "Expected `int`, got `float`"),
    ],
)
async def test_argument_errors_name_the_argument(
    registry: ToolRegistry, args: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(ToolArgumentError) as caught:
        await registry.call("test.everything", args)
    assert caught.value.path == path
    assert message in caught.value.message
    assert caught.value.tool == "test.everything"
    assert str(caught.value).startswith(f"{path}: ")


async def test_arguments_must_be_an_object(registry: ToolRegistry) -> None:
    with pytest.raises(ToolArgumentError, match="must be a JSON object"):
        await registry.call("test.everything", ["a"])  # type: ignore[arg-type]


async def test_first_argument_problem_is_reported(registry: ToolRegistry) -> None:
    with pytest.raises(ToolArgumentError) as caught:
        await registry.call("test.everything", {"text": 1})
    assert caught.value.path == "/count"  # missing, sorts before /text's type error


async def test_result_is_plain_json(registry: ToolRegistry) -> None:
    result = await registry.call(
        "test.everything", {**REQUIRED, "tags": ["a"], "point": {"x": 1, "y": 2}}
    )
    assert result == {
        "text": "a",
        "point": {"x": 1.0, "y": 2.0},
        "when": "2024-01-02",
        "tags": ["a"],
    }


async def test_defaults_are_passed() -> None:
    registry = ToolRegistry()
    seen: dict[str, Any] = {}

    @registry.register("t.defaults")
    def defaults(a: int, b: int = 2, c: list[int] | None = None) -> int:
        """Sum."""
        seen.update(a=a, b=b, c=c)
        return a + b

    assert defaults(1) == 3  # the decorator returns the function itself
    assert await registry.call("t.defaults", {"a": 5}) == 7
    assert seen == {"a": 5, "b": 2, "c": None}


async def test_unknown_tool(registry: ToolRegistry) -> None:
    with pytest.raises(ToolNotFound) as caught:
        await registry.call("no.such", {})
    assert caught.value.name == "no.such"
    assert "test.everything" in str(caught.value)
    with pytest.raises(ToolNotFound):
        registry.get("nope")


async def test_sync_tools_run_in_a_worker_thread() -> None:
    registry = ToolRegistry()

    def where() -> bool:
        """Whether this runs on the main thread."""
        return threading.current_thread() is threading.main_thread()

    registry.register("t.where", where)
    assert not registry.get("t.where").is_async
    assert await registry.call("t.where", {}) is False


async def test_async_tools_run_on_the_loop() -> None:
    registry = ToolRegistry()

    async def double(x: float) -> float:
        """Twice x."""
        await asyncio.sleep(0)
        return 2 * x

    class Halver:
        async def __call__(self, x: float) -> float:
            return x / 2

    registry.register("t.double", double)
    assert registry.get("t.double").is_async
    assert await registry.call("t.double", {"x": 2}) == 4.0
    registry.register("t.half", Halver())
    assert registry.get("t.half").is_async
    assert registry.get("t.half").parameters["required"] == ["x"]
    assert await registry.call("t.half", {"x": 3}) == 1.5


async def test_calls_run_concurrently() -> None:
    registry = ToolRegistry()

    def nap(seconds: float) -> float:
        """Sleep."""
        time.sleep(seconds)
        return seconds

    registry.register("t.nap", nap)
    started = time.perf_counter()
    await asyncio.gather(*(registry.call("t.nap", {"seconds": 0.2}) for _ in range(4)))
    assert time.perf_counter() - started < 0.6


async def test_timeouts() -> None:
    registry = ToolRegistry(default_timeout_s=5)

    async def slow(seconds: float) -> str:
        """Sleep asynchronously."""
        await asyncio.sleep(seconds)
        return "done"

    def slow_sync(seconds: float) -> str:
        """Sleep in a thread."""
        time.sleep(seconds)
        return "done"

    registry.register("t.slow", slow, timeout_s=0.05)
    registry.register("t.slow_sync", slow_sync)
    with pytest.raises(ToolTimeout) as caught:
        await registry.call("t.slow", {"seconds": 1})
    assert caught.value.timeout_s == 0.05
    assert "timed out after 0.05 s" in str(caught.value)
    assert await registry.call("t.slow", {"seconds": 0}, timeout_s=1) == "done"
    with pytest.raises(ToolTimeout):
        await registry.call("t.slow_sync", {"seconds": 0.3}, timeout_s=0.05)


async def test_a_tools_own_timeout_error_is_not_a_time_limit() -> None:
    registry = ToolRegistry()

    def fails() -> None:
        """Raise the builtin TimeoutError."""
        raise TimeoutError("upstream")

    registry.register("t.fails", fails)
    with pytest.raises(ToolError) as caught:
        await registry.call("t.fails", {})
    assert not isinstance(caught.value, ToolTimeout)
    assert "TimeoutError: upstream" in str(caught.value)


async def test_failures_are_wrapped() -> None:
    registry = ToolRegistry()

    def broken(x: int) -> int:
        """Divide by zero."""
        return x // 0

    def refuses() -> None:
        """Raise a ToolError without a tool name."""
        raise ToolError("nope")

    registry.register("t.broken", broken)
    registry.register("t.refuses", refuses)
    with pytest.raises(ToolError, match=r"tool 't\.broken' failed: ZeroDivisionError") as caught:
        await registry.call("t.broken", {"x": 1})
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    with pytest.raises(ToolError) as refused:
        await registry.call("t.refuses", {})
    assert (refused.value.message, refused.value.tool) == ("nope", "t.refuses")


async def test_results_must_be_json() -> None:
    registry = ToolRegistry()

    def opaque() -> Any:
        """Return an object JSON cannot hold."""
        return {"lock": threading.Lock()}

    registry.register("t.opaque", opaque)
    with pytest.raises(ToolError, match="not JSON-serialisable"):
        await registry.call("t.opaque", {})


@pytest.mark.parametrize("name", ["", "kb..search", "1calc", "kb.search!", "a-b", "x" * 65])
def test_invalid_names(name: str) -> None:
    def ok() -> int:
        """One."""
        return 1

    with pytest.raises(ToolRegistrationError, match="invalid tool name"):
        ToolRegistry().register(name, ok)


def test_duplicates_need_replace() -> None:
    registry = ToolRegistry()

    def one() -> int:
        """One."""
        return 1

    registry.register("t.one", one)
    with pytest.raises(ToolRegistrationError, match="already registered"):
        registry.register("t.one", one)
    registry.register("t.one", one, replace=True)
    assert registry.names() == ["t.one"]
    assert "t.one" in registry
    assert len(registry) == 1
    assert [t.name for t in registry] == ["t.one"]


def _untyped(a):  # type: ignore[no-untyped-def]
    return a


def _var_args(*values: int) -> int:
    return sum(values)


def _var_kwargs(**options: int) -> int:
    return len(options)


def _positional_only(a: int, /) -> int:
    return a


def _bad_type(a: threading.Lock) -> int:
    return 1


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_untyped, "has no type hint"),
        (_var_args, "*args"),
        (_var_kwargs, "**kwargs"),
        (_positional_only, "positional-only"),
        (_bad_type, "no JSON schema"),
    ],
)
def test_unsupported_signatures(fn: Any, message: str) -> None:
    with pytest.raises(ToolRegistrationError) as caught:
        ToolRegistry().register("t.bad", fn)
    assert message in str(caught.value)
