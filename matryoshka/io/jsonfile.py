"""Reading a JSON object file (a config, a manifest, an index description) with errors that name the file, and
writing one atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matryoshka.errors import DataFormatError, MissingInputError
from matryoshka.io.atomic import atomic_write


def write_json_object(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` to ``path`` atomically (indented, sorted keys, trailing newline); returns the path."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return Path(path)


def read_json_object(path: str | os.PathLike[str], what: str, fix: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; MissingInputError (``what`` not found, ``fix``) or DataFormatError when it is
    missing, not JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(path, what, fix)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(path, err.lineno, f"invalid JSON ({err.msg})", fix) from None
    if not isinstance(data, dict):
        raise DataFormatError(path, None, "expected a JSON object", fix)
    return data
