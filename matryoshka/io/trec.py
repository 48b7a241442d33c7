"""Strict readers and an atomic writer for TREC run files, qrels and topic files.

Every reader reports the file and the 1-based line of the first malformed line, with what was expected.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from matryoshka.errors import DataFormatError, MissingInputError
from matryoshka.io.atomic import atomic_write

PathLike = str | os.PathLike[str]
Qrels = dict[str, dict[str, int]]
Topics = dict[str, str]


@dataclass(frozen=True)
class RunEntry:
    docid: str
    score: float
    rank: int


@dataclass
class Run:
    """A TREC run: per query (in file order), its entries (in file order), and the run tag of the file."""

    queries: dict[str, list[RunEntry]]
    tag: str

    def __len__(self) -> int:
        return len(self.queries)

    def scores(self, qid: str) -> dict[str, float]:
        return {entry.docid: entry.score for entry in self.queries[qid]}


def _open_lines(path: PathLike, what: str) -> Iterable[tuple[int, str]]:
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(p, what, "check the path")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataFormatError(p, line, f"not valid UTF-8 ({err.reason})", "re-encode the file as UTF-8") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the first id
    # lines end at \n (or \r\n) only, as in Pyserini and trec_eval; str.splitlines() would also break a line at
    # \x0b, \x0c, \x1c-\x1e, \x85, U+2028 and U+2029, inventing lines the file does not have
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        yield number, line.removesuffix("\r")


def _number(path: PathLike, line: int, value: str, kind: type, name: str) -> float | int:
    try:
        parsed = kind(value)
    except ValueError:
        raise DataFormatError(path, line, f"{name} {value!r} is not a{'n integer' if kind is int else ' number'}") \
            from None
    if kind is float and not math.isfinite(parsed):
        raise DataFormatError(path, line, f"{name} {value!r} is not a finite number")
    return parsed


def read_run(path: PathLike) -> Run:
    """Read a 6-column TREC run (``qid Q0 docid rank score tag``)."""
    queries: dict[str, list[RunEntry]] = {}
    seen: set[tuple[str, str]] = set()
    tag = None
    for number, line in _open_lines(path, "run file"):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 6:
            raise DataFormatError(path, number, f"expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}",
                                  "is this a TREC run file?")
        qid, _q0, docid, rank, score, run_tag = fields
        rank_value = int(_number(path, number, rank, int, "rank"))
        score_value = float(_number(path, number, score, float, "score"))
        if (qid, docid) in seen:
            raise DataFormatError(path, number, f"document {docid!r} listed twice for query {qid!r}")
        seen.add((qid, docid))
        tag = tag or run_tag
        queries.setdefault(qid, []).append(RunEntry(docid, score_value, rank_value))
    if not queries:
        raise DataFormatError(path, None, "run file has no entries")
    return Run(queries, tag or "run")


def sort_hits(hits: Mapping[str, float] | Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """Order by descending score, ties broken by ascending docid (Pyserini's convention)."""
    items = hits.items() if isinstance(hits, Mapping) else hits
    return sorted(((str(d), float(s)) for d, s in items), key=lambda item: (-item[1], item[0]))


def format_run_lines(run: Mapping[str, Mapping[str, float] | Iterable[tuple[str, float]]], tag: str) -> list[str]:
    if not tag or any(ch.isspace() for ch in tag):
        raise ValueError(f"run tag {tag!r} must be a non-empty word without spaces")
    lines = []
    for qid, hits in run.items():
        for rank, (docid, score) in enumerate(sort_hits(hits), start=1):
            if not math.isfinite(score):
                raise ValueError(f"query {qid!r} document {docid!r}: score {score} is not finite")
            lines.append(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}\n")
    return lines


def write_run(path: PathLike, run: Mapping[str, Mapping[str, float] | Iterable[tuple[str, float]]],
              tag: str) -> None:
    """Write a TREC run atomically: per query (in the given order) hits sorted by (-score, docid), ranks from 1."""
    lines = format_run_lines(run, tag)
    with atomic_write(path) as handle:
        handle.writelines(lines)


def read_qrels(path: PathLike) -> Qrels:
    """Read TREC qrels (``qid 0 docid rel``) or BEIR qrels (tab-separated ``query-id corpus-id score``, header)."""
    qrels: Qrels = {}
    for number, line in _open_lines(path, "qrels file"):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if number == 1 and fields[:2] == ["query-id", "corpus-id"]:
            continue
        if len(fields) == 4:
            qid, _iteration, docid, rel = fields
        elif len(fields) == 3:
            qid, docid, rel = fields
        else:
            raise DataFormatError(path, number, f"expected 'qid 0 docid relevance' (TREC) or 'query-id<TAB>corpus-id"
                                  f"<TAB>score' (BEIR), got {len(fields)} fields")
        if not qid or not docid:
            raise DataFormatError(path, number, "empty query or document id")
        qrels.setdefault(qid, {})[docid] = int(_number(path, number, rel, int, "relevance"))
    if not qrels:
        raise DataFormatError(path, None, "qrels file has no judgments")
    return qrels


def write_trec_qrels(path: PathLike, qrels: Mapping[str, Mapping[str, int]]) -> None:
    """Write qrels in the 4-column TREC format that trec_eval reads (atomic)."""
    with atomic_write(path) as handle:
        for qid, docs in qrels.items():
            for docid, rel in docs.items():
                handle.write(f"{qid} 0 {docid} {rel}\n")


def read_topics(path: PathLike) -> Topics:
    """Read topics from a TSV file (``qid<TAB>text``, Pyserini's format) or a BEIR ``queries.jsonl``."""
    topics: Topics = {}
    is_jsonl = str(path).endswith((".jsonl", ".json"))
    for number, line in _open_lines(path, "topics file"):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                record = json.loads(line)
                qid, text = record["_id"], record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataFormatError(path, number, f"expected a JSON object with '_id' and 'text' ({err})") from None
            if not isinstance(text, str):
                raise DataFormatError(path, number, f"'text' must be a string, got {json.dumps(text)[:40]}")
            if isinstance(qid, bool) or not isinstance(qid, str | int):
                raise DataFormatError(path, number, f"'_id' must be a string, got {json.dumps(qid)[:40]}")
        else:
            if "\t" not in line:
                raise DataFormatError(path, number, "expected 'qid<TAB>query text'", "topics must be tab-separated")
            qid, text = line.split("\t", 1)
        qid, text = str(qid).strip(), text.strip()
        if not qid:
            raise DataFormatError(path, number, "empty query id")
        if not text:
            raise DataFormatError(path, number, f"query {qid!r} has empty text")
        if qid in topics:
            raise DataFormatError(path, number, f"query id {qid!r} appears twice")
        topics[qid] = text
    if not topics:
        raise DataFormatError(path, None, "topics file has no queries")
    return topics


def write_topics(path: PathLike, topics: Mapping[str, str]) -> None:
    """Write topics as Pyserini's TSV (``qid<TAB>text``), atomically; tabs/newlines in text become spaces."""
    with atomic_write(path) as handle:
        for qid, text in topics.items():
            clean = " ".join(text.split())
            handle.write(f"{qid}\t{clean}\n")
