"""Training sets: queries with graded positives and mined candidates, teacher score files, and seeded groups.

A *training set* is a folder written by :mod:`matryoshka.training.mining` (atomically, so it is complete or absent):

``queries.jsonl``
    one object per query: ``{"qid", "query", "positives": {docid: grade > 0}, "candidates": [docid, ...],
    "bm25": {docid: score}, "field": "contents" | "text"}``. ``candidates`` are the mined hard negatives in BM25
    rank order, positives already removed; ``bm25`` holds the BM25 score of every positive and candidate that the
    search returned (the teacher fuses them); ``field`` says which text of a document is the passage (``contents``
    = title + text, as indexed; ``text`` for title pseudo-queries, whose title is the query).
``corpus.jsonl``
    the documents the queries refer to, in BEIR format, so training needs nothing else (e.g. on a GPU machine).
``meta.json``
    where the set came from (source folder, split, depth, kind) and its counts.

A *teacher file* is a TSV ``qid<TAB>docid<TAB>score`` (no header): a teacher's score for every positive and
candidate of a query; the KL term of the objective distils them over each group.

:class:`GroupSampler` turns training sets into *groups*: one positive and ``group_size - 1`` negatives per query,
drawn with a ``random.Random`` seeded from ``(seed, epoch)`` only, so any epoch can be rebuilt exactly (resume,
DDP: every rank builds the same list and takes its own share).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matryoshka.errors import DataFormatError, MatryoshkaError, MissingInputError
from matryoshka.io import Document, atomic_directory, atomic_write, load_corpus

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
QUERIES_FILE = "queries.jsonl"
CORPUS_FILE = "corpus.jsonl"
META_FILE = "meta.json"
PASSAGE_FIELDS = ("contents", "text")
TeacherScores = dict[str, dict[str, float]]


class TrainingDataError(MatryoshkaError, ValueError):
    """Training data that cannot be used (empty, inconsistent, or not matching its teacher file)."""


@dataclass(frozen=True)
class TrainingQuery:
    """One training query: graded positives, mined negatives (BM25 order, positives excluded), BM25 scores."""

    qid: str
    query: str
    positives: Mapping[str, int]
    candidates: tuple[str, ...]
    bm25: Mapping[str, float] = field(default_factory=dict)
    field: str = "contents"

    def to_json(self) -> dict[str, Any]:
        return {"qid": self.qid, "query": self.query, "positives": dict(self.positives),
                "candidates": list(self.candidates), "bm25": dict(self.bm25), "field": self.field}


@dataclass
class TrainingSet:
    """A loaded training-set folder (see the module docstring)."""

    root: Path
    queries: list[TrainingQuery]
    corpus: dict[str, Document]
    meta: dict[str, Any]

    def passage(self, docid: str, passage_field: str) -> str:
        doc = self.corpus[docid]
        return doc.text if passage_field == "text" else doc.contents

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.root.name)


def write_training_set(folder: PathLike, queries: Sequence[TrainingQuery], corpus: Mapping[str, Document],
                       meta: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write a training-set folder atomically (only the documents the queries use are copied)."""
    if not queries:
        raise TrainingDataError(f"{folder}: no training queries to write (expected at least one query with a "
                                "positive and a mined candidate)")
    needed: dict[str, None] = {}
    for query in queries:
        _check_query(query, corpus, Path(folder) / QUERIES_FILE, None)
        for docid in (*query.positives, *query.candidates):
            needed[docid] = None
    counts = {"queries": len(queries), "documents": len(needed),
              "positives": sum(len(q.positives) for q in queries),
              "candidates": sum(len(q.candidates) for q in queries)}
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        with (tmp / QUERIES_FILE).open("w", encoding="utf-8") as handle:
            for query in queries:
                handle.write(json.dumps(query.to_json(), ensure_ascii=False) + "\n")
        with (tmp / CORPUS_FILE).open("w", encoding="utf-8") as handle:
            for docid in needed:
                doc = corpus[docid]
                handle.write(json.dumps({"_id": doc.docid, "title": doc.title, "text": doc.text},
                                        ensure_ascii=False) + "\n")
        (tmp / META_FILE).write_text(json.dumps({**meta, "counts": counts}, indent=2, sort_keys=True) + "\n",
                                     encoding="utf-8")
    logger.info("wrote training set %s: %s", folder, counts)
    return Path(folder)


