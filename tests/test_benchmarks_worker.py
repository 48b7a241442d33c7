"""benchmarks/rerank_benchmark.py's timed worker: its tuned-default configuration is exactly what the plugin runs
(the manifest's policy, rerank depth and first-stage fusion), and a fixed exit scores every candidate at that exit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_worker import _worker
from matryoshka.plugin.api import MatryoshkaReranker
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.manifest import load_manifest, write_manifest
from matryoshka.plugin.policies import make_policy
from tests.fixtures.synthetic_model import build_synthetic_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("worker")
    lines = (REPO / "data" / "scifact-mini" / "corpus.jsonl").read_text().splitlines()[:20]
    docs = {(d := json.loads(line))["_id"]: d["text"][:300] for line in lines}
    model = build_synthetic_model(tmp / "model", docs.values(), threshold=0.8)
    manifest = load_manifest(model)
    policy = dataclasses.replace(manifest.policy, name="topk", threshold=0.6, first_stage_weight=0.3, depth=6)
    write_manifest(model, dataclasses.replace(manifest, policy=policy))
    ids = list(docs)
    rng = np.random.default_rng(0)
    queries = {}
    for k, (qid, text) in enumerate((("q1", "insulin resistance"), ("q2", "dna repair"))):
        docids = ids[k * 10: k * 10 + 10]
        scores = sorted(rng.uniform(0, 10, len(docids)).tolist(), reverse=True)
        queries[qid] = {"text": text, "docids": docids, "passages": [docs[d] for d in docids], "first_stage": scores}
    cache = tmp / "cache.json"
    cache.write_text(json.dumps({"queries": queries}))
    return model, cache, queries


def test_default_is_the_plugin_with_the_manifest_policy_depth_and_fusion(setup, tmp_path: Path) -> None:
    model, cache, queries = setup
    _worker("default", model, None, cache, tmp_path / "out.json", 1, 4)
    out = json.loads((tmp_path / "out.json").read_text())
    reranker = MatryoshkaReranker(model, threads=1, batch_size=4)
    assert (reranker.policy.name, reranker.depth, reranker.first_stage_weight) == ("topk", 6, 0.3)
    for qid, entry in queries.items():
        expected = reranker.rerank_query(entry["text"], entry["docids"], entry["passages"],
                                         first_stage_scores=entry["first_stage"])
        np.testing.assert_allclose([out["run"][qid][d] for d in entry["docids"]],
                                   [expected[d] for d in entry["docids"]], atol=1e-6)
    layers = np.asarray(out["layers"]).reshape(2, 10)
    assert (layers[:, 6:] == 0).all() and (layers[:, :6] > 0).all()  # below the depth: never scored
    assert len(out["seconds"]) == 2 and out["peak_mib"] > 0


def test_fixed_exit_scores_every_candidate_at_that_exit(setup, tmp_path: Path) -> None:
    model, cache, queries = setup
    _worker("fixed:4", model, None, cache, tmp_path / "out.json", 1, 4)
    out = json.loads((tmp_path / "out.json").read_text())
    chain = Cascade(model, threads=1, batch_size=4)
    for qid, entry in queries.items():
        res = chain.run([entry["text"]] * 10, entry["passages"], make_policy("fixed", None, chain.exits, 1.0,
                                                                              exit_layer=4))
        np.testing.assert_allclose([out["run"][qid][d] for d in entry["docids"]], res.scores, atol=1e-6)
    assert set(out["layers"]) == {4.0}


def test_frontier_keeps_only_points_no_cheaper_point_matches() -> None:
    from benchmarks.bench_report import frontier

    def point(policy: str, cost: float, ndcg: float, depth: int | None = None) -> dict:
        return {"policy": policy, "threshold": 0.9, "depth": depth, "ndcg10": ndcg, "mean_layers": 6 * cost,
                "relative_cost": cost}

    points = [point("candidate", 0.5, 0.30), point("query", 0.6, 0.29), point("topk", 0.7, 0.31),
              point("candidate", 0.2, 0.28, depth=20), point("fixed", 1.0, 0.31)]
    rows = frontier(points, full=0.31)
    assert [r.split(" | ")[0] for r in rows] == ["| candidate", "| candidate", "| topk"]
    assert "| 20 |" in rows[0] and "| all |" in rows[1] and "100.0%" in rows[2]


def test_datasets_are_found_under_data_roots_or_refused_in_one_line(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import bench_worker, segment_eval

    monkeypatch.setattr(bench_worker, "DATA_ROOTS", list(bench_worker.DATA_ROOTS))
    (tmp_path / "classic" / "tiny").mkdir(parents=True)
    (tmp_path / "classic" / "tiny" / "corpus.jsonl").write_text('{"_id": "d", "text": "t"}\n')
    with pytest.raises(SystemExit, match=r"--data-root .*nowhere is not a folder"):
        bench_worker.set_data_roots([tmp_path / "nowhere"])
    bench_worker.set_data_roots([tmp_path])
    assert bench_worker.dataset_dir("tiny") == tmp_path / "classic" / "tiny"
    assert bench_worker.dataset_dir("scifact-mini") == REPO / "data" / "scifact-mini"   # data/ comes first
    with pytest.raises(SystemExit) as missing:
        segment_eval.main(["--encoder", "x", "--datasets", "absent", "--data-root", str(tmp_path),
                           "--output", str(tmp_path / "out.md"), "--work", str(tmp_path / "work")])
    message = str(missing.value)
    assert "'absent' not found" in message and str(tmp_path) in message and "--data-root" in message
    assert "\n" not in message and not (tmp_path / "out.md").exists()
