"""The configuration reference as markdown, generated from `ESConfig` itself.

The flags, the YAML keys and `ESConfig(...)` are one thing (config.py); their reference page
must not be a fourth copy that drifts. The docs build (`mkdocs_hooks.py`) renders this at
build time: per group of the class docstring ("Parameters of the ES algorithm", ...), the
group's prose and a table of its fields with type, default and the flag's help line.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from esft.config import ESConfig

_GROUP = re.compile(r"^    (Parameters .*):$")
_NAMES = re.compile(r"[a-z][a-z0-9_]*")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is not None and args:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or unset" if type(None) in args else "")
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    value = f.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"`{value}`"


def groups() -> list[tuple[str, str, list[str]]]:
    """(heading, prose, field names) for each "Parameters ..." group of ESConfig's docstring, in
    order; a field the docstring does not place goes to a last "Other parameters" group."""
    fields = [f.name for f in dataclasses.fields(ESConfig)]
    out: list[tuple[str, list[str], list[str]]] = []
    for line in (ESConfig.__doc__ or "").splitlines():
        m = _GROUP.match(line)
        if m:
            out.append((m.group(1), [], []))
            continue
        if not out or not line.strip():
            if out and out[-1][1]:
                out[-1][1].append("")
            continue
        text = line.strip()
        out[-1][1].append(text)
        head = text.split(":", 1)[0] if ":" in text and not line.startswith(" " * 12) else text.rstrip(".")
        if not line.startswith(" " * 12):  # a field's first line, not its continuation
            for name in _NAMES.findall(head.replace("/", ",")):
                if name in fields and name not in out[-1][2]:
                    out[-1][2].append(name)
    placed = {n for _, _, names in out for n in names}
    rest = [n for n in fields if n not in placed]
    result = [(h, "\n".join(prose).strip(), names) for h, prose, names in out]
    if rest:
        result.append(("Other parameters", "", rest))
    return result


def config_reference() -> str:
    """Every ESConfig field, grouped as the class docstring groups them."""
    hints = typing.get_type_hints(ESConfig)
    by_name = {f.name: f for f in dataclasses.fields(ESConfig)}
    lines: list[str] = []
    for heading, prose, names in groups():
        lines += [f"### {heading}", ""]
        if prose:
            lines += ["```text", prose, "```", ""]
        lines += ["| flag / YAML key | type | default | meaning |", "|---|---|---|---|"]
        for name in names:
            f = by_name[name]
            help_text = f.metadata.get("help", "").replace("|", "\\|")
            lines.append(f"| `--{name}` | {_type_name(hints[name])} | {_default(f)} | {help_text} |")
        lines.append("")
    return "\n".join(lines)


__all__ = ["config_reference", "groups"]
