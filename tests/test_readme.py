"""The README's commands are checked against the real command line, so examples cannot drift.

Every ``lookalike ...`` line in a fenced code block of README.md is parsed by the command's
own parser (typer/click): the sub-command must exist, every option must be known, required
options must be given and values must convert. Paths need not exist (the examples name the
reader's own folders). Notation the README uses for choices is expanded first: ``[--opt X]``
is checked as written inside, ``a|b`` as ``a``, ``...`` placeholders as a value.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main

from lookalike.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
#: Placeholders the README writes for a value, and a value of the right type for them.
PLACEHOLDERS = {"N": "1", "T": "0.5", "K": "1"}
INLINE = re.compile(r"`(lookalike [^`]+)`")
PROGRAM = re.compile(r"^(?:\$ |\+ )?(?:\.venv/bin/)?lookalike(?=\s|$)")


def readme_commands() -> list[str]:
    """The ``lookalike`` command lines of the README's code blocks (continuations joined,
    ``&``-separated commands split)."""
    text = README.read_text(encoding="utf-8")
    lines: list[str] = []
    # The command reference: `lookalike ...` spans in headings and the first cell of
    # table rows (prose and figures may name a command without its options).
    for row in FENCE.sub("", text).splitlines():
        if row.startswith("#"):
            lines.extend(INLINE.findall(row))
        elif row.startswith("| `lookalike "):  # a reference table: the command is the row's key
            key = re.split(r"(?<!\\)\|", row)[1]
            lines.extend(span.replace("\\|", "|") for span in INLINE.findall(key))
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(" & "):
                part = part.strip()
                if PROGRAM.match(part):
                    lines.append(part)
    return lines


def expand(line: str) -> list[str]:
    """Shell words of one README line, with the README's choice notation expanded."""
    line = PROGRAM.sub("lookalike", line, count=1)
    line = re.sub(r"\[([^\[\]]*)\]", r"\1", line)  # [--opt X] -> --opt X
    words = shlex.split(line, comments=True)[1:]
    out = []
    for w in words:
        if "|" in w and not w.startswith(("'", '"')):
            w = w.split("|")[0]
        out.append(PLACEHOLDERS.get(w, w.replace("...", "x")))
    return out


class DriftError(Exception):
    """A README line that the command line does not accept."""


def check(words: list[str]) -> None:
    """Parse ``words`` with the real command tree (typer's own parser, the one ``lookalike``
    runs), without running the command.

    Raises:
        DriftError: unknown command or option, missing required option, or a value that does not
            convert; the message is the parser's.
    """
    cmd: Any = typer.main.get_command(app)
    path = ["lookalike"]
    while hasattr(cmd, "get_command") and words and not words[0].startswith("-"):
        ctx = cmd.make_context(" ".join(path), [], resilient_parsing=True)
        sub = cmd.get_command(ctx, words[0])
        if sub is None:
            raise DriftError(f"no command {' '.join([*path, words[0]])!r}")
        path.append(words.pop(0))
        cmd = sub
    try:
        cmd.make_context(" ".join(path), list(words))
    except typer.Exit:  # --help
        pass
    except Exception as exc:  # the parser's usage errors (typer vendors click's)
        if not hasattr(exc, "format_message"):
            raise
        raise DriftError(exc.format_message()) from None


COMMANDS = readme_commands()


def test_readme_has_commands() -> None:
    assert len(COMMANDS) >= 30  # the reference below covers every command group


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_parses(line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOKALIKE_CATALOG", "./cat")  # "All commands take --catalog DIR"
    try:
        check(expand(line))
    except DriftError as exc:
        pytest.fail(f"README: {line}\n  -> {exc}")


def test_the_checker_catches_drift() -> None:
    """A wrong option, a missing required option and an unknown command are all caught."""
    for bad in (
        "lookalike search --catalog ./cat --no-such-option",
        "lookalike import ./lake2 -c ./cat2",  # --parquet is required
        "lookalike frobnicate ./photos",
        "lookalike search q.jpg --catalog ./cat -k many",
    ):
        with pytest.raises(DriftError):
            check(expand(bad))
