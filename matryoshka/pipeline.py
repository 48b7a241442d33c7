"""Drive Pyserini's own command-line tools on BEIR-layout data: index, BM25 search, trec_eval.

Everything goes through ``python -m pyserini.*`` in a subprocess (the same commands a user types), with the
interpreter that runs this code, so the start-up adapter (``matryoshka._bootstrap``) supplies Java 21 and the other
fixes. Outputs are written atomically: an index folder or a run file appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matryoshka.errors import MatryoshkaError
from matryoshka.io import atomic_directory, load_beir, write_jsonl_collection, write_topics, write_trec_qrels
from matryoshka.io.beir import BeirDataset
from matryoshka.io.pyserini_topics import pyserini_topics, restore_qids
from matryoshka.io.trec import read_topics

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
DEFAULT_MEASURES = ("ndcg_cut.10", "recip_rank", "recall.100")


class PyseriniCommandError(MatryoshkaError):
    """A Pyserini command exited with an error."""


def run_pyserini(module: str, args: Sequence[str], quiet: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> <args>``; raise with the command's last output lines on failure."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise PyseriniCommandError(f"{' '.join(cmd[1:4])} ... failed with exit code {proc.returncode}:\n{tail}")
    if not quiet:
        sys.stderr.write(proc.stderr)
    return proc


def build_lucene_index(collection_dir: PathLike, index_dir: PathLike, threads: int = 2) -> Path:
    """Index a JsonCollection folder with positions, doc vectors and raw documents (needed by the reranker)."""
    with atomic_directory(index_dir, overwrite=True) as tmp:
        run_pyserini("pyserini.index.lucene", [
            "-collection", "JsonCollection", "-input", collection_dir, "-index", tmp,
            "-generator", "DefaultLuceneDocumentGenerator", "-threads", threads,
            "-storePositions", "-storeDocvectors", "-storeRaw"])
    return Path(index_dir)


def bm25_search(index_dir: PathLike, topics: PathLike, output: PathLike, hits: int = 100, threads: int = 2,
                extra: Sequence[str] = ()) -> Path:
    """``python -m pyserini.search.lucene --bm25``; the run appears at ``output`` only when the search succeeded.
    Pyserini reads a neutral TSV copy of ``topics`` and the run keeps their ids as written (``001`` stays ``001``)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    try:
        with pyserini_topics(read_topics(topics), topics) as (neutral, back):
            run_pyserini("pyserini.search.lucene", [
                "--index", index_dir, "--topics", neutral, "--output", tmp, "--bm25", "--hits", hits,
                "--threads", threads, "--batch-size", 64, *extra])
        restore_qids(tmp, back)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def trec_eval(qrels: PathLike, run: PathLike, measures: Sequence[str] = DEFAULT_MEASURES,
              mrr_depth: int | None = 10) -> dict[str, float]:
    """``python -m pyserini.eval.trec_eval -c`` on each measure; returns {measure: value}.

    ``recip_rank`` is computed at ``mrr_depth`` (``-M``), i.e. MRR@10 by default.
    """
    results: dict[str, float] = {}
    for measure in measures:
        args = ["-c", "-m", measure]
        if measure == "recip_rank" and mrr_depth:
            args = ["-c", "-M", str(mrr_depth), "-m", measure]
        proc = run_pyserini("pyserini.eval.trec_eval", [*args, qrels, run])
        for line in proc.stdout.splitlines():
            match = re.match(r"^(\S+)\s+all\s+(\S+)$", line.strip())
            if match:
                results[match.group(1)] = float(match.group(2))
    expected = {m.split(".")[0] + ("_" + m.split(".")[1] if "." in m else "") for m in measures}
    missing = expected - set(results)
    if missing:
        raise PyseriniCommandError(f"trec_eval printed no value for {sorted(missing)} (run {run}, qrels {qrels})")
    return results


@dataclass
class PreparedCollection:
    """A BEIR split made ready for Pyserini: collection, index, topics TSV and TREC qrels."""

    dataset: BeirDataset
    collection_dir: Path
    index_dir: Path
    topics: Path
    qrels: Path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def prepare_beir(data_dir: PathLike, split: str, work_dir: PathLike, threads: int = 2) -> PreparedCollection:
    """Convert a BEIR folder for Pyserini and index it, reusing earlier outputs for the same corpus file."""
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    dataset = load_beir(data_dir, split)
    corpus_file = data_dir / "corpus.jsonl"
    key = f"{data_dir.name}-{_fingerprint(corpus_file)}"
    collection_dir = work_dir / "collections" / key
    index_dir = work_dir / "indexes" / key
    if not (collection_dir / "docs.jsonl").is_file():
        write_jsonl_collection(dataset.corpus, collection_dir)
    if not (index_dir / "segments_1").exists() and not any(index_dir.glob("segments_*")):
        logger.info("indexing %d documents of %s", len(dataset.corpus), data_dir)
        build_lucene_index(collection_dir, index_dir, threads=threads)
    topics = work_dir / "topics" / f"{data_dir.name}-{split}.tsv"
    qrels = work_dir / "qrels" / f"{data_dir.name}-{split}.txt"
    write_topics(topics, dataset.split_queries)
    write_trec_qrels(qrels, dataset.qrels)
    return PreparedCollection(dataset, collection_dir, index_dir, topics, qrels)
