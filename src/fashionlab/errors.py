"""Errors caused by the user's input (a file, a field, a value): the CLI prints them without a traceback;
and TrainingInterrupted, which it answers with the command that resumes."""

import signal


class UserError(Exception):
    """Bad input: the message names the file, field or value and what was expected."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint that resume continues."""

    def __init__(self, run_dir, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved in {run_dir}")
        self.run_dir, self.signum = run_dir, signum
