"""Errors of the export: one line each, naming the file or value, what was expected and how to fix it."""

from __future__ import annotations

import os

from matryoshka.errors import MatryoshkaError


class ExportError(MatryoshkaError):
    """A checkpoint or an option the export cannot use."""


class CheckpointError(ExportError, ValueError):
    """A checkpoint folder that is incomplete or of a kind the export does not support."""

    def __init__(self, path: str | os.PathLike[str], problem: str, fix: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem} ({fix})")


class ExportValidationError(ExportError, RuntimeError):
    """An exported graph whose results differ from the PyTorch model beyond the allowed tolerance."""

    def __init__(self, where: str, problem: str, fix: str) -> None:
        self.where = where
        super().__init__(f"{where}: {problem} ({fix})")
