"""Topics handed to Pyserini's search CLIs as Pyserini reads them, and its run's query ids mapped back.

Pyserini picks a topic reader by substrings of the topics *path* (``beir``, ``cacm``) and by extension, and reads a
TSV whose ids are all integers with ``TsvIntTopicReader``, so ``001`` comes back as ``1``. :func:`pyserini_topics`
writes a TSV copy at a path free of those substrings and returns the map from the ids Pyserini will write to the
given ones; :func:`restore_qids` rewrites a run with it (the first field only, lines and ranks untouched).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from matryoshka.errors import DataFormatError
from matryoshka.io.atomic import atomic_write
from matryoshka.io.trec import write_topics

READER_TRAPS = ("beir", "cacm")  # substrings of a topics path that make Pyserini choose another topic reader
_JAVA_INT = re.compile(r"[+-]?\d+")


def pyserini_qids(qids: list[str]) -> dict[str, str]:
    """{id as Pyserini's TSV readers give it back: original id}. Raises ValueError when two ids collide."""
    as_int = all(_JAVA_INT.fullmatch(q) and -(2 ** 31) <= int(q) < 2 ** 31 for q in qids)
    back: dict[str, str] = {}
    for qid in qids:
        key = str(int(qid)) if as_int else qid
        if key in back:
            raise ValueError(f"query ids {back[key]!r} and {qid!r} are the same integer {key} to Pyserini's "
                             "TsvIntTopicReader (give them distinct ids)")
        back[key] = qid
    return back


@contextlib.contextmanager
def pyserini_topics(topics: Mapping[str, str], source: str | os.PathLike[str]) -> Iterator[tuple[Path, dict]]:
    """(a TSV copy of ``topics`` at a neutral temporary path, {Pyserini's qid: given qid}); removed on exit.
    ``source`` names the topics file in errors."""
    try:
        back = pyserini_qids(list(topics))
    except ValueError as err:
        raise DataFormatError(source, None, str(err)) from None
    folder = _neutral_folder(source)
    path = folder / "topics.tsv"
    try:
        write_topics(path, topics)
        yield path, back
    finally:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()


def _neutral_folder(source: str | os.PathLike[str]) -> Path:
    for _ in range(10):  # the random part of the name could spell a trap, too
        folder = Path(tempfile.mkdtemp(prefix="matryoshka-q-"))
        if not any(trap in str(folder).lower() for trap in READER_TRAPS):
            return folder
        folder.rmdir()
    raise DataFormatError(source, None, f"the temporary folder {tempfile.gettempdir()} contains one of "
                          f"{READER_TRAPS}, which makes Pyserini read topics with another reader",
                          "set TMPDIR elsewhere")


def restore_qids(run_path: str | os.PathLike[str], back: Mapping[str, str]) -> None:
    """Rewrite the query ids of a TREC run (in place, atomically) by ``back``; a no-op when it maps ids to
    themselves."""
    if all(key == value for key, value in back.items()):
        return
    path = Path(run_path)
    lines = path.read_text(encoding="utf-8").split("\n")
    with atomic_write(path) as handle:
        for i, line in enumerate(lines):
            qid, sep, rest = line.partition(" ")
            handle.write((back.get(qid, qid) + sep + rest) if line else "")
            if i < len(lines) - 1:
                handle.write("\n")
