"""The one expression language of specs: Jinja2 in a locked-down sandbox.

Specs arrive over the network, so templates (`prompt`, `args`, `outputs`) and bare expressions
(`when`, `map`, `filter`, `route`) run in an immutable sandbox with strict undefined values, no
access to attributes starting with `_` or to the insides of functions, types and modules, a small
allow-list of filters and globals, and bounds on output size and loop iterations. Plan time
(`check`) rejects unsafe sources with a `SpecError` at the field's JSON pointer; run time
(`render`, `evaluate`, `render_value`) re-checks and raises `ExpressionError`, so a source that
never went through the planner cannot escape either.

Run-time context: `{"inputs": {...}, "steps": {id: {"output": ..., "status": ...}}, "item": ...,
"index": ...}` (`item`/`index` only inside `map` and `filter`).
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import types
from collections.abc import Iterator, Mapping, MappingView
from typing import Any, NamedTuple

from jinja2 import StrictUndefined, TemplateError, Undefined, UndefinedError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import Template, TemplateExpression
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.filters import FILTERS, make_attrgetter
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import pass_environment
from markupsafe import Markup

from planner.errors import ExpressionError, SpecError

__all__ = [
    "MAX_ITERATIONS",
    "MAX_OUTPUT_CHARS",
    "SANDBOX",
    "Access",
    "ExpressionError",
    "accesses",
    "check",
    "complexity",
    "constant",
    "evaluate",
    "names",
    "output_of",
    "passed_through",
    "references",
    "render",
    "render_value",
]

MAX_OUTPUT_CHARS = 1_000_000  # per rendered template and per intermediate string or list
MAX_ITERATIONS = 100_000  # loop iterations plus `range` elements, per render
MAX_POWER_BITS = 100_000  # `**` on integers
MAX_FORMAT_WIDTH = 10_000  # width/precision in `"%500s" % x`
STEP_FIELDS = ("output", "status")

# Statements a spec template never needs; macros and recursive loops make exponential work easy.
_FORBIDDEN_STATEMENTS = {
    nodes.Macro: "macros",
    nodes.CallBlock: "call blocks",
    nodes.Extends: "extends",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "import",
    nodes.Block: "blocks",
}
# Names Jinja binds to template internals.
_FORBIDDEN_NAMES = frozenset({"self", "caller", "varargs", "kwargs"})
# String formatting reaches attributes through format fields (`"{0.__class__}"`).
_FORBIDDEN_ATTRIBUTES = frozenset({"format", "format_map", "mro"})
# Objects whose attributes lead to code, frames, globals or classes.
_OPAQUE_TYPES = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.BuiltinMethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.CodeType,
    types.FrameType,
    types.TracebackType,
    types.GeneratorType,
    types.CoroutineType,
    types.AsyncGeneratorType,
    functools.partial,
)
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_ITERATION_GUARD = "loop_guard"

# Remaining iteration budget of the render in progress (a one-element list, decremented in place).
_budget: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("budget", default=None)


class Access(NamedTuple):
    """One use of `steps.<step>[.<field>[.<attr>]]` in a source."""

    step: str
    field: str | None  # "output", "status", another name (an error), or None for `steps.X` alone
    attr: str | None  # the first attribute read from `steps.X.output`, if any


# ---------------------------------------------------------------------------- bounds


def _spend(n: int) -> None:
    """Take `n` iterations from the current render's budget."""
    budget = _budget.get()
    if budget is None:
        budget = [MAX_ITERATIONS]
        _budget.set(budget)
    budget[0] -= n
    if budget[0] < 0:
        raise ExpressionError(f"more than {MAX_ITERATIONS} loop iterations")


def _check_size(n: int) -> None:
    if n > MAX_OUTPUT_CHARS:
        raise ExpressionError(f"value larger than {MAX_OUTPUT_CHARS} characters or items")


