"""`calc`: safe arithmetic over numbers, for plans that compute with looked-up values.

The expression is parsed with Python's `ast` and evaluated by walking a whitelist of nodes:
numbers, `+ - * / // % **`, unary `+ -`, parentheses, comparisons (`< > <= >= == !=`, chained
as in Python) and the functions abs, round, min, max, sqrt, log, exp, floor, ceil, plus the
constants pi and e. Nothing is ever passed to eval/exec; names, attributes, strings, tuples,
lambdas and calls of anything else are refused. Size limits keep every expression cheap.

    >>> calc("1200 * 1.2 > 1300 * 0.9")
    True
    >>> calc("round(sqrt(2), 3)")
    1.414
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from tools.errors import ToolError

MAX_LENGTH = 1000
MAX_NODES = 400
MAX_DEPTH = 64
# Integer results above ~1200 decimal digits are refused before they are computed.
MAX_INT_BITS = 4096

Number = bool | int | float

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], bool]] = {
    ast.Lt: operator.lt,
    ast.Gt: operator.gt,
    ast.LtE: operator.le,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}


def _round(value: float, digits: int | None = None) -> float:
    if digits is not None and (not isinstance(digits, int) or abs(digits) > 100):
        raise ToolError("round(): the number of digits must be an integer between -100 and 100")
    return round(value, digits)


# name -> (function, fewest arguments, most arguments)
FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (lambda *xs: min(xs), 1, 64),
    "max": (lambda *xs: max(xs), 1, 64),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 2),
    "exp": (math.exp, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
_ALLOWED = "numbers, + - * / // % **, parentheses, comparisons and " + ", ".join(FUNCTIONS)


def calc(expression: str) -> Number:
    """Evaluate an arithmetic expression; comparisons return true or false.

    Supports numbers, + - * / // % ** (power), parentheses, comparisons (< > <= >= == !=),
    the functions abs, round, min, max, sqrt, log (natural, or log(x, base)), exp, floor, ceil,
    and the constants pi and e.

    Args:
        expression: the expression, e.g. "812000 * 1.2 > 905000 * 0.9" or "round(sqrt(2), 3)".
    """
    tree = _parse(expression)
    try:
        result = _eval(tree.body, 0)
    except ZeroDivisionError as e:
        raise ToolError("division by zero") from e
    except OverflowError as e:
        raise ToolError("the result is too large") from e
    except (ValueError, TypeError) as e:
        raise ToolError(f"math error: {e}") from e
    return _checked_result(result)


def _parse(expression: str) -> ast.Expression:
    if len(expression) > MAX_LENGTH:
        raise ToolError(f"the expression is longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolError(f"invalid expression: {e.msg}") from e
    except (ValueError, RecursionError, MemoryError) as e:
        raise ToolError("invalid expression: too deeply nested or malformed") from e
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"the expression has more than {MAX_NODES} parts")
    return tree


def _eval(node: ast.AST, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ToolError(f"the expression is nested more than {MAX_DEPTH} levels deep")
    handler = _HANDLERS.get(type(node))
    if handler is None:
        raise ToolError(_refusal(node))
    return handler(node, depth + 1)


def _constant(node: ast.Constant, _depth: int) -> Any:
    # bool is a subclass of int: `True` in an expression is a name, not a number here.
    if type(node.value) not in (int, float):
        raise ToolError(f"only numbers are allowed, not {node.value!r}")
    return node.value


def _name(node: ast.Name, _depth: int) -> float:
    if node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if node.id in FUNCTIONS:
        raise ToolError(f"{node.id} is a function: call it, e.g. {node.id}(x)")
    raise ToolError(f"unknown name {node.id!r}; allowed: {_ALLOWED}, pi, e")


def _binary(node: ast.BinOp, depth: int) -> Any:
    op = _BINARY.get(type(node.op))
    if op is None:
        hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
        raise ToolError(f"operator {type(node.op).__name__} is not allowed{hint}")
    left, right = _eval(node.left, depth), _eval(node.right, depth)
    if op is operator.pow:
        _check_power(left, right)
    return _check_size(op(left, right))


def _unary(node: ast.UnaryOp, depth: int) -> Any:
    op = _UNARY.get(type(node.op))
    if op is None:
        raise ToolError(f"operator {type(node.op).__name__} is not allowed")
    return op(_eval(node.operand, depth))


def _compare(node: ast.Compare, depth: int) -> bool:
    left = _eval(node.left, depth)
    for op_node, right_node in zip(node.ops, node.comparators, strict=True):
        op = _COMPARE.get(type(op_node))
        if op is None:
            raise ToolError(f"comparison {type(op_node).__name__} is not allowed")
        right = _eval(right_node, depth)
        if not op(left, right):
            return False
        left = right
    return True


def _call(node: ast.Call, depth: int) -> Any:
    if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
        raise ToolError(f"only these functions can be called: {', '.join(FUNCTIONS)}")
    name = node.func.id
    fn, fewest, most = FUNCTIONS[name]
    if node.keywords:
        raise ToolError(f"{name}() takes no keyword arguments")
    if not fewest <= len(node.args) <= most:
        expected = fewest if fewest == most else f"{fewest} to {most}"
        raise ToolError(f"{name}() takes {expected} argument(s), got {len(node.args)}")
    args = [_eval(arg, depth) for arg in node.args]
    try:
        return _check_size(fn(*args))
    except ValueError as e:
        raise ToolError(f"{name}() is undefined for {', '.join(map(repr, args))}") from e


_HANDLERS: dict[type[ast.AST], Callable[[Any, int], Any]] = {
    ast.Constant: _constant,
    ast.Name: _name,
    ast.BinOp: _binary,
    ast.UnaryOp: _unary,
    ast.Compare: _compare,
    ast.Call: _call,
}

_REFUSALS: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access is not allowed",
    ast.Subscript: "indexing is not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.Tuple: "tuples are not allowed (write numbers without thousands separators)",
    ast.List: "lists are not allowed (pass several numbers to min or max instead)",
    ast.BoolOp: "and/or are not allowed (compare single values)",
}


def _refusal(node: ast.AST) -> str:
    return _REFUSALS.get(type(node), f"{type(node).__name__} is not allowed; use {_ALLOWED}")


def _check_power(base: Any, exponent: Any) -> None:
    # 9**9**9 would take minutes and gigabytes: estimate the size before computing.
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        bits = math.log2(abs(base)) * exponent
        if bits > MAX_INT_BITS:
            raise ToolError(f"the power is too large (about {bits / math.log2(10):.3g} digits)")


def _check_size(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("the result is too large")
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    return value


def _checked_result(value: Any) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is not a finite number")
    return value
