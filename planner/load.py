"""Spec text (YAML or JSON) to a typed `PipelineSpec`, with every problem reported at once.

Each problem is a `SpecError` with the JSON pointer of the field and the line and column of that
field in the text. Loading runs in three passes: parse (YAML node marks, or a position-tracking
walk of the JSON), structural conversion (msgspec, field by field so that one bad field does not
hide the next), then semantic checks (`check_spec`: one kind per step, templates safe, schemas
valid, ...).
"""

from __future__ import annotations

import bisect
import difflib
import json
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import jsonschema
import msgspec
import yaml

from planner import expressions
from planner.errors import SpecError, SpecErrors
from planner.fields import pointer, spec_sources
from planner.spec import STEP_KINDS, PipelineSpec, Step

MAX_SPEC_BYTES = 256 * 1024
MAX_DEPTH = 64
MAPPABLE_KINDS = ("generate", "tool", "pipeline")

_BOOL = "tag:yaml.org,2002:bool"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MSGSPEC_AT = re.compile(r" - at `(?:key` in `)?(\$[^`]*)`$")
_MSGSPEC_PART = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+|\.\.\.)\]")


class _Loader(yaml.SafeLoader):
    """SafeLoader without aliases (no billion-laughs) and with YAML 1.2 scalars: only
    true/false are booleans (`on`, `no`, `yes` stay strings) and dates stay strings."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Refuse an alias before it is expanded."""
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases are not allowed", mark)
        return super().compose_node(parent, index)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass
class _Positions:
    """Line and column (1-based) of every value and every mapping key, by JSON pointer."""

    values: dict[str, tuple[int, int]] = field(default_factory=dict)
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)
    errors: list[SpecError] = field(default_factory=list)

    def locate(self, error: SpecError, *, at_key: bool = False) -> SpecError:
        """`error` with the position of its path, or of the nearest enclosing field."""
        path = "" if error.path == "/" else error.path
        if at_key and path in self.keys:
            return error.located(*self.keys[path])
        while path not in self.values and path:
            path = path.rsplit("/", 1)[0]
        return error.located(*self.values.get(path, (None, None)))


class _Problem(NamedTuple):
    error: SpecError
    at_key: bool = False  # locate at the mapping key (unknown or invalid names)


# ---------------------------------------------------------------------------- entry point


def load_spec(
    text: str | bytes,
    *,
    fmt: Literal["yaml", "json"] | None = None,
    source: str = "<spec>",
) -> PipelineSpec:
    """Parse and validate a spec; raise `SpecErrors` listing every problem found."""
    text = _decode(text, source)
    data, positions = _parse(text, _detect(text, fmt, source), source)
    problems = _structure(data)
    if problems:
        located = [positions.locate(p.error, at_key=p.at_key) for p in problems]
        raise SpecErrors(located, source=source)
    spec = msgspec.convert(data, PipelineSpec)
    errors = check_spec(spec)
    if errors:
        raise SpecErrors([positions.locate(e) for e in errors], source=source)
    return spec


