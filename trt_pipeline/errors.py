"""Problems and exceptions: every user-facing failure says where, what, what was expected, fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an input, located by a dotted key path (and a file line when known)."""

    path: str
    message: str
    fix: str | None = None
    where: str | None = None  # "recipes/x.yaml:12", "override build.max_batch_size=4", a model dir

    def render(self) -> str:
        head = f"{self.where}  " if self.where else ""
        key = f"{self.path}: " if self.path else ""
        tail = f" {self.fix}" if self.fix else ""
        end = "" if self.message.endswith((".", "?", "!")) else "."
        return f"{head}{key}{self.message}{end}{tail}"


class PipelineError(Exception):
    """Base of the errors the CLI turns into an exit code and a message without a traceback."""

    exit_code = 1


class BadInput(PipelineError):
    """Recipe, override, CLI argument or model input that cannot be used; nothing was written."""

    exit_code = 2

    def __init__(self, problems: Iterable[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        n = len(self.problems)
        head = f"{self.source}: " if self.source else ""
        lines = [f"{head}{n} problem{'s' if n != 1 else ''}"]
        lines += [f"  {p.render()}" for p in self.problems]
        return "\n".join(lines)


class StageFailed(PipelineError):
    """A stage raised while running: the message names the stage, key, log and the rerun command."""

    exit_code = 1


def bad_input(path: str, message: str, fix: str | None = None, where: str | None = None
              ) -> BadInput:
    """Shorthand for a single-problem BadInput."""
    return BadInput([Problem(path, message, fix, where)])


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean X?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"Did you mean {close[0]}?" if close else ""


def one_of(choices: Iterable[object]) -> str:
    """'one of a, b, c' for messages."""
    return "one of " + ", ".join(str(c) for c in choices)
