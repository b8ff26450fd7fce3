"""Errors a user can act on. The CLI prints their message (no traceback) and exits 2."""

from __future__ import annotations


class FedinterestError(Exception):
    """Base of every error whose message is meant for the user."""


class DataError(FedinterestError, ValueError):
    """Malformed input. The message names the file, line and field and what was expected."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str):
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field, self.problem = str(path), line, field, problem


class ConfigError(FedinterestError, ValueError):
    """A bad configuration value; the message names the key and what was expected."""