def locate(
    errors: list[SpecError], text: str | bytes, *, fmt: str | None = None, source: str = "<spec>"
) -> list[SpecError]:
    """`errors` (e.g. from binding a loaded spec) with the line and column of their paths."""
    try:
        text = _decode(text, source)
        _, positions = _parse(text, _detect(text, fmt, source), source)
    except SpecErrors:
        return list(errors)
    return [positions.locate(e) for e in errors]


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def parse_duration(value: str | float) -> float:
    """Seconds of a spec duration: `250ms`, `10s`, `2m`, or a number of seconds."""
    if not isinstance(value, str):
        return float(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", value)
    if match is None:
        raise ValueError(f"not a duration: {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _decode(text: str | bytes, source: str) -> str:
    if len(text) > MAX_SPEC_BYTES:
        raise SpecErrors(
            [SpecError("/", f"spec is larger than {MAX_SPEC_BYTES // 1024} KiB")], source=source
        )
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SpecErrors(
                [SpecError("/", f"spec is not UTF-8: {e.reason}")], source=source
            ) from None
    return text.removeprefix("\ufeff")


def _detect(text: str, fmt: str | None, source: str) -> str:
    if fmt is not None:
        return fmt
    if source.endswith(".json"):
        return "json"
    if source.endswith((".yaml", ".yml")):
        return "yaml"
    return "json" if text.lstrip().startswith("{") else "yaml"


def _parse(text: str, fmt: str, source: str) -> tuple[Any, _Positions]:
    try:
        data, positions = _parse_json(text) if fmt == "json" else _parse_yaml(text)
    except SpecError as e:
        raise SpecErrors([e], source=source) from None
    except RecursionError:
        raise SpecErrors([SpecError("/", "spec is nested too deeply")], source=source) from None
    if positions.errors:
        raise SpecErrors(positions.errors, source=source)
    if not isinstance(data, dict):
        error = SpecError("/", "a pipeline spec must be a mapping (name, steps, outputs, ...)")
        raise SpecErrors([positions.locate(error)], source=source)
    return data, positions


# ---------------------------------------------------------------------------- YAML


def _parse_yaml(text: str) -> tuple[Any, _Positions]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError("/", "the spec is empty")
        positions = _Positions()
        _walk_yaml(node, "", 0, positions)
        return loader.construct_document(node), positions
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = f" ({e.context})" if e.context else ""
        raise SpecError(
            "/",
            f"YAML syntax error: {e.problem}{context}",
            line=mark.line + 1,
            column=mark.column + 1,
        ) from None
    except yaml.YAMLError as e:
        raise SpecError("/", f"YAML error: {e}") from None
    finally:
        loader.dispose()


def _walk_yaml(node: yaml.Node, path: str, depth: int, out: _Positions) -> None:
    out.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if depth > MAX_DEPTH:
        out.errors.append(
            SpecError(path, f"nested deeper than {MAX_DEPTH} levels").located(*out.values[path])
        )
    elif isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            child = path + pointer(key)
            out.keys[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in seen:
                out.errors.append(
                    SpecError(child, f"duplicate key `{key}`").located(*out.keys[child])
                )
            seen.add(key)
            _walk_yaml(value_node, child, depth + 1, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk_yaml(item, f"{path}/{i}", depth + 1, out)


# ---------------------------------------------------------------------------- JSON


def _parse_json(text: str) -> tuple[Any, _Positions]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError("/", f"JSON syntax error: {e.msg}", line=e.lineno, column=e.colno) from None
    return data, _JsonPositions(text).walk()


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


class _JsonPositions:
    """Walks already-validated JSON text, recording where each value and key starts."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.decoder = json.JSONDecoder()
        self.line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.out = _Positions()

    def walk(self) -> _Positions:
        """Positions of the whole document."""
        self._value(0, "", 0)
        return self.out

    def _where(self, pos: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.line_starts, pos)
        return line, pos - self.line_starts[line - 1] + 1

    def _skip(self, pos: int) -> int:
        return _JSON_SPACE.match(self.text, pos).end()

    def _value(self, pos: int, path: str, depth: int) -> int:
        pos = self._skip(pos)
        self.out.values[path] = self._where(pos)
        if depth > MAX_DEPTH:
            error = SpecError(path, f"nested deeper than {MAX_DEPTH} levels")
            self.out.errors.append(error.located(*self._where(pos)))
            return self.decoder.raw_decode(self.text, pos)[1]
        char = self.text[pos]
        if char == "{":
            return self._object(pos + 1, path, depth)
        if char == "[":
            return self._array(pos + 1, path, depth)
        return self.decoder.raw_decode(self.text, pos)[1]

    def _object(self, pos: int, path: str, depth: int) -> int:
        seen: set[str] = set()
        pos = self._skip(pos)
        while self.text[pos] != "}":
            key, end = json.decoder.scanstring(self.text, pos + 1)
            child = path + pointer(key)
            self.out.keys[child] = self._where(pos)
            if key in seen:
                self.out.errors.append(
                    SpecError(child, f"duplicate key `{key}`").located(*self._where(pos))
                )
            seen.add(key)
            pos = self._skip(self._value(self._skip(end) + 1, child, depth + 1))
            pos = self._skip(pos + 1) if self.text[pos] == "," else pos
        return pos + 1

    def _array(self, pos: int, path: str, depth: int) -> int:
        pos, i = self._skip(pos), 0
        while self.text[pos] != "]":
            pos = self._skip(self._value(pos, f"{path}/{i}", depth + 1))
            pos = self._skip(pos + 1) if self.text[pos] == "," else pos
            i += 1
        return pos + 1


# ---------------------------------------------------------------------------- structure


def _structure(data: dict[str, Any]) -> list[_Problem]:
    """Every structural problem (types, unknown fields, missing fields, limits)."""
    problems: list[_Problem] = []
    _collect(data, PipelineSpec, "", problems)
    return problems


def _collect(value: Any, tp: Any, path: str, problems: list[_Problem]) -> None:
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as e:
        before = len(problems)
        _descend(value, tp, path, problems)
        if len(problems) == before:  # the problem is this value itself (type, length, pattern)
            problems.append(_Problem(_from_msgspec(str(e), path)))


def _from_msgspec(message: str, path: str) -> SpecError:
    match = _MSGSPEC_AT.search(message)
    if match is None:
        return SpecError(path or "/", message)
    message = message[: match.start()]
    parts = _MSGSPEC_PART.findall(match.group(1))
    if any(index == "..." for _, index in parts):
        return SpecError(path or "/", f"{message} (at `{match.group(1)}`)")
    return SpecError(path + pointer(*(name or index for name, index in parts)) or "/", message)


def _concrete(tp: Any, value: Any) -> Any:
    """The type to descend into: `Annotated` and `X | None` unwrapped; None for other unions."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [m for m in get_args(tp) if m is not type(None)]
            if len(members) != 1 or value is None:
                return None
            tp = members[0]
        else:
            return tp


def _descend(value: Any, tp: Any, path: str, problems: list[_Problem]) -> None:
    tp = _concrete(tp, value)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and isinstance(value, dict):
        _descend_struct(value, tp, path, problems)
    elif get_origin(tp) is dict and isinstance(value, dict):
        key_tp, value_tp = get_args(tp)
        for key, item in value.items():
            child = path + pointer(key)
            try:
                msgspec.convert(key, key_tp)
            except msgspec.ValidationError as e:
                text = str(_from_msgspec(str(e), child).message)
                problems.append(
                    _Problem(SpecError(child, f"invalid name `{key}`: {text}"), at_key=True)
                )
            _collect(item, value_tp, child, problems)
    elif get_origin(tp) is list and isinstance(value, list):
        (item_tp,) = get_args(tp)
        for i, item in enumerate(value):
            _collect(item, item_tp, f"{path}/{i}", problems)


def _descend_struct(value: dict[str, Any], tp: type, path: str, problems: list[_Problem]) -> None:
    fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
    for key in value:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            suggestion = f" (did you mean `{hint[0]}`?)" if hint else ""
            error = SpecError(path + pointer(key), f"unknown field `{key}`{suggestion}")
            problems.append(_Problem(error, at_key=True))
    for name, info in fields.items():
        if name in value:
            _collect(value[name], info.type, path + pointer(name), problems)
        elif info.required:
            problems.append(_Problem(SpecError(path or "/", f"missing required field `{name}`")))


# ---------------------------------------------------------------------------- semantics


def check_spec(spec: PipelineSpec) -> list[SpecError]:
    """Semantic problems of a structurally valid spec (no catalog needed), sorted by path."""
    errors: list[SpecError] = []
    for step_id, step in spec.steps.items():
        errors.extend(_check_step(pointer("steps", step_id), step))
    errors.extend(_check_inputs(spec))
    errors.extend(_check_chat(spec))
    for src in spec_sources(spec):
        try:
            expressions.check(src.text, expression=src.expression, path=src.path)
        except SpecError as e:
            errors.append(e)
    return sorted(errors, key=lambda e: (e.path, e.message))


def _check_step(base: str, step: Step) -> Iterator[SpecError]:
    kinds = [k for k in STEP_KINDS if getattr(step, k) is not None]
    if len(kinds) != 1:
        found = f"found {', '.join(kinds)}" if kinds else "found none"
        yield SpecError(base, f"a step needs exactly one of {', '.join(STEP_KINDS)} ({found})")
        return
    kind = kinds[0]
    if step.args and kind != "tool":
        yield SpecError(f"{base}/args", "only tool steps take `args`")
    yield from _check_map(base, step, kind)
    yield from _check_output(base, step, kind)
    yield from _check_fallback(base, step, kind)
    calls = [("generate", step.generate)]
    if step.plan is not None:
        calls += [("plan/planner", step.plan.planner), ("plan/joiner", step.plan.joiner)]
        if step.plan.grounded_args and step.plan.grounding is None:
            yield SpecError(f"{base}/plan/grounded_args", "`grounded_args` needs `grounding`")
    for where, gen in calls:
        if gen is not None and (gen.prompt is None) == (gen.messages is None):
            yield SpecError(f"{base}/{where}", "give exactly one of `prompt` and `messages`")


def _check_map(base: str, step: Step, kind: str) -> Iterator[SpecError]:
    if step.map is not None and kind not in MAPPABLE_KINDS:
        yield SpecError(
            f"{base}/map", f"`map` applies to {', '.join(MAPPABLE_KINDS)} steps, not {kind}"
        )
    for name in ("map_limit", "concurrency"):
        if getattr(step, name) is not None and step.map is None:
            yield SpecError(f"{base}/{name}", f"`{name}` needs `map`")


def _check_output(base: str, step: Step, kind: str) -> Iterator[SpecError]:
    for name in ("output", "output_schema"):
        if getattr(step, name) is not None and kind != "generate":
            yield SpecError(f"{base}/{name}", f"`{name}` applies to generate steps only")
    if step.output is not None:
        yield from _check_output_constraint(f"{base}/output", step.output)
        if "enum" in step.output and step.output_schema is not None:
            yield SpecError(
                f"{base}/output_schema", "an `enum` output is a string; drop `output_schema`"
            )
    if step.output_schema is not None:
        yield from _check_schema(f"{base}/output_schema", step.output_schema)


def _check_output_constraint(path: str, output: dict[str, Any]) -> Iterator[SpecError]:
    unknown = sorted(set(output) - {"enum", "type"})
    if unknown or len(output) != 1:
        yield SpecError(path, "`output` is either {enum: [...]} or {type: json}")
    elif "enum" in output:
        enum = output["enum"]
        if not (isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum)):
            yield SpecError(f"{path}/enum", "`enum` is a non-empty list of strings")
    elif output["type"] != "json":
        yield SpecError(f"{path}/type", "the only output type is `json`")


def _check_fallback(base: str, step: Step, kind: str) -> Iterator[SpecError]:
    if step.fallback and kind not in ("generate", "tool", "plan"):
        yield SpecError(f"{base}/fallback", "only generate, tool and plan steps have fallbacks")
        return
    # a plan step falls back to another planner model (its rounds start over)
    want, other = ("tool", "model") if kind == "tool" else ("model", "tool")
    for i, alternative in enumerate(step.fallback):
        path = f"{base}/fallback/{i}"
        if getattr(alternative, want) is None:
            yield SpecError(path, f"a fallback of a {kind} step names a `{want}`")
        if getattr(alternative, other) is not None:
            yield SpecError(f"{path}/{other}", f"a {kind} step cannot fall back to a {other}")
        if kind == "tool" and alternative.max_tokens is not None:
            yield SpecError(f"{path}/max_tokens", "`max_tokens` applies to model fallbacks")


def _check_schema(path: str, schema: dict[str, Any]) -> Iterator[SpecError]:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        yield SpecError(path + pointer(*e.path), f"invalid JSON Schema: {e.message}")


def _check_inputs(spec: PipelineSpec) -> Iterator[SpecError]:
    for name, schema in spec.inputs.items():
        yield from _check_schema(pointer("inputs", name), schema)


def _check_chat(spec: PipelineSpec) -> Iterator[SpecError]:
    if spec.chat is None:
        return
    if spec.chat.input not in spec.inputs:
        yield SpecError("/chat/input", f"`{spec.chat.input}` is not one of the pipeline's inputs")
    if spec.chat.output not in spec.outputs:
        yield SpecError(
            "/chat/output", f"`{spec.chat.output}` is not one of the pipeline's outputs"
        )
