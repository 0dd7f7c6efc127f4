"""Errors a run reports to the user in one line (the ``keel`` command prints them without a traceback)."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, ...); the message says what to do."""
