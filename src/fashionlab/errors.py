"""Errors caused by the user's input (a file, a field, a value): the CLI prints them without a traceback;
and TrainingInterrupted, which it answers with the command that resumes.

Every bad input to a public name raises a UserError (or a subclass, each listed in docs/api.md) whose
one-line message names the argument, file or field and what was expected. Where callers have long caught
a built-in type, the subclass is that built-in too (ArgumentError is a ValueError, UnknownNameError a
KeyError, atomic.OutputError an OSError), so `except ValueError` keeps working."""

import signal


class UserError(Exception):
    """Bad input: the message names the file, field or value and what was expected."""


class ArgumentError(UserError, ValueError):
    """An argument of a public function or method outside what it accepts (a type, a range, a choice)."""


class UnknownNameError(UserError, KeyError):
    """A name (model, model family, recipe) that is not among the known ones; the message lists them."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quotes and escaped quotes); the message is meant to be read.
        return str(self.args[0]) if self.args else ""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint that resume continues."""

    def __init__(self, run_dir, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved in {run_dir}")
        self.run_dir, self.signum = run_dir, signum