def _sized(value: Any) -> Any:
    if isinstance(value, str | list | tuple):
        _check_size(len(value))
    return value


def _bounded_range(*args: int) -> range:
    """`range`, charged to the iteration budget."""
    rng = range(*args)
    _spend(len(rng))
    return rng


def _loop_guard(iterable: Any) -> Iterator[Any]:
    """Wraps every `{% for %}` iterable: each iteration costs one unit of budget."""
    if isinstance(iterable, Undefined):
        iter(iterable)  # StrictUndefined raises here, naming what is missing
    for item in iterable:
        _spend(1)
        yield item


def _check_repeat(left: Any, right: Any) -> None:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(n, int):
            _check_size(len(seq) * n)


def _check_power(left: Any, right: Any) -> None:
    both_int = isinstance(left, int) and isinstance(right, int)
    if both_int and right > 0 and max(abs(left).bit_length(), 1) * right > MAX_POWER_BITS:
        raise ExpressionError(f"power result larger than {MAX_POWER_BITS} bits")


def _check_percent(left: Any) -> None:
    if not isinstance(left, str):
        return
    for match in _PERCENT_SPEC.finditer(left):
        for number in match.groups():
            if number == "*" or (number and int(number) > MAX_FORMAT_WIDTH):
                raise ExpressionError("format width or precision too large")


# ---------------------------------------------------------------------------- filters


@pass_environment
def _join(environment: Any, value: Any, d: str = "", attribute: str | int | None = None) -> str:
    if attribute is not None:
        value = map(make_attrgetter(environment, attribute), value)
    parts = [str(v) for v in value]
    sep = str(d)
    _check_size(sum(map(len, parts)) + len(sep) * max(len(parts) - 1, 0))
    return sep.join(parts)


def _replace(value: Any, old: str, new: str, count: int | None = None) -> str:
    text, old, new = str(value), str(old), str(new)
    hits = text.count(old) if old else len(text) + 1
    if count is not None:
        hits = min(hits, count)
    _check_size(len(text) + hits * (len(new) - len(old)))
    return text.replace(old, new, -1 if count is None else count)


def _json_default(value: Any) -> Any:
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises, naming what is missing
    if isinstance(value, tuple | set | frozenset | range | MappingView):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _tojson(value: Any, indent: int | None = None) -> str:
    """JSON without HTML escaping (prompts are not HTML); indent capped at 8."""
    indent = None if indent is None else min(max(int(indent), 0), 8)
    return _sized(json.dumps(value, ensure_ascii=False, indent=indent, default=_json_default))


_ALLOWED_FILTERS = (
    "abs", "capitalize", "count", "d", "default", "dictsort", "first", "float", "int", "items",
    "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "reverse",
    "round", "select", "selectattr", "sort", "string", "sum", "title", "trim", "truncate",
    "unique", "upper", "wordcount",
)  # fmt: skip


def _filters() -> dict[str, Any]:
    allowed = {name: FILTERS[name] for name in _ALLOWED_FILTERS}
    allowed.update(join=_join, replace=_replace, tojson=_tojson)
    allowed[_ITERATION_GUARD] = _loop_guard
    return allowed


def _dict(**items: Any) -> dict[str, Any]:
    return dict(items)


_GLOBALS = {
    "range": _bounded_range,
    "dict": _dict,
    "min": min,
    "max": max,
    "sum": sum,
    "len": len,
    "abs": abs,
}


