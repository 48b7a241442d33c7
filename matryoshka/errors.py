"""Exceptions shared by every part of the project.

Every message says what was expected, what was found (file, line, value) and how to fix it, in one line, so a CLI
can print ``str(error)`` and exit with status 2.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import ParamSpec

P = ParamSpec("P")

MAX_MESSAGE_CHARS = 1000  # a 5 MB document id must not make a 5 MB "one line"


class MatryoshkaError(Exception):
    """Base class of the project's user-facing errors (bad input, bad options, bad model folders).

    ``str()`` is one line (line breaks become spaces) of at most about ``MAX_MESSAGE_CHARS`` characters: a longer
    message keeps its start and its end (the fix) around a note of how much was cut."""

    def __str__(self) -> str:
        text = super().__str__().replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
        if len(text) <= MAX_MESSAGE_CHARS:
            return text
        head, tail = text[: MAX_MESSAGE_CHARS * 2 // 3], text[-MAX_MESSAGE_CHARS // 4:]
        return f"{head} [... {len(text) - len(head) - len(tail)} characters cut ...] {tail}"


class DataFormatError(MatryoshkaError, ValueError):
    """A malformed line or value in an input file."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, problem: str, fix: str = "") -> None:
        self.path, self.line, self.problem, self.fix = str(path), line, problem, fix
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}" + (f" ({fix})" if fix else ""))


class MissingInputError(MatryoshkaError, FileNotFoundError):
    """A required file or folder does not exist."""

    def __init__(self, path: str | os.PathLike[str], what: str, fix: str = "") -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {what} not found" + (f" ({fix})" if fix else ""))


class OptionError(MatryoshkaError, ValueError):
    """An option outside its allowed range or set of values."""

    def __init__(self, option: str, value: object, expected: str) -> None:
        self.option, self.value = option, value
        super().__init__(f"{option}={value!r} is invalid: expected {expected}")


#: what a command-line entry point reports as one line with exit status 2 (atomic_directory raises FileExistsError)
USER_ERRORS: tuple[type[BaseException], ...] = (MatryoshkaError, FileExistsError)


class ModelConfigError(MatryoshkaError, ValueError):
    """A model option or a saved model configuration that cannot be used."""


def cli_main(main: Callable[P, int]) -> Callable[P, int]:
    """Decorate a ``main(argv) -> int``: a user error (:data:`USER_ERRORS`) becomes ``error: <one line>`` on stderr
    and exit status 2, the one convention of every CLI of the project."""

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return wrapper
