"""Every command documents itself: a one-line summary, an example, a working ``--help``.

Modelled on sqlite-utils' tests/test_docs.py: the command tree is walked, so a command added
without a summary or an example fails here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from node import cli

cli._register()


def _walk(cmd: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(typer.main.get_command(cli.app), ()))
IDS = [" ".join(p) or "aidnode" for p, _ in COMMANDS]


def test_the_tree_holds_every_command_family() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    for expected in ("serve", "db upgrade", "config check", "echo", "send", "status",
                     "studies list", "studies show", "jobs list", "jobs show", "jobs retry",
                     "jobs cancel", "deliveries list", "deliveries retry", "rules explain",
                     "audit list", "purge", "model list", "model verify", "model test",
                     "model train", "model demo", "demo"):
        assert expected in names


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_help_has_a_one_line_summary_and_an_example(path: tuple[str, ...], cmd: Any) -> None:
    help_text = getattr(cmd, "help", None) or ""
    summary = help_text.split("\n\n")[0].strip()
    assert summary, f"{' '.join(path)}: no help"
    assert "\n" not in summary, f"{' '.join(path)}: summary is not one line: {summary!r}"
    assert summary.endswith("."), f"{' '.join(path)}: summary is not a sentence: {summary!r}"
    assert "Example:" not in summary, f"{' '.join(path)}: example belongs in its own paragraph"
    assert "Example: aidnode" in help_text, f"{' '.join(path)}: no 'Example: aidnode ...'"


@pytest.mark.parametrize(("path", "cmd"), COMMANDS, ids=IDS)
def test_help_option_works(path: tuple[str, ...], cmd: Any) -> None:
    result = CliRunner().invoke(cli.app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "Example:" in result.output
