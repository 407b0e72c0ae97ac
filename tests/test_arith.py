"""safe_eval accepts plain arithmetic only and stays cheap on hostile input."""

from __future__ import annotations

import time

import pytest

from esft.tasks.arith import MAX_EXPR_LEN, numbers_in, safe_eval


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("1 + 2", 3.0),
        ("(44 + 19) + 35", 98.0),
        ("10 - 4 * 3", -2.0),
        ("(10 - 4) * 3", 18.0),
        ("7 / 2", 3.5),
        ("-3 + +5", 2.0),
        ("((((1))))", 1.0),
        ("1.5 * 2", 3.0),
        ("  12  ", 12.0),
    ],
)
def test_safe_eval_computes_plain_arithmetic(expr: str, value: float) -> None:
    assert safe_eval(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "2 ** 3",
        "7 // 2",
        "7 % 2",
        "abs(-1)",
        "x + 1",
        "(1).real",
        "'a' * 3",
        "True + 1",
        "1 if 1 else 2",
        "[1, 2]",
        "()",
        "1 < 2",
        "1 & 3",
        "~1",
        "lambda: 1",
        "1j",
        "__import__('os')",
        "",
        "1 +",
        "1e999",
    ],
)
def test_safe_eval_rejects_everything_but_numbers_and_four_operators(expr: str) -> None:
    assert safe_eval(expr) is None


def test_safe_eval_division_by_zero_is_none() -> None:
    assert safe_eval("1 / 0") is None
    assert safe_eval("5 / (3 - 3)") is None


def test_safe_eval_magnitude_cap_rejects_huge_values() -> None:
    assert safe_eval("999999 * 999999 * 999999") is None
    assert safe_eval("1" * 14) is None
    assert safe_eval("9*" * 200 + "9") is None


@pytest.mark.parametrize(
    "expr",
    [
        "9" * 10_000,
        "(" * 10_000 + "1" + ")" * 10_000,
        "(-" * 150 + "1" + ")" * 150,
        "-" * 900 + "1",
        "2**99**99",
        "9**9**9",
        "1+" * 400 + "1",
        "\x00",
        "٣ + 1",
    ],
)
def test_safe_eval_hostile_input_is_none_and_fast(expr: str) -> None:
    start = time.perf_counter()
    assert safe_eval(expr) is None
    assert time.perf_counter() - start < 0.5


def test_safe_eval_parentheses_alone_do_not_count_as_depth() -> None:
    assert safe_eval("(" * 150 + "1" + ")" * 150) == 1.0


def test_safe_eval_never_raises_on_non_strings() -> None:
    assert safe_eval(None) is None  # type: ignore[arg-type]
    assert safe_eval(12) is None  # type: ignore[arg-type]


def test_numbers_in_lists_ascii_integers_in_order() -> None:
    assert numbers_in("(44 + 19) - 3*07") == [44, 19, 3, 7]
    assert numbers_in("٣ + 1") == [1]
    assert numbers_in("") == []


def test_numbers_in_refuses_overlong_input() -> None:
    with pytest.raises(ValueError):
        numbers_in("9" * (MAX_EXPR_LEN + 1))
