"""Atomic file and folder writes: the target appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from matryoshka.errors import MatryoshkaError


def _default_mode() -> int:
    """What ``open()`` would give a new file: 0o666 minus the umask (mkstemp alone gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class NotRegularFileError(MatryoshkaError, IsADirectoryError):
    """An output path that exists and is not a regular file."""


def check_regular_target(target: Path) -> None:
    """Raise :class:`NotRegularFileError` when ``target`` exists (or dangles) and is not a regular file."""
    if not (target.is_symlink() or target.exists()):
        return
    mode = target.lstat().st_mode
    if stat.S_ISREG(mode):
        return
    kind = ("a symlink" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else
            "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a regular file")
    raise NotRegularFileError(f"{target}: output exists and is {kind}; it is never replaced (write to a new "
                              "regular file path)")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write to a temporary file next to ``path`` and move it in place on success (removed on any error).

    ``path`` must be a regular file or not exist: a symlink, a folder, a device or a FIFO there raises
    :class:`NotRegularFileError` before anything is written (``os.replace`` would replace the node itself)."""
    target = Path(path)
    check_regular_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it is renamed to ``path``.

    Raises FileExistsError up front when ``path`` exists and ``overwrite`` is False. On error the temporary
    folder is removed and ``path`` is left as it was.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: output folder already exists (choose another path or remove it first)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
