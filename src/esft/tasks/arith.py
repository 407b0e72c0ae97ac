"""Bounded arithmetic for grading model-written expressions.

Model output is untrusted, so countdown answers are never passed to `eval`: they are
parsed with `ast` and only numbers, `+ - * /` and unary signs are walked. Every step is
bounded (input length, nesting depth, magnitude) so a hostile answer such as
`2**99**99` or a 10,000-digit literal costs microseconds and yields `None`.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

#: Longest expression we parse; real answers are a few dozen characters.
MAX_EXPR_LEN = 1000
#: Deepest AST we walk; Python's own parser gives up near 200 nested parentheses.
MAX_DEPTH = 100
#: Largest magnitude allowed for any literal or intermediate value.
MAX_MAGNITUDE = 1e12

Number = int | float

_BINOPS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_INT_RE = re.compile(r"[0-9]+")


class _Reject(Exception):
    """Internal signal: the expression is outside the accepted grammar or bounds."""


def _check(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise _Reject
    if abs(value) > MAX_MAGNITUDE:
        raise _Reject
    return value


def _walk(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise _Reject
    if isinstance(node, ast.Constant):
        # `type(...) in` rather than isinstance: bool is an int subclass and is not arithmetic.
        if type(node.value) not in (int, float):
            raise _Reject
        return _check(node.value)
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise _Reject
        left = _walk(node.left, depth + 1)
        right = _walk(node.right, depth + 1)
        if isinstance(node.op, ast.Div) and right == 0:
            raise _Reject
        return _check(op(left, right))
    if isinstance(node, ast.UnaryOp):
        operand = _walk(node.operand, depth + 1)
        if isinstance(node.op, ast.USub):
            return -operand
        if isinstance(node.op, ast.UAdd):
            return operand
        raise _Reject
    raise _Reject


def safe_eval(expr: str) -> float | None:
    """Value of an arithmetic expression, or None if it is not one we accept.

    Accepted: int/float literals, binary `+ - * /`, unary `+ -`, parentheses. Anything
    else (names, calls, `**`, `//`, `%`, strings, ...), division by zero, nesting deeper
    than MAX_DEPTH, input longer than MAX_EXPR_LEN or any value beyond MAX_MAGNITUDE
    gives None. Never raises.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_LEN:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        return float(_walk(tree.body, 0))
    except (
        _Reject,
        SyntaxError,
        ValueError,
        TypeError,
        RecursionError,
        MemoryError,
        OverflowError,
        ZeroDivisionError,
    ):
        return None


def numbers_in(expr: str) -> list[int]:
    """Non-negative integers written in `expr` (ASCII digit runs), in order of appearance.

    Only ASCII digits count, so '٣' is not a number here. Input longer than MAX_EXPR_LEN
    raises ValueError: callers bound the length first, which keeps int parsing cheap.
    """
    if len(expr) > MAX_EXPR_LEN:
        raise ValueError(f"expression longer than {MAX_EXPR_LEN} characters")
    return [int(tok) for tok in _INT_RE.findall(expr)]
