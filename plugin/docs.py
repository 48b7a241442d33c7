"""Passage text by document id: from a Lucene index that stores raw documents, or from a corpus file.

Lucene (``LuceneIndexDocs``): ``LuceneSearcher(index).doc(docid).raw()``; a raw JSON object gives its
``"contents"`` (Pyserini's JsonCollection), else ``"title" + " " + "text"`` (BEIR); raw text that is not JSON is
used as is. Pyserini (and the JVM) is imported only when this source is used.

Corpus (``CorpusDocs``): a BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``) or a Pyserini JsonCollection
(``id``, ``contents``) JSON-lines file, or a folder holding ``corpus.jsonl`` or ``*.jsonl`` files. Read strictly:
invalid JSON, a record without an id or text, a duplicate id or non-UTF-8 bytes stop with the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

from matryoshka.errors import DataFormatError, MissingInputError

logger = logging.getLogger(__name__)


class DocumentSource(Protocol):
    def text(self, docid: str) -> str | None:
        """The passage text of ``docid``; None when the source does not have it."""

    def describe(self) -> str: ...


def text_of_record(record: object) -> str | None:
    """Passage text of a parsed JSON document: ``contents``, else ``title`` + ``text``; None if neither.

    A field that is present must be a string: ``ValueError`` names it otherwise (null, a number, a list), never
    its ``str()`` ("None", "['a']") scored as if it were the passage.
    """
    if not isinstance(record, dict):
        return None
    for field in ("contents", "title", "text"):
        if field in record and not isinstance(record[field], str):
            raise ValueError(f"'{field}' must be a string, got {json.dumps(record[field])[:40]}")
    if "contents" in record:
        return record["contents"]
    if "text" in record or "title" in record:
        title, text = record.get("title", ""), record.get("text", "")
        return f"{title} {text}".strip() if title else text
    return None


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
        with file.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFormatError(file, number, f"not valid UTF-8 ({err.reason} at byte {err.start})",
                                          "re-encode the corpus as UTF-8") from None
                if not line.strip():
                    continue
                if number == 1:
                    line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataFormatError(file, number, f"invalid JSON ({err.msg} at column {err.colno})") from None
                docid = record.get("_id", record.get("id")) if isinstance(record, dict) else None
                try:
                    text = text_of_record(record)
                except ValueError as err:
                    raise DataFormatError(file, number, str(err)) from None
                if isinstance(docid, bool) or not isinstance(docid, str | int | None):
                    raise DataFormatError(file, number, f"document id must be a string, got {json.dumps(docid)[:40]}")
                if docid is None or text is None:
                    raise DataFormatError(file, number, "expected a JSON object with '_id', 'title', 'text' (BEIR) "
                                          "or 'id', 'contents' (Pyserini JsonCollection)")
                docid = str(docid).strip()
                if not docid:
                    raise DataFormatError(file, number, "empty document id")
                if docid in self.docs:
                    raise DataFormatError(file, number, f"document id {docid!r} appears twice")
                self.docs[docid] = text

    def text(self, docid: str) -> str | None:
        return self.docs.get(docid)

    def describe(self) -> str:
        return f"corpus {self.path}"


class LuceneIndexDocs:
    def __init__(self, index: str | os.PathLike[str]) -> None:
        self.index = Path(index)
        if not self.index.is_dir():
            raise MissingInputError(self.index, "Lucene index folder", "pass a local index built with -storeRaw "
                                    "(prebuilt index names are not downloaded here)")
        if not any(self.index.glob("segments_*")):  # what Lucene's DirectoryReader looks for first
            raise MissingInputError(self.index, "Lucene index (no segments_N file)", "pass a folder written by "
                                    "pyserini.index.lucene with -storeRaw, or --corpus FILE")
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
