"""`--config file.yaml` plus flags over config dataclasses: the one parser of every command.

`esft train` (ESConfig), `esft grpo` (esft's task options + trl.GRPOConfig) and the
quickstart all read their options the same way: a YAML file of field values, then flags
that win over it, generated from the dataclasses by transformers' `HfArgumentParser` so
that flags, YAML keys and the docstrings never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def option(help: str, **kw: Any) -> Any:
    """A dataclass field whose help text becomes its flag's `--help` line."""
    return dataclasses.field(metadata={"help": help}, **kw)


def _value_error(name: str, value: Any, tp: Any) -> str | None:
    """Why `value` does not fit the annotation `tp` of field `name` (None if it does)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = [_value_error(name, value, a) for a in args if a is not type(None)]
        return None if any(e is None for e in errors) else errors[0]
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return None
        return f"{name} must be one of {', '.join(map(repr, args))} (got {value!r})"
    if tp is bool:
        return None if isinstance(value, bool) else f"{name} must be true or false (got {value!r})"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{name} must be an integer (got {value!r})"
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number (got {value!r})"
        return None if math.isfinite(value) else f"{name} must be a finite number (got {value!r})"
    if tp is str:
        return None if isinstance(value, str) else f"{name} must be a string (got {value!r})"
    return None


def type_errors(obj: Any) -> list[str]:
    """Every field of the dataclass `obj` whose value does not fit its annotation.

    Checked before anything runs, whichever way the values came (flags, YAML, Python), so
    `awd_lambda: nan`, `population_size: 2.5` or `awd: l3` never reach a training loop.
    """
    hints = typing.get_type_hints(type(obj))
    errors = []
    for f in dataclasses.fields(obj):
        error = _value_error(f.name, getattr(obj, f.name), hints.get(f.name, Any))
        if error:
            errors.append(error)
    return errors


def name_list(text: str) -> list[str]:
    """argparse type: comma-separated names (e.g. tasks), at least one."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers (e.g. iterations)."""
    try:
        return [int(x) for x in name_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def field_names(types: Iterable[type]) -> set[str]:
    """Every field name of the given dataclasses."""
    return {f.name for t in types for f in dataclasses.fields(t)}


def read_config_file(
    path: str | Path, allowed: set[str] | None, ignore: Iterable[str] = (), what: str = "--config",
) -> dict[str, Any]:
    """The mapping in a YAML config file, with errors that name the file and the fix.

    `ignore` lists keys a run directory's config.yaml holds besides the fields (e.g.
    `trainer: grpo`): they are accepted and dropped. `what` names the file's role in errors;
    `allowed=None` leaves unknown keys to the caller.
    """
    import yaml

    from esft.io import read_text

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: no such file")
    try:
        data = yaml.safe_load(read_text(path, what)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{what} {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a mapping of field: value, got {type(data).__name__}")
    for key in ignore:
        data.pop(key, None)
    unknown = sorted(set(data) - allowed) if allowed is not None else []
    if unknown:
        raise ValueError(f"{what} {path}: unknown keys {', '.join(map(str, unknown))}")
    return data


def config_file_values(argv: Sequence[str], allowed: set[str], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The values of `--config FILE` in `argv` ({} without one)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(list(argv))
    return read_config_file(known.config, allowed, ignore) if known.config else {}


def dataclass_parser(types: Sequence[type], prog: str, description: str):
    """An HfArgumentParser over `types` that also accepts `--config FILE`."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(types), prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file of the same fields; flags override it")
    return parser


def parse_dataclass_flags(parser: Any, argv: Sequence[str], defaults: dict[str, Any]) -> tuple[Any, ...]:
    """(*dataclasses, namespace of the parser's other options) from `defaults` and flags.

    `defaults` are the config file's values (and a command's own defaults); flags win. A
    value a dataclass refuses (its `__post_init__` raises ValueError) exits with the
    command's name and the message, as a bad flag does.
    """
    parser.set_defaults(**defaults)
    try:
        *objs, extra, rest = parser.parse_args_into_dataclasses(list(argv), return_remaining_strings=True)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return (*objs, extra)


__all__ = [
    "config_file_values", "dataclass_parser", "field_names", "int_list", "name_list", "option", "parse_dataclass_flags",
    "read_config_file", "type_errors",
]
