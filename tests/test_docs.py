"""The documentation: the site builds with --strict, the README stays short, and every `esft`
command the README shows is one its parser accepts."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """The `esft ...` lines of the README's fenced shell blocks, as argv lists (comments cut)."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if line.startswith("esft "):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def _help_flags(command: str) -> set[str]:
    """The option strings `esft COMMAND --help` lists."""
    from esft.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0, f"esft {command} --help failed"
    return set(re.findall(r"--[a-z][a-z0-9_]*", out.getvalue()))


def test_the_readme_is_short_enough_to_read_before_the_first_run() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; guides and results belong in docs/"


def test_every_esft_command_in_the_readme_parses(tmp_path) -> None:
    from esft.cli import COMMANDS, parse_train_args
    from esft.sweep import main as sweep_main

    commands = readme_commands()
    assert len(commands) >= 10, "the README's tour should show the everyday commands"
    flags: dict[str, set[str]] = {}
    for argv in commands:
        command, rest = argv[0], argv[1:]
        assert command in COMMANDS, f"esft {command}: no such command"
        if rest == ["--help"]:
            continue
        if command == "train":
            parse_train_args(rest)  # every value checked, as a run would check it
            continue
        if command == "sweep":  # the spec itself is validated
            assert sweep_main([*rest, "--dry_run"]) == 0
            continue
        known = flags.setdefault(command, _help_flags(command))
        used = {a.split("=", 1)[0] for a in rest if a.startswith("--")}
        assert used <= known, f"esft {' '.join(argv)}: unknown flags {sorted(used - known)}"


@pytest.mark.slow
def test_the_documentation_site_builds_with_strict_links(tmp_path) -> None:
    pytest.importorskip("mkdocs")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    build(config)  # a broken link, a missing page or a page outside the nav raises
    reference = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    for field in ("population_size", "awd_lambda", "kl_budget", "reward_timeout", "members_per_batch"):
        assert f"--{field}" in reference, f"{field} missing from the generated configuration reference"
