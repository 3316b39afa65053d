"""The tool registry: typed Python functions exposed to specs by name, with JSON-schema signatures.

A tool is a plain function (sync or async). Its parameters' type hints become the JSON Schema
that planners and models see (through a msgspec Struct built from the signature), its docstring
the descriptions. `ToolRegistry.call` validates the arguments against that schema before the
function runs, runs sync functions in a worker thread, enforces a time limit, and returns plain
JSON data. Specs only ever name tools; which Python code backs a name is the operator's choice.

    >>> registry = ToolRegistry()
    >>> @registry.register("math.add")
    ... def add(a: int, b: int = 1) -> int:
    ...     '''Add two integers.'''
    ...     return a + b
    >>> registry.schemas()["math.add"]["required"]
    ['a']
    >>> import asyncio
    >>> asyncio.run(registry.call("math.add", {"a": 2}))
    3
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, overload

import jsonschema
import msgspec

from tools.errors import (
    ToolArgumentError,
    ToolError,
    ToolNotFound,
    ToolRegistrationError,
    ToolTimeout,
)

logger = logging.getLogger(__name__)

# The same shape as `ToolName` in planner/spec.py: what a spec may write after `tool:`.
TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
MAX_NAME_LENGTH = 64
DEFAULT_TIMEOUT_S = 30.0
# jsonschema quotes the offending value; a megabyte of it helps nobody.
MAX_MESSAGE_CHARS = 300
_ARGS_STRUCT = "ToolArguments"
_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?):\s*$")
_PARAM_LINE = re.compile(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


@dataclass(frozen=True)
class Tool:
    """A registered tool: its name, description, JSON schemas, and the function behind it."""

    name: str
    description: str
    fn: Callable[..., Any] = field(repr=False)
    parameters: dict[str, Any]
    returns: dict[str, Any]
    # The Struct built from the signature (types the call) and the compiled schema validator.
    arguments_type: type[msgspec.Struct] = field(repr=False, compare=False)
    validator: jsonschema.protocols.Validator = field(repr=False, compare=False)
    timeout_s: float | None = None

    @classmethod
    def from_function(
        cls,
        name: str,
        fn: Callable[..., Any],
        *,
        description: str | None = None,
        timeout_s: float | None = None,
    ) -> Tool:
        """Derive a tool from a function's signature, type hints and docstring."""
        _check_name(name)
        summary, param_docs = parse_docstring(inspect.getdoc(fn))
        arguments_type = _arguments_struct(name, fn, param_docs)
        parameters = _parameters_schema(name, arguments_type)
        return cls(
            name=name,
            description=description if description is not None else summary,
            fn=fn,
            parameters=parameters,
            returns=_returns_schema(name, fn),
            timeout_s=timeout_s,
            arguments_type=arguments_type,
            validator=jsonschema.Draft202012Validator(parameters),
        )

    @property
    def is_async(self) -> bool:
        """Whether calling the function returns a coroutine (then it runs on the event loop)."""
        # An object whose class defines `async def __call__` counts as well.
        return inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(
            type(self.fn).__call__
        )

    def bind(self, args: Any) -> dict[str, Any]:
        """Validate `args` against the schema; return the keyword arguments of the function."""
        if not isinstance(args, dict):
            raise ToolArgumentError("", "arguments must be a JSON object", tool=self.name)
        # Report the problem of the first argument (by pointer), whatever jsonschema found first.
        problems = sorted(describe_schema_error(e) for e in self.validator.iter_errors(args))
        if problems:
            raise ToolArgumentError(*problems[0], tool=self.name)
        try:
            converted = msgspec.convert(args, self.arguments_type)
        except msgspec.ValidationError as e:
            # jsonschema accepts 3.0 as an integer; msgspec, which types the call, does not.
            path, message = _msgspec_location(str(e))
            raise ToolArgumentError(path, message, tool=self.name) from e
        return {f: getattr(converted, f) for f in self.arguments_type.__struct_fields__}

    def spec(self) -> dict[str, Any]:
        """The tool as planners and models see it: name, description, parameter/return schemas."""
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "returns": self.returns,
        }


