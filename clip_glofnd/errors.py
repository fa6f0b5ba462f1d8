"""The one exception type for bad user input (a flag, a file, a key): the CLI prints it on one line and exits 2."""
from __future__ import annotations


class UsageError(ValueError):
    """Bad input the user can fix; the message names the flag, file or key and says what to do."""


class TrainingStopped(UsageError):
    """Training cannot go on (e.g. a run of non-finite steps); printed on one line like a UsageError."""
