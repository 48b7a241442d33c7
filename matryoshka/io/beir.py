"""BEIR-layout data sets (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) and their conversion to the
files Pyserini reads (a JsonCollection folder, a TSV topics file, TREC qrels)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from matryoshka.errors import DataFormatError, MissingInputError
from matryoshka.io.atomic import atomic_write
from matryoshka.io.trec import Qrels, Topics, read_qrels, read_topics

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Document:
    docid: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        """The text indexed and reranked: title and body, as BEIR's flat Pyserini indexes do."""
        return f"{self.title} {self.text}".strip() if self.title else self.text


Corpus = dict[str, Document]


def text_of_record(record: object) -> str | None:
    """Passage text of a parsed JSON document: ``contents`` (Pyserini JsonCollection), else ``title`` + ``text``
    (BEIR); None if it has neither. A field that is present must be a string: ``ValueError`` names it otherwise
    (null, a number, a list), never its ``str()`` ("None", "['a']") scored as if it were the passage."""
    if not isinstance(record, dict):
        return None
    for name in ("contents", "title", "text"):
        if name in record and not isinstance(record[name], str):
            raise ValueError(f"'{name}' must be a string, got {json.dumps(record[name])[:40]}")
    if "contents" in record:
        return record["contents"]
    if "text" in record or "title" in record:
        return Document("", record.get("title", ""), record.get("text", "")).contents
    return None


def iter_corpus(path: PathLike) -> Iterator[tuple[int, Document]]:
    """(line, document) of a corpus JSON-lines file, strictly: a BEIR record (``_id``, ``title``, ``text``) or a
    Pyserini JsonCollection one (``id``, ``contents``: title empty, text = contents). Invalid UTF-8 or JSON, a
    record without an id or text, a field that is not a string, an id that is empty or has spaces stop with the
    file and line; a UTF-8 byte-order mark is skipped."""
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(p, "corpus file", "pass a BEIR corpus.jsonl or a Pyserini JsonCollection .jsonl")
    with p.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(p, number, f"not valid UTF-8 ({err.reason} at byte {err.start})",
                                      "re-encode the file as UTF-8") from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(p, number, f"invalid JSON ({err.msg} at column {err.colno})") from None
            docid = record.get("_id", record.get("id")) if isinstance(record, dict) else None
            try:
                text = text_of_record(record)
            except ValueError as err:
                raise DataFormatError(p, number, str(err)) from None
            if docid is None or text is None:
                raise DataFormatError(p, number, "expected a JSON object with '_id', 'title', 'text' (BEIR) "
                                      "or 'id', 'contents' (Pyserini JsonCollection)")
            if isinstance(docid, bool) or not isinstance(docid, str | int):
                raise DataFormatError(p, number, f"document id must be a string, got {json.dumps(docid)[:40]}")
            docid = str(docid).strip()
            if not docid or any(ch.isspace() for ch in docid):
                raise DataFormatError(p, number, f"document id {docid!r} is empty or contains spaces")
            if "contents" in record:
                yield number, Document(docid, "", text)
            else:
                yield number, Document(docid, record.get("title", ""), record.get("text", ""))


def load_corpus(path: PathLike) -> Corpus:
    corpus: Corpus = {}
    for number, doc in iter_corpus(path):
        if doc.docid in corpus:
            raise DataFormatError(path, number, f"document id {doc.docid!r} appears twice")
        corpus[doc.docid] = doc
    if not corpus:
        raise DataFormatError(path, None, "corpus has no documents")
    return corpus


@dataclass
class BeirDataset:
    root: Path
    corpus: Corpus
    queries: Topics
    qrels: Qrels
    split: str

    @property
    def split_queries(self) -> Topics:
        """The queries that have judgments in this split, in qrels order."""
        return {qid: self.queries[qid] for qid in self.qrels}


def available_splits(root: PathLike) -> list[str]:
    return sorted(p.stem for p in (Path(root) / "qrels").glob("*.tsv"))


def qrels_path(root: PathLike, split: str) -> Path:
    path = Path(root) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        splits = available_splits(root)
        raise MissingInputError(path, f"qrels for split {split!r}",
                                f"available splits: {', '.join(splits) if splits else 'none'}")
    return path


def load_beir(root: PathLike, split: str, corpus: bool = True) -> BeirDataset:
    """Load a BEIR folder; checks that every judged query exists (and, with the corpus, every judged doc)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(root, "BEIR data folder", "expected a folder with corpus.jsonl, queries.jsonl, qrels/")
    qpath = qrels_path(root, split)
    qrels = read_qrels(qpath)
    queries = read_topics(root / "queries.jsonl")
    missing = [qid for qid in qrels if qid not in queries]
    if missing:
        raise DataFormatError(qpath, None, f"{len(missing)} judged queries are not in queries.jsonl, e.g. "
                              f"{missing[0]!r}")
    docs = load_corpus(root / "corpus.jsonl") if corpus else {}
    if corpus:
        for qid, judged in qrels.items():
            for docid in judged:
                if docid not in docs:
                    raise DataFormatError(qpath, None, f"query {qid!r} judges document {docid!r}, which is not in "
                                          "corpus.jsonl")
    return BeirDataset(root, docs, queries, qrels, split)


def write_jsonl_collection(corpus: Mapping[str, Document], out_dir: PathLike) -> Path:
    """Write a Pyserini JsonCollection (``{"id", "contents"}`` per line) into ``out_dir/docs.jsonl`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "docs.jsonl"
    with atomic_write(target) as handle:
        for doc in corpus.values():
            handle.write(json.dumps({"id": doc.docid, "contents": doc.contents}, ensure_ascii=False) + "\n")
    return target