def _check_query(query: TrainingQuery, corpus: Mapping[str, Document], path: Path, line: int | None) -> None:
    if not query.positives:
        raise DataFormatError(path, line, f"query {query.qid!r} has no positive (relevance > 0)",
                              "drop the query or fix its qrels")
    bad = {d: g for d, g in query.positives.items() if isinstance(g, bool) or not isinstance(g, int) or g <= 0}
    if bad:
        raise DataFormatError(path, line, f"query {query.qid!r} has positives with grades {bad}",
                              "expected integer grades > 0")
    if not query.candidates:
        raise DataFormatError(path, line, f"query {query.qid!r} has no mined candidate",
                              "mine deeper (--depth) or drop the query")
    overlap = set(query.positives) & set(query.candidates)
    if overlap:
        raise DataFormatError(path, line, f"query {query.qid!r} lists positives {sorted(overlap)[:3]} as candidates",
                              "mining must exclude positives")
    if query.field not in PASSAGE_FIELDS:
        raise DataFormatError(path, line, f"query {query.qid!r} has field {query.field!r}",
                              f"expected one of {list(PASSAGE_FIELDS)}")
    for docid in (*query.positives, *query.candidates):
        if docid not in corpus:
            raise DataFormatError(path, line, f"query {query.qid!r} refers to document {docid!r}, which is not in "
                                  "the corpus", "rebuild the training set from its BEIR folder")


def load_training_set(folder: PathLike) -> TrainingSet:
    """Read and validate a training-set folder (every referenced document present, no positive as a negative)."""
    root = Path(folder)
    qpath = root / QUERIES_FILE
    if not qpath.is_file():
        raise MissingInputError(qpath, "training queries",
                                "build the training set with `python -m matryoshka.training.mining`")
    corpus = load_corpus(root / CORPUS_FILE)
    meta_path = root / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    queries: list[TrainingQuery] = []
    seen: set[str] = set()
    with qpath.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            query = _parse_query(line, qpath, number)
            if query.qid in seen:
                raise DataFormatError(qpath, number, f"query id {query.qid!r} appears twice")
            seen.add(query.qid)
            _check_query(query, corpus, qpath, number)
            queries.append(query)
    if not queries:
        raise TrainingDataError(f"{qpath}: the training set has no queries (expected one JSON object per line)")
    return TrainingSet(root, queries, corpus, meta)


