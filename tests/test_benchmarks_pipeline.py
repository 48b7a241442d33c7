"""benchmarks/dense_pipeline.py: the run cut for cascade tuning and the Pyserini command lines of each first stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import pipeline_stages
from benchmarks.dense_pipeline import Pipeline
from benchmarks.pipeline_stages import FirstStage, truncate_run


def test_truncate_run_keeps_each_querys_first_lines_in_order() -> None:
    lines = [f"{q} Q0 d{i} {i + 1} {10 - i} tag\n" for q in ("1", "2") for i in range(5)]
    lines.insert(3, "\n")
    kept = truncate_run(lines, 2)
    assert kept == [lines[0], lines[1], lines[6], lines[7]]
    assert truncate_run(lines, 10) == [line for line in lines if line.strip()]


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Pipeline, list[list[str]]]:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path, env: dict | None = None) -> None:
        calls.append(cmd[1:])
        output = Path(cmd[cmd.index("--output") + 1])
        output.write_text("1 Q0 d1 1 1.0 x\n", encoding="utf-8")

    monkeypatch.setattr(pipeline_stages, "run", fake_run)
    args = argparse.Namespace(hits=100, threads=2)
    return Pipeline(args, tmp_path / "log"), calls


def test_retrieve_builds_each_first_stage_command(pipeline, tmp_path: Path) -> None:
    pipe, calls = pipeline
    prepared = SimpleNamespace(index_dir=tmp_path / "lucene", topics=tmp_path / "topics.tsv")
    flags = ("--encoder", "enc", "--pooling", "mean")
    rerank = ["--reranker", "matryoshka", "--matryoshka.first-stage-weight", 0.6]
    out = pipe.retrieve(FirstStage("h", "hybrid-x-0.02", "pyserini.search.hybrid", flags, tmp_path / "faiss", 0.02),
                        prepared, tmp_path / "runs" / "h.txt", rerank)
    cmd = calls[-1]
    assert out.read_text() == "1 Q0 d1 1 1.0 x\n" and not list(out.parent.glob(".*partial"))
    assert cmd[:2] == ["-m", "pyserini.search.hybrid"]
    # sub-commands in Pyserini's order, the reranker flags after 'run'
    assert [cmd.index(w) for w in ("dense", "sparse", "fusion", "run")] == sorted(
        cmd.index(w) for w in ("dense", "sparse", "fusion", "run"))
    assert cmd[cmd.index("--alpha") + 1] == "0.02" and cmd[-2:] == ["--matryoshka.first-stage-weight", "0.6"]
    assert cmd.index("--reranker") > cmd.index("run")

    pipe.retrieve(FirstStage("d", "dense-x", "pyserini.search.faiss", flags, tmp_path / "faiss"), prepared,
                  tmp_path / "runs" / "d.txt", rerank)
    cmd = calls[-1]
    assert cmd[cmd.index("--index") + 1] == str(tmp_path / "faiss")
    assert cmd[-2:] == ["--matryoshka.index", str(tmp_path / "lucene")]  # passages for the reranker
    assert "--bm25" not in cmd and "--encoder" in cmd

    pipe.retrieve(FirstStage("BM25", "bm25", "pyserini.search.lucene"), prepared, tmp_path / "runs" / "b.txt")
    cmd = calls[-1]
    assert cmd[cmd.index("--index") + 1] == str(tmp_path / "lucene") and "--bm25" in cmd
    assert "--reranker" not in cmd and "--matryoshka.index" not in cmd

    # an existing output is reused, no command run
    n = len(calls)
    pipe.retrieve(FirstStage("BM25", "bm25", "pyserini.search.lucene"), prepared, tmp_path / "runs" / "b.txt")
    assert len(calls) == n


def test_a_given_model_reports_the_selection_saved_with_it(pipeline, tmp_path: Path) -> None:
    pipe, calls = pipeline
    given = tmp_path / "selected"
    given.mkdir()
    pipe.args.fine_tuned = given
    assert pipe.fine_tuned() == (given, {"given": str(given)})
    summary = {"best": "run/checkpoint-9/model @ soup 0.75", "results": {"base": {"nDCG@10": 0.3}}}
    (given / "selection.json").write_text(json.dumps(summary), encoding="utf-8")
    assert pipe.fine_tuned() == (given, summary) and not calls  # nothing trained or selected again
