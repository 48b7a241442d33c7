"""benchmarks/cascade_gain.py: nDCG@10 by first-stage weight, split by queries whose relevant documents were seen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import cascade_gain
from benchmarks.cascade_gain import depth_rows, gain_rows, render, seen_queries
from matryoshka.metrics import ndcg_at_k
from matryoshka.plugin import tuning
from matryoshka.plugin.tuning import Recorded
from tests.fixtures.synthetic_model import build_synthetic_model

REPO = Path(__file__).resolve().parent.parent


def test_seen_queries_need_a_relevant_document_relevant_in_training() -> None:
    qrels = {"a": {"d1": 1, "d2": 0}, "b": {"d2": 1}, "c": {"d3": 2}}
    train = {"t1": {"d1": 1}, "t2": {"d2": 0, "d3": 1}}
    # b's relevant d2 was judged in training, but not relevant: not seen
    assert seen_queries(qrels, train) == {"a", "c"}


def recorded_two_queries() -> Recorded:
    # query q1: the reranker is right (d2 relevant), q2: the first stage is right (e1 relevant)
    docids = ["d1", "d2", "d3", "e1", "e2", "e3"]
    model = np.array([0.0, 2.0, 1.0, 0.0, 2.0, 1.0])
    first = np.array([3.0, 2.0, 1.0, 3.0, 2.0, 1.0])
    return Recorded(["q1"] * 3 + ["q2"] * 3, docids, np.array([0, 0, 0, 1, 1, 1]), model[:, None], (6,), (0.1,),
                    np.array([1.0]), first)


def test_gain_rows_are_the_reranker_at_0_and_the_first_stage_at_1() -> None:
    recorded = recorded_two_queries()
    qrels = {"q1": {"d2": 1}, "q2": {"e1": 1}}
    rows = gain_rows(recorded, qrels, [0.0, 1.0], {"all": {"q1", "q2"}, "seen": {"q2"}})
    model_run = recorded.to_run(recorded.exit_scores[:, 0])
    first_run = recorded.to_run(recorded.first_stage)
    assert rows[0]["W"] == 0.0 and rows[0]["all"] == pytest.approx(ndcg_at_k(model_run, qrels))
    assert rows[1]["all"] == pytest.approx(ndcg_at_k(first_run, qrels))
    # on q2 alone the first stage is perfect and the reranker is not
    assert rows[1]["seen"] == pytest.approx(1.0) and rows[0]["seen"] < 1.0


def test_render_marks_each_columns_best_and_the_gain_over_the_first_stage() -> None:
    rows = [{"W": 0.0, "all": 0.5}, {"W": 0.5, "all": 0.7}, {"W": 1.0, "all": 0.6}]
    by_depth = [{"depth": 10, "W": 1.0, "nDCG@10": 0.6}, {"depth": 20, "W": 0.5, "nDCG@10": 0.7}]
    text = render([("hybrid top 20, scifact test", {"all": 3}, rows, by_depth)], "python benchmarks/cascade_gain.py")
    assert "| 0.5 | **0.7000** |" in text and "| 1 (first stage alone) | 0.6000 |" in text
    assert "all: best W adds +0.1000 over the first stage alone." in text
    assert "all (3 queries)" in text
    assert "| depth | best W | nDCG@10 |\n|---:|---:|---:|\n| 10 | 1 | 0.6000 |\n| 20 | 0.5 | 0.7000 |" in text


def test_depth_one_keeps_the_first_stage_order_and_full_depth_is_the_w_table() -> None:
    recorded = recorded_two_queries()
    qrels = {"q1": {"d2": 1}, "q2": {"e1": 1}}
    first = ndcg_at_k(recorded.to_run(recorded.first_stage), qrels)
    rows = depth_rows(recorded, qrels, [0.0, 0.5, 1.0], [1, 3])
    # depth 1 rescoring only each query's first candidate cannot reorder anything: every W ties, the smallest wins
    assert rows[0] == {"depth": 1, "W": 0.0, "nDCG@10": pytest.approx(first)}
    best = max(r["all"] for r in gain_rows(recorded, qrels, [0.0, 0.5, 1.0], {"all": {"q1", "q2"}}))
    assert rows[1]["depth"] == 3 and rows[1]["nDCG@10"] == pytest.approx(best)


@pytest.fixture()
def collection(tmp_path: Path) -> tuple[Path, Path, Path]:
    lines = (REPO / "data" / "scifact-mini" / "corpus.jsonl").read_text().splitlines()[:20]
    docs = [json.loads(line) for line in lines]
    data = tmp_path / "data"
    (data / "qrels").mkdir(parents=True)
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": d["_id"], "title": "", "text": d["text"][:200]})
                                               + "\n" for d in docs))
    queries = {"q1": "insulin resistance", "q2": "dna repair", "t1": "training query"}
    (data / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                for q, t in queries.items()))
    ids = [d["_id"] for d in docs]
    (data / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\nq1\t{ids[3]}\t1\nq2\t{ids[14]}\t1\n")
    (data / "qrels" / "train.tsv").write_text(f"query-id\tcorpus-id\tscore\nt1\t{ids[3]}\t1\n")
    run = tmp_path / "run.txt"
    run.write_text("".join(f"{q} Q0 {d} {r + 1} {20 - r}.5 first\n"
                           for q, block in (("q1", ids[:12]), ("q2", ids[8:20])) for r, d in enumerate(block)))
    model = build_synthetic_model(tmp_path / "model", [d["text"][:200] for d in docs] + list(queries.values()))
    return data, run, model


def test_report_from_a_real_cascade_and_the_cache(collection, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data, run, model = collection
    out = tmp_path / "report.md"
    args = ["--model", str(model), "--data", str(data), "--runs", str(run), "--depth", "10", "--weights", "0", "1",
            "--labels", "hybrid",
            "--cache", str(tmp_path / "cache"), "--output", str(out), "--threads", "1"]
    assert cascade_gain.main(args) == 0
    text = out.read_text()
    # q1's relevant document is a training positive, q2's is not; W = 1 is the run's own order cut at 10
    assert "## hybrid top 10, data test" in text
    assert "all (2 queries) | seen (1 queries) | unseen (1 queries)" in text
    first = (1 / np.log2(5) + 1 / np.log2(8)) / 2  # ranks 4 and 7 of the cut run
    assert f"| 1 (first stage alone) | {first:.4f} |" in text.replace("**", "")
    # the second report reuses the recorded exit scores
    monkeypatch.setattr(tuning, "record_run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recorded")))
    out.unlink()
    assert cascade_gain.main(args) == 0 and out.read_text() == text


def test_bad_input_names_the_problem_and_writes_nothing(collection, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data, run, model = collection
    out = tmp_path / "report.md"
    base = ["--model", str(model), "--data", str(data), "--cache", str(tmp_path / "cache"), "--output", str(out)]
    assert cascade_gain.main([*base, "--runs", str(run), str(run)]) == 2
    assert "one run per --data folder" in capsys.readouterr().err
    assert cascade_gain.main([*base, "--runs", str(run), "--labels", "a", "b"]) == 2
    assert "one label, or one per run (1)" in capsys.readouterr().err
    assert cascade_gain.main([*base, "--runs", str(run), "--depth", "5"]) == 2
    assert "--depth" in capsys.readouterr().err
    assert cascade_gain.main([*base, "--runs", str(run), "--depth", "12", "--depths", "12"]) == 2
    assert "rerank depths in 1..11" in capsys.readouterr().err
    stray = tmp_path / "stray.txt"
    stray.write_text(run.read_text() + "q2 Q0 not-a-doc 13 0.1 first\n")
    assert cascade_gain.main([*base, "--runs", str(stray), "--depth", "20"]) == 2
    assert "'not-a-doc'" in capsys.readouterr().err
    assert cascade_gain.main([*base, "--runs", str(run), "--seen-from", "dev"]) == 2
    assert "available splits: test, train" in capsys.readouterr().err
    assert not out.exists()


def test_no_split_when_every_query_is_seen(collection, tmp_path: Path) -> None:
    data, run, model = collection
    test_qrels = (data / "qrels" / "test.tsv").read_text()
    (data / "qrels" / "train.tsv").write_text(test_qrels.replace("q1\t", "t1\t").replace("q2\t", "t2\t"))
    out = tmp_path / "report.md"
    assert cascade_gain.main(["--model", str(model), "--data", str(data), "--runs", str(run), "--depth", "10",
                              "--cache", str(tmp_path / "cache"), "--output", str(out), "--threads", "1"]) == 0
    text = out.read_text()
    assert "| W | all (2 queries) |\n" in text and "seen" not in text.split("## ")[1]
