"""Build a training set from a BEIR folder: positives from qrels, hard negatives mined with Pyserini BM25.

Two kinds of queries:

- ``qrels``: the split's judged queries; positives are the documents judged with relevance > 0 (the grade is kept);
  documents judged 0 stay eligible as negatives.
- ``titles``: pseudo-queries made from the corpus itself: a document's title is the query and its text (without the
  title) the positive passage; every passage of such a query is shown without its title (``field = "text"``).
  Titles shorter than ``min_title_words`` words or shared by several documents are skipped.

Negatives are the BM25 top ``depth`` hits (a real Lucene index over the corpus, built and searched with Pyserini's
own CLIs through :mod:`matryoshka.pipeline`) minus the positives. BM25 is searched to ``score_depth`` so most
positives get their BM25 score too (the fusion teacher needs it).

CLI::

    python -m matryoshka.training.mining --data_dir data/scifact --split train --output runs/train/scifact-train
"""

from __future__ import annotations

import logging
import random
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matryoshka.errors import OptionError, cli_main
from matryoshka.io import Document, load_beir, read_run, write_topics
from matryoshka.pipeline import bm25_search, prepare_beir
from matryoshka.training.data import TrainingDataError, TrainingQuery, write_training_set

logger = logging.getLogger(__name__)
QUERY_KINDS = ("qrels", "titles")
TITLE_PREFIX = "title-"


@dataclass
class MiningArguments:
    data_dir: str = field(metadata={"help": "BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"})
    output: str = field(metadata={"help": "training-set folder to write (atomically)"})
    split: str = field(default="train", metadata={"help": "qrels split whose queries are trained on"})
    queries: str = field(default="qrels", metadata={"help": "'qrels' (judged queries) or 'titles' (pseudo-queries)"})
    depth: int = field(default=100, metadata={"help": "BM25 hits kept as negative candidates (positives excluded)"})
    score_depth: int = field(default=1000, metadata={"help": "BM25 search depth, for the positives' BM25 scores"})
    min_title_words: int = field(default=4, metadata={"help": "titles mode: shortest title used as a query"})
    max_queries: int = field(default=0, metadata={"help": "keep a seeded sample of this many queries (0: all)"})
    seed: int = field(default=0, metadata={"help": "seed of the query sample"})
    work_dir: str = field(default="runs/work", metadata={"help": "Pyserini collection/index/topics/run folder"})
    threads: int = field(default=2, metadata={"help": "Pyserini indexing/search threads"})
    name: str = field(default="", metadata={"help": "name recorded in meta.json (default: <data>-<split|titles>)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})

    def __post_init__(self) -> None:
        if self.queries not in QUERY_KINDS:
            raise OptionError("queries", self.queries, f"one of {list(QUERY_KINDS)}")
        if self.depth < 1:
            raise OptionError("depth", self.depth, "a positive number of negative candidates")
        if self.score_depth < self.depth:
            raise OptionError("score_depth", self.score_depth, f">= depth ({self.depth})")
        if self.max_queries < 0:
            raise OptionError("max_queries", self.max_queries, ">= 0 (0 keeps all queries)")


def judged_queries(queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]], source: str
                   ) -> dict[str, tuple[str, dict[str, int]]]:
    """``qid -> (text, {docid: grade > 0})`` for every query with at least one positive; error when none has."""
    out = {qid: (queries[qid], {d: int(g) for d, g in judged.items() if g > 0}) for qid, judged in qrels.items()}
    out = {qid: value for qid, value in out.items() if value[1]}
    if not out:
        raise TrainingDataError(f"{source}: the training split has no query with a positive (relevance > 0); "
                                "choose a split with judgments")
    return out


def title_queries(corpus: Mapping[str, Document], min_words: int) -> dict[str, tuple[str, dict[str, int]]]:
    """Pseudo-queries: each unique title of at least ``min_words`` words, for its own document."""
    counts = Counter(" ".join(doc.title.lower().split()) for doc in corpus.values())
    out = {}
    for doc in corpus.values():
        title = " ".join(doc.title.split())
        if len(title.split()) >= min_words and counts[title.lower()] == 1 and doc.text.strip():
            out[TITLE_PREFIX + doc.docid] = (title, {doc.docid: 1})
    if not out:
        raise TrainingDataError(f"no document has a unique title of >= {min_words} words: cannot make title queries")
    return out