# ---------------------------------------------------------------------------- the sandbox


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with `~` concatenations size-checked like the operators."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        """Wrap the joined string in `environment.bounded(...)`."""
        self.write("environment.bounded(")
        super().visit_Concat(node, frame)
        self.write(")")


class SpecSandbox(ImmutableSandboxedEnvironment):
    """The spec sandbox: no `_` attributes, no attributes of callables, bounded work."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
        self.globals = dict(_GLOBALS)
        self.filters = _filters()

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        """Refuse `_` names, string-format methods and everything about callables and types."""
        if attr.startswith("_") or attr in _FORBIDDEN_ATTRIBUTES or isinstance(obj, _OPAQUE_TYPES):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        """Fail at once (Jinja returns an undefined value that fails only when used)."""
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """Arithmetic with bounds: no gigabyte strings from `'a' * 10**9`, no huge powers."""
        if operator == "*":
            _check_repeat(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "%":
            _check_percent(left)
        return _sized(super().call_binop(context, operator, left, right))

    def bounded(self, value: str) -> str:
        """Size check for `~` results (called from compiled templates)."""
        return _sized(value)


SANDBOX = SpecSandbox()


class _Rejected(Exception):
    """A source that does not parse or is not allowed; `message` is user-facing."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------- parsing


def _parse(source: str, expression: bool) -> nodes.Template:
    """A fresh AST (callers may rewrite it); expressions become `result = <expr>`."""
    try:
        if not expression:
            return SANDBOX.parse(source)
        bare = source.strip()
        if bare.startswith(("{{", "{%")) and bare.endswith(("}}", "%}")):
            raise _Rejected("a bare expression is expected here: drop the `{{ }}`")
        parser = Parser(SANDBOX, source, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError("unexpected text after the expression", 1)
    except TemplateSyntaxError as e:
        where = f" (line {e.lineno})" if "\n" in source else ""
        raise _Rejected(f"syntax error: {e.message}{where}") from None
    template = nodes.Template([nodes.Assign(nodes.Name("result", "store"), expr)], lineno=1)
    template.set_environment(SANDBOX)
    return template


@functools.lru_cache(maxsize=4096)
def _ast(source: str, expression: bool) -> nodes.Template:
    """A shared, checked AST for analysis (never mutated)."""
    tree = _parse(source, expression)
    _refuse_unsafe(tree)
    return tree


def _step_of(node: nodes.Node) -> str | None:
    """`X` when `node` is `steps.X` or `steps['X']`."""
    is_access = isinstance(node, nodes.Getattr | nodes.Getitem)
    if is_access and isinstance(node.node, nodes.Name) and node.node.name == "steps":
        return _name_of(node)
    return None


def _name_of(node: nodes.Getattr | nodes.Getitem) -> str | None:
    """The attribute or constant string key a Getattr/Getitem reads."""
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None


def _refuse_unsafe(tree: nodes.Template) -> None:
    """One walk over the AST; raise `_Rejected` at the first thing a spec may not do."""
    step_roots: set[int] = set()
    names: list[nodes.Name] = []
    for node in tree.find_all(nodes.Node):
        problem = _node_problem(node)
        if problem is not None:
            raise _Rejected(problem)
        if _step_of(node) is not None:
            step_roots.add(id(node.node))
        if isinstance(node, nodes.Name):
            names.append(node)
    for name in names:
        if name.name.startswith("_") or name.name in _FORBIDDEN_NAMES:
            raise _Rejected(f"the name `{name.name}` is not available")
        if name.name == "steps" and (name.ctx != "load" or id(name) not in step_roots):
            raise _Rejected("`steps` must be used as `steps.<step id>`")


def _node_problem(node: nodes.Node) -> str | None:
    if type(node) in _FORBIDDEN_STATEMENTS:
        return f"{_FORBIDDEN_STATEMENTS[type(node)]} are not allowed in spec templates"
    if isinstance(node, nodes.For) and node.recursive:
        return "recursive loops are not allowed in spec templates"
    if isinstance(node, nodes.Getattr | nodes.Getitem):
        name = _name_of(node)
        if name is not None and (name.startswith("_") or name in _FORBIDDEN_ATTRIBUTES):
            return f"access to `{name}` is not allowed"
    return None


# ---------------------------------------------------------------------------- compiling


def _guard_loops(tree: nodes.Template) -> None:
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Filter(
            loop.iter, _ITERATION_GUARD, [], [], None, None, lineno=loop.lineno
        )
    tree.set_environment(SANDBOX)


def _single_expression(tree: nodes.Template) -> nodes.Expr | None:
    """The expression of a template that is exactly one `{{ expr }}`."""
    if len(tree.body) == 1 and isinstance(tree.body[0], nodes.Output):
        parts = tree.body[0].nodes
        if len(parts) == 1 and not isinstance(parts[0], nodes.TemplateData):
            return parts[0]
    return None


@functools.lru_cache(maxsize=4096)
def _compile(source: str, mode: str) -> Template | TemplateExpression:
    """Compile `source` as a "template", an "expression", or a "value" (template, native if
    it is a single `{{ expr }}`)."""
    tree = _parse(source, mode == "expression")
    _refuse_unsafe(tree)
    if mode == "value" and (expr := _single_expression(tree)) is not None:
        tree = nodes.Template([nodes.Assign(nodes.Name("result", "store"), expr)], lineno=1)
        mode = "expression"
    _guard_loops(tree)
    try:
        template = SANDBOX.from_string(tree)
    except TemplateError as e:  # unknown filters and tests surface at compile time
        raise _Rejected(e.message or type(e).__name__) from None
    if mode == "expression":
        return TemplateExpression(template, undefined_to_none=False)
    return template


# ---------------------------------------------------------------------------- plan time


def check(source: str, *, expression: bool, path: str) -> None:
    """Raise `SpecError(path)` when `source` does not parse, uses an unknown filter, or reaches
    for anything the sandbox forbids."""
    try:
        _compile(source, "expression" if expression else "template")
    except _Rejected as e:
        raise SpecError(path, e.message) from None


def accesses(source: str, *, expression: bool = False) -> frozenset[Access]:
    """Every `steps.X[.field[.attr]]` use in a (checked) source."""
    return _accesses(source, expression)


@functools.lru_cache(maxsize=4096)
def _accesses(source: str, expression: bool) -> frozenset[Access]:
    tree = _analysis_ast(source, expression)
    found = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if (step := _step_of(node)) is not None:
            found.add(Access(step, None, None))
        elif (step := _step_of(node.node)) is not None:
            found.add(Access(step, _name_of(node), None))
        elif _is_output(node.node):
            found.add(Access(_step_of(node.node.node), "output", _name_of(node)))
    return frozenset(found)


def _is_output(node: nodes.Node) -> bool:
    return (
        isinstance(node, nodes.Getattr | nodes.Getitem)
        and _step_of(node.node) is not None
        and _name_of(node) == "output"
    )


def references(source: str, *, expression: bool = False) -> set[str]:
    """Step ids a source reads as `steps.<id>`."""
    return {a.step for a in accesses(source, expression=expression)}


def output_of(source: str) -> str | None:
    """`X` when an expression is exactly `steps.X.output` (what `map`/`filter` usually iterate)."""
    body = _analysis_ast(source, True).body[0]
    if isinstance(body, nodes.Assign) and _is_output(body.node):
        return _step_of(body.node.node)
    return None


def passed_through(source: str) -> frozenset[str]:
    """Steps whose output a template renders unchanged: `{{ steps.X.output }}`, or a
    conditional (`a if c else b`, nested) choosing among such outputs and constants.

    A step that is also read elsewhere in a branch (`steps.X.output | upper`) is left out:
    then the rendered text is not its output.
    """
    expr = _single_expression(_analysis_ast(source, False))
    if expr is None:
        return frozenset()
    chosen: set[str] = set()
    changed: set[str] = set()
    _branches(expr, chosen, changed)
    return frozenset(chosen - changed)


def _branches(node: nodes.Expr | None, chosen: set[str], changed: set[str]) -> None:
    """Sort the steps the value of `node` can come from: as they are, or transformed."""
    if node is None or isinstance(node, nodes.Const):
        return
    if _is_output(node):
        chosen.add(_step_of(node.node))
    elif isinstance(node, nodes.CondExpr):  # the test only picks a branch: it is not output
        _branches(node.expr1, chosen, changed)
        _branches(node.expr2, chosen, changed)
    else:
        changed.update(_step_of(n) for n in node.find_all((nodes.Getattr, nodes.Getitem)))
        changed.discard(None)


def names(source: str, *, expression: bool = False) -> frozenset[str]:
    """The variables a (checked) source reads: `inputs`, `steps`, `item`, `index`, locals."""
    tree = _analysis_ast(source, expression)
    return frozenset(n.name for n in tree.find_all(nodes.Name) if n.ctx == "load")


def constant(expression: str) -> tuple[bool, Any]:
    """`(True, value)` when an expression is a literal (`true`, `3`, `'x'`), else `(False, None)`."""
    body = _analysis_ast(expression, True).body[0]
    if isinstance(body, nodes.Assign) and isinstance(body.node, nodes.Const):
        return True, body.node.value
    return False, None


def complexity(source: str, *, expression: bool = False) -> int:
    """Number of syntax nodes: a proxy for the cost of evaluating a source."""
    return sum(1 for _ in _analysis_ast(source, expression).find_all(nodes.Node))


def _analysis_ast(source: str, expression: bool) -> nodes.Template:
    try:
        return _ast(source, expression)
    except _Rejected as e:
        raise ExpressionError(e.message, source=source) from None


# ---------------------------------------------------------------------------- run time


def render(template: str, context: Mapping[str, Any]) -> str:
    """Render a template to text (at most `MAX_OUTPUT_CHARS`)."""
    return _run(template, "template", context)


def evaluate(expression: str, context: Mapping[str, Any]) -> Any:
    """The value of a bare expression (`when`, `map`, `filter`, `route`)."""
    return _run(expression, "expression", context)


def render_value(value: Any, context: Mapping[str, Any]) -> Any:
    """Render every string inside `value`; a string that is exactly one `{{ expr }}` becomes
    the native value of `expr`; other values are returned unchanged."""
    if isinstance(value, str):
        return _run(value, "value", context)
    if isinstance(value, dict):
        return {k: render_value(v, context) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [render_value(v, context) for v in value]
    return value


def _run(source: str, mode: str, context: Mapping[str, Any]) -> Any:
    token = _budget.set([MAX_ITERATIONS])
    try:
        compiled = _compile(source, mode)
        if isinstance(compiled, TemplateExpression):
            return _native(compiled(dict(context)))
        return _generate(compiled, context)
    except _Rejected as e:
        raise ExpressionError(e.message, source=source) from None
    except ExpressionError as e:
        raise ExpressionError(e.message, source=source) from None
    except Exception as e:
        raise ExpressionError(_describe(e), source=source) from None
    finally:
        _budget.reset(token)


def _generate(template: Template, context: Mapping[str, Any]) -> str:
    chunks, size = [], 0
    for chunk in template.generate(dict(context)):
        size += len(chunk)
        _check_size(size)
        chunks.append(chunk)
    return "".join(chunks)


def _native(value: Any) -> Any:
    """Plain data out of an expression: lists for ranges and generators, str for Markup."""
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises UndefinedError, naming what is missing
    if isinstance(value, Markup):
        return str(value)
    if isinstance(value, range | Iterator | MappingView):
        items = []
        for item in value:
            _spend(1)
            items.append(item)
        return items
    return value


def _describe(error: Exception) -> str:
    """A message safe to show users: what went wrong, never a traceback or an object repr."""
    if isinstance(error, SecurityError):
        return f"unsafe operation: {error}"
    if isinstance(error, UndefinedError):
        return f"undefined value: {error.message}"
    if isinstance(error, TemplateError):
        return error.message or type(error).__name__
    if isinstance(error, RecursionError):
        return "expression nested too deeply"
    return f"{type(error).__name__}: {error}"[:500]
