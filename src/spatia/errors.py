"""User-facing errors.

Every mistake a user can make (a bad file, a bad option, a bad dataset) raises a subclass of
`SpatiaError`. Its message names the file, says what is wrong and how to fix it; the CLI prints
it without a traceback and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path


class SpatiaError(Exception):
    """A problem with the user's input, with the file, the problem and the fix."""

    def __init__(self, problem: str, *, path: str | Path | None = None, fix: str | None = None):
        self.problem = problem
        self.path = Path(path) if path is not None else None
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        text = f"{where}{self.problem}"
        if self.fix:
            text += f"\n  Fix: {self.fix}"
        return text

    def __str__(self) -> str:
        return self.message


class BundleError(SpatiaError):
    """A Xenium output folder (or one of its files) is missing, unreadable or inconsistent."""


class OutputExistsError(SpatiaError):
    """An output path already exists; spatia never overwrites a user's files."""


class OutputWriteError(SpatiaError):
    """An output cannot be written: no permission, a read-only filesystem, or a full disk."""


class ConfigError(SpatiaError):
    """A configuration value or file is invalid."""


class DatasetError(SpatiaError):
    """A MIST dataset directory is missing, incomplete or inconsistent."""


class InputDataError(SpatiaError):
    """An AnnData or table handed to a stage lacks what the stage needs."""