class ToolRegistry:
    """Tools by name; `call` validates, runs with a time limit, and returns JSON data."""

    def __init__(self, *, default_timeout_s: float | None = DEFAULT_TIMEOUT_S) -> None:
        self._tools: dict[str, Tool] = {}
        self.default_timeout_s = default_timeout_s

    @overload
    def register(
        self,
        name: str,
        fn: None = None,
        *,
        description: str | None = None,
        timeout_s: float | None = None,
        replace: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...

    @overload
    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        description: str | None = None,
        timeout_s: float | None = None,
        replace: bool = False,
    ) -> Tool: ...

    def register(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        *,
        description: str | None = None,
        timeout_s: float | None = None,
        replace: bool = False,
    ) -> Tool | Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register `fn` as tool `name` and return the Tool; without `fn`, act as a decorator.

        The decorator form returns the function unchanged so that it stays callable from Python.
        A name already in use is an error unless `replace` is true.
        """
        if fn is None:

            def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
                self.register(
                    name, func, description=description, timeout_s=timeout_s, replace=replace
                )
                return func

            return decorator
        tool = Tool.from_function(name, fn, description=description, timeout_s=timeout_s)
        self.add(tool, replace=replace)
        return tool

    def add(self, tool: Tool, *, replace: bool = False) -> None:
        """Register an already built Tool."""
        if tool.name in self._tools and not replace:
            raise ToolRegistrationError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        logger.debug("registered tool %s", tool.name)

    def get(self, name: str) -> Tool:
        """The tool called `name`; ToolNotFound if there is none."""
        try:
            return self._tools[name]
        except KeyError:
            raise ToolNotFound(name, available=tuple(self.names())) from None

    def names(self) -> list[str]:
        """Registered tool names, sorted."""
        return sorted(self._tools)

    def schemas(self) -> dict[str, dict[str, Any]]:
        """Tool name -> JSON Schema of its arguments (what the planner's Catalog needs)."""
        return {name: self._tools[name].parameters for name in self.names()}

    def specs(self) -> list[dict[str, Any]]:
        """Every tool's `Tool.spec()`, sorted by name: the tool list shown to planning models."""
        return [self._tools[name].spec() for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._tools)

    async def call(self, name: str, args: dict[str, Any], *, timeout_s: float | None = None) -> Any:
        """Validate `args`, run tool `name` within its time limit, and return its JSON result.

        The limit is `timeout_s`, else the tool's own, else the registry default. A sync tool
        that overruns is abandoned in its worker thread (Python cannot stop a thread); the
        caller gets ToolTimeout at the limit either way.
        """
        tool = self.get(name)
        kwargs = tool.bind(args)
        limit = next(
            (t for t in (timeout_s, tool.timeout_s, self.default_timeout_s) if t is not None), None
        )
        try:
            async with asyncio.timeout(limit):
                result = await _invoke(tool, kwargs)
        except TimeoutError as e:
            raise ToolTimeout(name, limit or 0.0) from e
        return _json_result(name, result)


async def _invoke(tool: Tool, kwargs: dict[str, Any]) -> Any:
    # Every failure of the tool itself becomes a ToolError here, so that the only TimeoutError
    # reaching `call` is the one its own time limit raised.
    try:
        if tool.is_async:
            return await tool.fn(**kwargs)
        return await asyncio.to_thread(tool.fn, **kwargs)
    except ToolError as e:
        e.tool = e.tool or tool.name
        raise
    except Exception as e:
        logger.warning("tool %s failed", tool.name, exc_info=True)
        raise ToolError(
            f"tool {tool.name!r} failed: {type(e).__name__}: {e}", tool=tool.name
        ) from e


def _json_result(name: str, result: Any) -> Any:
    # A round trip through JSON both checks the result and turns tuples, Structs and dates
    # into the plain data that templates, events and the database expect.
    try:
        return msgspec.json.decode(msgspec.json.encode(result))
    except (TypeError, msgspec.EncodeError) as e:
        raise ToolError(
            f"tool {name!r} returned a value that is not JSON-serialisable ({e})", tool=name
        ) from e


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise ToolRegistrationError(
            f"invalid tool name {name!r}: use dotted identifiers such as 'kb.search' "
            f"(at most {MAX_NAME_LENGTH} characters)"
        )


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary and the `Args:` descriptions.

    >>> parse_docstring('''Add numbers.
    ...
    ... Args:
    ...     a: the first one,
    ...         wrapped.
    ...     b (int): the second.
    ... Returns:
    ...     The sum.''')
    ('Add numbers.', {'a': 'the first one, wrapped.', 'b': 'the second.'})
    """
    summary: list[str] = []
    params: dict[str, str] = {}
    section, current = None, None
    for line in inspect.cleandoc(doc or "").splitlines():
        header = _SECTION.match(line)
        if header:
            section, current = header.group(1), None
        elif section is None:
            summary.append(line.strip())
        elif section in ("Args", "Arguments", "Parameters"):
            current = _doc_param_line(line, params, current)
    return " ".join(" ".join(summary).split()), params


def _doc_param_line(line: str, params: dict[str, str], current: str | None) -> str | None:
    # A line indented once opens a parameter; deeper lines continue the current one.
    stripped = line.strip()
    match = _PARAM_LINE.match(stripped)
    indent = len(line) - len(line.lstrip())
    if match and indent <= 4:
        params[match.group(1)] = match.group(2).strip()
        return match.group(1)
    if current and stripped:
        params[current] = f"{params[current]} {stripped}".strip()
    return current


_UNSUPPORTED_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional-only",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def _arguments_struct(
    name: str, fn: Callable[..., Any], docs: dict[str, str]
) -> type[msgspec.Struct]:
    try:
        signature = inspect.signature(fn)
        hints = _type_hints(fn)
    except (TypeError, ValueError, NameError) as e:
        raise ToolRegistrationError(f"tool {name!r}: cannot read the signature ({e})") from e
    fields: list[tuple[Any, ...]] = []
    for param in signature.parameters.values():
        fields.append(_struct_field(name, param, hints, docs))
    try:
        return msgspec.defstruct(
            _ARGS_STRUCT, fields, kw_only=True, forbid_unknown_fields=True, frozen=True
        )
    except TypeError as e:
        raise ToolRegistrationError(f"tool {name!r}: unsupported parameter ({e})") from e


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    # A callable object keeps its annotations on its class's __call__.
    target = fn if inspect.isroutine(fn) else type(fn).__call__
    return typing.get_type_hints(target, include_extras=True)


def _struct_field(
    name: str, param: inspect.Parameter, hints: dict[str, Any], docs: dict[str, str]
) -> tuple[Any, ...]:
    if param.kind in _UNSUPPORTED_KINDS:
        raise ToolRegistrationError(
            f"tool {name!r}: {_UNSUPPORTED_KINDS[param.kind]} parameter {param.name!r} "
            "cannot be passed by name"
        )
    if param.name not in hints:
        raise ToolRegistrationError(f"tool {name!r}: parameter {param.name!r} has no type hint")
    hint = hints[param.name]
    if param.name in docs:
        hint = Annotated[hint, msgspec.Meta(description=docs[param.name])]
    if param.default is inspect.Parameter.empty:
        return (param.name, hint)
    return (param.name, hint, param.default)


def _parameters_schema(name: str, arguments_type: type[msgspec.Struct]) -> dict[str, Any]:
    try:
        _, components = msgspec.json.schema_components(
            [arguments_type], ref_template="#/$defs/{name}"
        )
    except TypeError as e:
        raise ToolRegistrationError(
            f"tool {name!r}: a parameter type has no JSON schema ({e})"
        ) from e
    schema = dict(components.pop(_ARGS_STRUCT))
    schema.pop("title", None)
    schema.setdefault("properties", {})
    if components:
        schema["$defs"] = components
    return schema


def _returns_schema(name: str, fn: Callable[..., Any]) -> dict[str, Any]:
    hint = _type_hints(fn).get("return", Any)
    if hint is Any:
        return {}
    try:
        return msgspec.json.schema(hint)
    except TypeError as e:
        raise ToolRegistrationError(
            f"tool {name!r}: the return type has no JSON schema ({e})"
        ) from e


def describe_schema_error(error: jsonschema.ValidationError) -> tuple[str, str]:
    """A JSON pointer to the offending argument and a short message, from a jsonschema error."""
    path = _pointer(error.absolute_path)
    if error.validator == "required":
        missing = next(r for r in error.validator_value if r not in error.instance)
        return f"{path}/{_escape(missing)}", "missing required argument"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in known)[0]
        expected = ", ".join(sorted(known)) or "none"
        return f"{path}/{_escape(extra)}", f"unknown argument (expected: {expected})"
    if error.validator == "type":
        return path, f"expected {_types(error.validator_value)}, got {_json_type(error.instance)}"
    if error.validator in ("anyOf", "oneOf"):
        options = [_types(s.get("type", "value")) for s in error.validator_value]
        return path, f"expected {' or '.join(options)}, got {_json_type(error.instance)}"
    return path, _shorten(error.message)


def _pointer(parts: Any) -> str:
    return "".join(f"/{_escape(str(p))}" for p in parts)


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _types(value: Any) -> str:
    return " or ".join(value) if isinstance(value, list) else str(value)


def _json_type(value: Any) -> str:
    kinds = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))
    kinds += ((list, "array"), (dict, "object"), (type(None), "null"))
    return next((kind for cls, kind in kinds if isinstance(value, cls)), type(value).__name__)


def _shorten(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 1] + "…"


def _msgspec_location(message: str) -> tuple[str, str]:
    # msgspec ends messages with " - at `$.items[2].name`": make that "/items/2/name".
    match = re.fullmatch(r"(.*) - at `\$(.*)`", message)
    if not match:
        return "", message
    parts = re.findall(r"\.([^.\[]+)|\[([^\]]+)\]", match.group(2))
    return _pointer(a or b.strip("'\"") for a, b in parts), match.group(1)
