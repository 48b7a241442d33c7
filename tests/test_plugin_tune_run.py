"""``python -m matryoshka tune --run RUN``: tune on any first stage's dev run (dense, hybrid), not only BM25."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from matryoshka import pipeline
from matryoshka.plugin.manifest import MANIFEST_NAME, load_manifest
from matryoshka.plugin.tune_cli import main as tune_main
from tests.fixtures.synthetic_model import build_synthetic_model

REPO = Path(__file__).resolve().parent.parent
QUERIES = {"q1": "insulin resistance", "q2": "dna repair", "q3": "vitamin d bone"}


@pytest.fixture()
def setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[list[str], Path]:
    lines = (REPO / "data" / "scifact-mini" / "corpus.jsonl").read_text().splitlines()[:30]
    corpus = {(d := json.loads(line))["_id"]: d["text"][:300] for line in lines}
    model = build_synthetic_model(tmp_path / "model", corpus.values())
    rng = np.random.default_rng(1)
    run_lines, qrels = [], {}
    for k, qid in enumerate(QUERIES):
        docs = list(corpus)[k * 10: k * 10 + 10]
        scores = {d: (5.0 if i in (6, 8) else 0.0) + float(rng.uniform(0, 3)) for i, d in enumerate(docs)}
        qrels[qid] = {docs[6]: 1, docs[8]: 2}
        ranked = sorted(scores.items(), key=lambda x: (-x[1], x[0]))
        run_lines += [f"{qid} Q0 {d} {r} {s:.5f} hybrid\n" for r, (d, s) in enumerate(ranked, start=1)]
    docs_ns = {d: SimpleNamespace(contents=t) for d, t in corpus.items()}
    prepared = SimpleNamespace(dataset=SimpleNamespace(corpus=docs_ns, queries=QUERIES, qrels=qrels),
                               index_dir=tmp_path / "index", topics=tmp_path / "topics.tsv")

    def no_bm25(*_: object, **__: object) -> Path:
        raise AssertionError("--run must replace the BM25 search")

    monkeypatch.setattr(pipeline, "prepare_beir", lambda data, split, work: prepared)
    monkeypatch.setattr(pipeline, "bm25_search", no_bm25)
    run = tmp_path / "hybrid-dev.trec"
    run.write_text("".join(run_lines))
    args = ["--model", str(model), "--data", str(tmp_path / "dev-data"), "--work", str(tmp_path / "work"),
            "--threads", "1", "--batch-size", "4", "--max-loss", "0.05", "--first-stage-weights", "0,0.5",
            "--depths", "all", "5", "--run", str(run), "--cache", str(tmp_path / "cache.npz")]
    return args, run


def test_tunes_on_the_given_run_and_says_so(setup, capsys: pytest.CaptureFixture[str],
                                            caplog: pytest.LogCaptureFixture) -> None:
    args, run = setup
    assert tune_main(args) == 0
    model = Path(args[1])
    policy = load_manifest(model, verify=True).policy
    assert policy.tuned_on["first_stage"] == "hybrid-dev.trec" and policy.tuned_on["hits"] == 10
    assert policy.first_stage_weight == 0.5  # the run's scores know the relevant documents
    assert "chosen: policy=" in capsys.readouterr().out
    caplog.set_level("INFO", logger="matryoshka.plugin")
    assert tune_main([*args, "--dry-run"]) == 0  # the same run: its recorded scores come from the cache
    assert "reusing the exit scores" in caplog.text
    caplog.clear()
    # another run (other scores) is another cache entry: re-recorded, not the cached scores of the first run
    run.write_text(run.read_text().replace(" 0.", " 1."))
    assert tune_main([*args, "--dry-run"]) == 0
    assert "reusing the exit scores" not in caplog.text and "recording exit scores" in caplog.text


def test_a_run_from_another_collection_is_refused(setup, capsys: pytest.CaptureFixture[str]) -> None:
    args, run = setup
    model = Path(args[1])
    before = (model / MANIFEST_NAME).read_bytes()
    run.write_text(run.read_text() + "q1 Q0 NOT-A-DOC 11 0.1 hybrid\n")
    assert tune_main(args) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "document 'NOT-A-DOC' of query 'q1' is not in" in err
    run.write_text("q9 Q0 x 1 0.1 hybrid\n")
    assert tune_main(args) == 2
    assert "query 'q9' is not in" in capsys.readouterr().err
    assert (model / MANIFEST_NAME).read_bytes() == before
    shutil.rmtree(model)


def test_says_when_the_cascade_does_not_beat_the_first_stage_alone(setup, capsys: pytest.CaptureFixture[str]
                                                                    ) -> None:
    args, run = setup
    # a perfect first stage: each query's grade-2 document first, its grade-1 document second
    lines = [line.split() for line in run.read_text().splitlines()]
    qrels, perfect = {}, []
    for qid in QUERIES:
        docs = sorted(fields[2] for fields in lines if fields[0] == qid)
        qrels[qid] = {docs[0]: 2, docs[1]: 1}
        perfect += [f"{qid} Q0 {d} {r} {10 - r}.0 hybrid\n" for r, d in enumerate(docs, start=1)]
    run.write_text("".join(perfect))
    pipeline.prepare_beir(None, None, None).dataset.qrels = qrels  # the fixture's stand-in, one object
    assert tune_main(args) == 0
    captured = capsys.readouterr()
    assert "first stage alone (hybrid-dev.trec): nDCG@10 1.0000" in captured.out
    assert "does not beat the first stage alone (1.0000)" in captured.err
    assert load_manifest(Path(args[1]), verify=True).policy.tuned_on["first_stage_ndcg10"] == 1.0


def test_the_model_is_checked_before_any_search(setup, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # issue 17 #16
    args, _ = setup

    def no_prepare(*_: object, **__: object) -> None:
        raise AssertionError("a bad --model must stop tune before the collection is indexed or searched")

    monkeypatch.setattr(pipeline, "prepare_beir", no_prepare)
    bad = [*args]
    bad[1] = str(tmp_path / "no-such-model")
    assert tune_main(bad) == 2
    assert "no-such-model" in capsys.readouterr().err