def _parse_query(line: str, path: Path, number: int) -> TrainingQuery:
    try:
        record = json.loads(line)
        query = TrainingQuery(qid=str(record["qid"]), query=str(record["query"]),
                              positives={str(k): v for k, v in dict(record["positives"]).items()},
                              candidates=tuple(str(d) for d in record["candidates"]),
                              bm25={str(k): float(v) for k, v in dict(record.get("bm25", {})).items()},
                              field=str(record.get("field", "contents")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataFormatError(path, number, f"expected a training query object with qid, query, positives, "
                              f"candidates ({type(exc).__name__}: {exc})") from None
    if not query.query.strip():
        raise DataFormatError(path, number, f"query {query.qid!r} has empty text")
    return query


# ---------------------------------------------------------------------------------------------------- teacher files
def write_teacher_scores(path: PathLike, scores: Mapping[str, Mapping[str, float]]) -> Path:
    """Write ``qid<TAB>docid<TAB>score`` lines atomically."""
    with atomic_write(path) as handle:
        for qid, docs in scores.items():
            for docid, score in docs.items():
                if not math.isfinite(score):
                    raise TrainingDataError(f"teacher score for query {qid!r} document {docid!r} is {score}: "
                                            "expected a finite number")
                handle.write(f"{qid}\t{docid}\t{score:.6f}\n")
    return Path(path)


def read_teacher_scores(path: PathLike) -> TeacherScores:
    """Read a teacher TSV (``qid docid score``, tab- or space-separated); strict about every line."""
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(p, "teacher score file", "compute one with `python -m matryoshka.training.teacher`")
    scores: TeacherScores = {}
    with p.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 3:
                raise DataFormatError(p, number, f"expected 'qid<TAB>docid<TAB>score', got {len(fields)} fields")
            qid, docid, value = fields
            try:
                score = float(value)
            except ValueError:
                raise DataFormatError(p, number, f"score {value!r} is not a number") from None
            if not math.isfinite(score):
                raise DataFormatError(p, number, f"score {value!r} is not finite")
            if docid in scores.setdefault(qid, {}):
                raise DataFormatError(p, number, f"query {qid!r} document {docid!r} appears twice")
            scores[qid][docid] = score
    if not scores:
        raise DataFormatError(p, None, "teacher file has no scores")
    return scores


def check_teacher_coverage(training_set: TrainingSet, teacher: TeacherScores, source: PathLike) -> None:
    """Every positive and candidate of every query needs a teacher score (a group may draw any of them)."""
    for query in training_set.queries:
        known = teacher.get(query.qid)
        if known is None:
            raise TrainingDataError(f"{source}: no teacher scores for query {query.qid!r} of training set "
                                    f"{training_set.root} (recompute the teacher file for this training set)")
        missing = [d for d in (*query.positives, *query.candidates) if d not in known]
        if missing:
            raise TrainingDataError(f"{source}: query {query.qid!r} has no teacher score for documents "
                                    f"{missing[:3]} (recompute the teacher file for training set {training_set.root})")


# ---------------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class Group:
    """One query with its passages: index 0 is the positive; ``labels`` are grades (0 for negatives)."""

    qid: str
    query: str
    docids: tuple[str, ...]
    passages: tuple[str, ...]
    labels: tuple[int, ...]
    teacher: tuple[float, ...] | None
    source: int = 0  # index of the training set the query comes from


def group_size_of(groups: Sequence[Group]) -> int:
    """The one group size of a batch; an empty batch or mixed sizes raise :class:`TrainingDataError`."""
    if not groups:
        raise TrainingDataError("cannot collate an empty list of groups")
    size = len(groups[0].passages)
    if any(len(g.passages) != size for g in groups):
        raise TrainingDataError(f"groups of different sizes {sorted({len(g.passages) for g in groups})}: "
                                "expected one group size per batch")
    return size


class GroupSampler:
    """Seeded groups of one positive + ``group_size - 1`` negatives per query, one list per epoch.

    Negatives are drawn without replacement from the first ``negative_depth`` candidates (all when 0); a query with
    fewer candidates than needed repeats them in order (its group keeps the full size). The positive is drawn
    uniformly among the query's positives; with ``positives_per_query`` (one count per training set, 0 = all
    positives), a query gives that many groups per epoch, each with a different positive (drawn without replacement),
    so data with many graded positives per query (NFCorpus: about 45) is not reduced to one pair per query and epoch.
    With ``teachers`` (one per training set, or ``None``), every group carries the teacher's score of each passage.
    """

    def __init__(self, training_sets: Sequence[TrainingSet], group_size: int, seed: int,
                 teachers: Sequence[TeacherScores | None] | None = None, negative_depth: int = 0,
                 queries_per_epoch: Sequence[int] = (), positives_per_query: Sequence[int] = ()) -> None:
        if group_size < 2:
            raise TrainingDataError(f"group_size={group_size} is invalid: expected >= 2 (one positive + negatives)")
        if not training_sets:
            raise TrainingDataError("no training sets given: expected at least one training-set folder")
        teachers = list(teachers) if teachers is not None else [None] * len(training_sets)
        if len(teachers) != len(training_sets):
            raise TrainingDataError(f"got {len(teachers)} teacher files for {len(training_sets)} training sets: "
                                    "expected one per training set (or none)")
        if any(t is None for t in teachers) and any(t is not None for t in teachers):
            raise TrainingDataError("teacher files given for some training sets only: expected all or none")
        caps = list(queries_per_epoch) or [0] * len(training_sets)
        if len(caps) != len(training_sets) or any(c < 0 for c in caps):
            raise TrainingDataError(f"queries_per_epoch={list(queries_per_epoch)} is invalid: expected one count "
                                    f">= 0 per training set ({len(training_sets)}; 0 = all queries)")
        per_query = list(positives_per_query) or [1] * len(training_sets)
        if len(per_query) != len(training_sets) or any(k < 0 for k in per_query):
            raise TrainingDataError(f"positives_per_query={list(positives_per_query)} is invalid: expected one count "
                                    f">= 0 per training set ({len(training_sets)}; 0 = every positive)")
        self.training_sets, self.teachers = list(training_sets), teachers
        self.group_size, self.seed, self.negative_depth = group_size, seed, negative_depth
        self.caps = [c if 0 < c < len(ts.queries) else 0 for c, ts in zip(caps, self.training_sets, strict=True)]
        clash = [s for s, (k, c) in enumerate(zip(per_query, self.caps, strict=True)) if k != 1 and c]
        if clash:
            raise TrainingDataError(f"training set {training_sets[clash[0]].root} has both queries_per_epoch="
                                    f"{caps[clash[0]]} and positives_per_query={per_query[clash[0]]}: expected one "
                                    "of them (a cap with several positives per query would vary the epoch's size)")
        self.positives_per_query = per_query
        self._items = [(s, q) for s, ts in enumerate(self.training_sets) for q in ts.queries]
        if not self._items:
            raise TrainingDataError("the training sets have no queries")

    @property
    def has_teacher(self) -> bool:
        return self.teachers[0] is not None

    def __len__(self) -> int:
        """Groups per epoch (a capped training set contributes its cap, an uncapped one its queries' positives
        used); every epoch has this many."""
        return sum(c or sum(self._positives_used(s, q) for q in ts.queries)
                   for s, (c, ts) in enumerate(zip(self.caps, self.training_sets, strict=True)))

    def _positives_used(self, set_index: int, query: TrainingQuery) -> int:
        k = self.positives_per_query[set_index]
        return len(query.positives) if k == 0 else min(k, len(query.positives))

    def epoch(self, epoch: int) -> list[Group]:
        """The groups of ``epoch``, shuffled; the same for every call with the same seed and epoch. A capped
        training set contributes a different seeded sample of its queries each epoch."""
        rng = random.Random(f"{self.seed}:{epoch}")
        order = [i for i, (s, _q) in enumerate(self._items) if not self.caps[s]]
        start = 0
        for s, ts in enumerate(self.training_sets):
            if self.caps[s]:
                order += rng.sample(range(start, start + len(ts.queries)), self.caps[s])
            start += len(ts.queries)
        order.sort()
        work: list[tuple[int, str]] = []
        for i in order:
            set_index, query = self._items[i]
            ranked = sorted(query.positives)
            if self.positives_per_query[set_index] == 1:
                work.append((i, rng.choice(ranked)))
            else:
                work += [(i, p) for p in rng.sample(ranked, self._positives_used(set_index, query))]
        rng.shuffle(work)
        return [self._group(self._items[i], positive, rng) for i, positive in work]

    def _group(self, item: tuple[int, TrainingQuery], positive: str, rng: random.Random) -> Group:
        set_index, query = item
        training_set, teacher = self.training_sets[set_index], self.teachers[set_index]
        pool = list(query.candidates[: self.negative_depth] if self.negative_depth > 0 else query.candidates)
        need = self.group_size - 1
        negatives = rng.sample(pool, need) if len(pool) >= need else [pool[i % len(pool)] for i in range(need)]
        docids = (positive, *negatives)
        labels = (int(query.positives[positive]),) + (0,) * need
        passages = tuple(training_set.passage(d, query.field) for d in docids)
        scores = None
        if teacher is not None:
            known = teacher.get(query.qid, {})
            try:
                scores = tuple(float(known[d]) for d in docids)
            except KeyError as exc:
                raise TrainingDataError(f"no teacher score for query {query.qid!r} document {exc.args[0]!r} "
                                        f"(training set {training_set.root})") from None
        return Group(query.qid, query.query, docids, passages, labels, scores, set_index)


def shard(groups: Sequence[Group], rank: int, world_size: int, per_rank_batch: int) -> list[list[Group]]:
    """Split an epoch into per-step batches for one rank: step ``s`` of rank ``r`` gets the ``r``-th slice of the
    step's ``world_size * per_rank_batch`` groups. The incomplete tail is dropped, so all ranks take equal steps."""
    step_size = world_size * per_rank_batch
    steps = len(groups) // step_size
    if steps == 0:
        raise TrainingDataError(f"{len(groups)} groups cannot fill one step of {world_size} rank(s) x "
                                f"{per_rank_batch} groups: lower per_device_batch_size or add training queries")
    return [list(groups[s * step_size + rank * per_rank_batch: s * step_size + (rank + 1) * per_rank_batch])
            for s in range(steps)]
