"""Passage text by document id: from a Lucene index that stores raw documents, or from a corpus file.

Lucene (``LuceneIndexDocs``): ``LuceneSearcher(index).doc(docid).raw()``; a raw JSON object gives its
``"contents"`` (Pyserini's JsonCollection), else ``"title" + " " + "text"`` (BEIR); raw text that is not JSON is
used as is. Pyserini (and the JVM) is imported only when this source is used.

Corpus (``CorpusDocs``): a BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``) or a Pyserini JsonCollection
(``id``, ``contents``) JSON-lines file, or a folder holding ``corpus.jsonl`` or ``*.jsonl`` files, read by the one
strict corpus reader (:func:`matryoshka.io.beir.iter_corpus`); a duplicate id stops with the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

from matryoshka.errors import DataFormatError, MissingInputError
from matryoshka.io.beir import iter_corpus, text_of_record

logger = logging.getLogger(__name__)


class DocumentSource(Protocol):
    def text(self, docid: str) -> str | None:
        """The passage text of ``docid``; None when the source does not have it."""

    def describe(self) -> str: ...


class CorpusDocs:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        files = self._files(self.path)
        self.docs: dict[str, str] = {}
        for file in files:
            self._read(file)
        if not self.docs:
            raise DataFormatError(self.path, None, "corpus has no documents")
        logger.info("read %d documents from %s", len(self.docs), self.path)

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if path.is_dir():
            if (path / "corpus.jsonl").is_file():
                return [path / "corpus.jsonl"]
            found = sorted(path.glob("*.jsonl"))
            if found:
                return found
            raise MissingInputError(path / "corpus.jsonl", "corpus file", "expected corpus.jsonl or *.jsonl files")
        raise MissingInputError(path, "corpus file", "pass a BEIR corpus.jsonl or a JsonCollection .jsonl")

    def _read(self, file: Path) -> None:
        for number, doc in iter_corpus(file):
            if doc.docid in self.docs:
                raise DataFormatError(file, number, f"document id {doc.docid!r} appears twice")
            self.docs[doc.docid] = doc.contents

    def text(self, docid: str) -> str | None:
        return self.docs.get(docid)

    def describe(self) -> str:
        return f"corpus {self.path}"


def check_lucene_index(index: Path, fix: str) -> None:
    """MissingInputError unless ``index`` is a folder holding a Lucene index (a ``segments_N`` file, what Lucene's
    DirectoryReader looks for first); ``fix`` says what to pass instead. Needs no JVM."""
    if not index.is_dir():
        raise MissingInputError(index, "Lucene index folder", f"{fix} (prebuilt index names are not downloaded)")
    if not any(index.glob("segments_*")):
        raise MissingInputError(index, "Lucene index (no segments_N file)", f"{fix}: a folder written by "
                                "pyserini.index.lucene")


class LuceneIndexDocs:
    def __init__(self, index: str | os.PathLike[str]) -> None:
        self.index = Path(index)
        check_lucene_index(self.index, "pass a local index built with -storeRaw, or --corpus FILE")
        from pyserini.search.lucene import LuceneSearcher  # lazy: starts the JVM

        self.searcher = LuceneSearcher(str(self.index))

    def text(self, docid: str) -> str | None:
        doc = self.searcher.doc(docid)
        if doc is None:
            return None
        raw = doc.raw()
        if raw is None:
            contents = doc.contents()
            if contents is None:
                raise DataFormatError(self.index, None, f"document {docid!r} has neither a stored raw document nor "
                                      "stored contents", "rebuild the index with -storeRaw (or -storeContents)")
            return str(contents)
        raw = str(raw)
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            return raw
        try:
            text = text_of_record(parsed)
        except ValueError as err:
            raise DataFormatError(self.index, None, f"document {docid!r}: {err}",
                                  "reindex it with string fields") from None
        return raw if text is None else text

    def describe(self) -> str:
        return f"Lucene index {self.index}"