def sample_queries(queries: dict[str, tuple[str, dict[str, int]]], limit: int, seed: int
                   ) -> dict[str, tuple[str, dict[str, int]]]:
    if not limit or limit >= len(queries):
        return queries
    keep = set(random.Random(seed).sample(sorted(queries), limit))
    return {qid: value for qid, value in queries.items() if qid in keep}


def mine(args: MiningArguments) -> tuple[list[TrainingQuery], dict[str, Document]]:
    """Search BM25 for the queries and keep the top ``depth`` non-positive hits as candidates (see module doc).

    Returns the training queries and the corpus."""
    work = Path(args.work_dir)
    if args.queries == "qrels":
        dataset = load_beir(args.data_dir, args.split)  # checks every judged doc is in the corpus
        wanted = judged_queries(dataset.queries, dataset.qrels, str(Path(args.data_dir) / "qrels" / args.split))
        tag, field_name = args.split, "contents"
    else:
        dataset = load_beir(args.data_dir, args.split)
        wanted = title_queries(dataset.corpus, args.min_title_words)
        tag, field_name = "titles", "text"
    wanted = sample_queries(wanted, args.max_queries, args.seed)
    prepared = prepare_beir(args.data_dir, args.split, work, threads=args.threads)
    name = args.name or f"{Path(args.data_dir).name}-{tag}"
    topics = work / "topics" / f"mining-{name}.tsv"
    write_topics(topics, {qid: text for qid, (text, _pos) in wanted.items()})
    run_path = work / "runs" / f"mining-{name}-bm25-{args.score_depth}.txt"
    logger.info("BM25 search of %d %s queries to depth %d", len(wanted), args.queries, args.score_depth)
    bm25_search(prepared.index_dir, topics, run_path, hits=args.score_depth, threads=args.threads)
    return build_queries(wanted, read_run(run_path).queries, args.depth, field_name), dataset.corpus


def build_queries(wanted: Mapping[str, tuple[str, Mapping[str, int]]], hits: Mapping[str, Sequence],
                  depth: int, field_name: str = "contents") -> list[TrainingQuery]:
    """Turn BM25 hits (``qid -> [RunEntry]`` in rank order) into training queries; positives never become
    candidates. Queries without any candidate are dropped (logged)."""
    out: list[TrainingQuery] = []
    dropped = 0
    for qid, (text, positives) in wanted.items():
        entries = hits.get(qid, [])
        candidates = [e.docid for e in entries if e.docid not in positives][:depth]
        if not candidates:
            dropped += 1
            continue
        keep = set(candidates) | set(positives)
        bm25 = {e.docid: float(e.score) for e in entries if e.docid in keep}
        out.append(TrainingQuery(qid, text, dict(positives), tuple(candidates), bm25, field_name))
    if dropped:
        logger.warning("%d queries dropped: BM25 returned no candidate besides their positives", dropped)
    if not out:
        raise TrainingDataError("no query has a BM25 candidate besides its positives: nothing to train on")
    return out


def run(args: MiningArguments) -> Path:
    queries, corpus = mine(args)
    meta = {"name": args.name or f"{Path(args.data_dir).name}-{args.split if args.queries == 'qrels' else 'titles'}",
            "source": str(Path(args.data_dir).resolve()), "split": args.split, "queries": args.queries,
            "depth": args.depth, "score_depth": args.score_depth, "retriever": "pyserini-bm25-flat"}
    return write_training_set(args.output, queries, corpus, meta, overwrite=args.overwrite)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from matryoshka.training.arguments import parse_arguments

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = parse_arguments((MiningArguments,), argv, prog="python -m matryoshka.training.mining")
    out = run(args)
    print(f"training set written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
