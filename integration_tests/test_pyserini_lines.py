"""What must hold on BOTH Pyserini lines (1.6 on Python 3.11, 2.x on 3.12+; scripts/test.sh runs this file on each):
BM25 + the bundled default model through ``pyserini.search.lucene --reranker matryoshka``, scored by
``pyserini.eval.trec_eval``, pinned to one nDCG@10; ``python -m matryoshka rerank`` of Pyserini's own BM25 run writes
the same bytes; a JVM that cannot start is reported, not hidden."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from integration_tests.test_plugin_pyserini import cli, env, leftovers
from matryoshka._bootstrap import pyserini_major

pytestmark = pytest.mark.both_lines

# BM25 top-100 of the 30 scifact-mini test queries, the top 10 reranked by the bundled default model as shipped
# (int8 stages, tuned policy and fusion), trec_eval -c. BM25 alone: 0.7682 (test_pyserini_backend.py).
RERANKED_NDCG10 = 0.7844
DEPTH = 10


def ndcg10(qrels: Path, run: Path) -> float:
    out = cli("pyserini.eval.trec_eval", "-c", "-m", "ndcg_cut.10", qrels, run).stdout
    match = re.search(r"^ndcg_cut_10\s+all\s+(\S+)$", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


def test_default_model_through_pyserini_pins_ndcg_and_equals_the_rerank_cli(
        tmp_path: Path, scifact_mini_index: Path, scifact_mini_topics: Path, scifact_mini_bm25_run: Path,
        scifact_mini_qrels: Path) -> None:
    inline, offline = tmp_path / "inline.txt", tmp_path / "offline.txt"
    cli("pyserini.search.lucene", "--index", scifact_mini_index, "--topics", scifact_mini_topics, "--bm25",
        "--hits", 100, "--threads", 1, "--output", inline, "--reranker", "matryoshka", "--matryoshka.depth", DEPTH,
        "--matryoshka.threads", 2)
    assert ndcg10(scifact_mini_qrels, inline) == pytest.approx(RERANKED_NDCG10, abs=1e-4)
    assert ndcg10(scifact_mini_qrels, scifact_mini_bm25_run) == pytest.approx(0.7682, abs=1e-4)
    cli("matryoshka", "rerank", "--run", scifact_mini_bm25_run, "--topics", scifact_mini_topics, "--index",
        scifact_mini_index, "--output", offline, "--tag", "Anserini-matryoshka", "--depth", DEPTH, "--threads", 2)
    assert offline.read_bytes() == inline.read_bytes()
    assert leftovers(tmp_path) == []


def test_a_jvm_that_cannot_start_is_reported(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", "import pyserini.search.lucene"], capture_output=True, text=True,
                          env=env(JAVA_TOOL_OPTIONS="-Xmatryoshka-bogus-option"), cwd=tmp_path)
    assert proc.returncode != 0
    if pyserini_major() == 1:  # 1.6 lets the JVM print its own complaint
        assert "-Xmatryoshka-bogus-option" in proc.stderr, proc.stderr[-2000:]
    else:  # 2.x swallows the JVM's stderr: the start-up hook says what happened and how to see more
        assert "error: Pyserini's JVM did not start" in proc.stderr, proc.stderr[-2000:]
        assert "PYSERINI_VERBOSE_JVM=1" in proc.stderr
