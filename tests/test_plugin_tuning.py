"""Offline replay of the cascade (threshold tuning) equals real cascade runs; the choice respects the budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from matryoshka.errors import OptionError
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.policies import make_policy
from matryoshka.plugin.tuning import Recorded, SweepPoint, choose, record_exit_scores, replay, tune
from tests.fixtures.synthetic_model import build_synthetic_model

REPO = Path(__file__).resolve().parent.parent


def texts(limit: int = 80) -> tuple[list[str], list[str]]:
    docs = [json.loads(line)["text"][:400] for line in
            (REPO / "data" / "scifact-mini" / "corpus.jsonl").read_text().splitlines()[:limit]]
    queries = [json.loads(line)["text"] for line in
               (REPO / "data" / "scifact-mini" / "queries.jsonl").read_text().splitlines()[:4]]
    return queries, docs


@pytest.fixture(scope="module")
def cascade(tmp_path_factory: pytest.TempPathFactory) -> Cascade:
    queries, docs = texts()
    folder = build_synthetic_model(tmp_path_factory.mktemp("tune"), queries + docs, compression=(3, 2))
    return Cascade(folder, batch_size=7)


@pytest.mark.parametrize("policy, threshold", [("candidate", 0.6), ("candidate", 0.9), ("query", 0.2),
                                               ("topk", 0.7), ("topk", 0.5), ("candidate", 1.0)])
def test_replay_equals_real_cascade(cascade: Cascade, policy: str, threshold: float) -> None:
    queries, docs = texts()
    q = [queries[i % 4] for i in range(len(docs))]
    groups = np.array([i % 4 for i in range(len(docs))])
    recorded = record_exit_scores(cascade, q, docs, groups)
    assert recorded.shape == (len(docs), len(cascade.exits)) and np.isfinite(recorded).all()
    chosen = make_policy(policy, threshold, cascade.exits, 0.9, top_k=3)
    real = cascade.run(q, docs, chosen, groups)
    residual = [cascade.manifest.exit_calibration(e).residual_std for e in cascade.exits]
    scores, stages = replay(recorded, groups, chosen, cascade.exits, residual)
    np.testing.assert_array_equal(stages, real.exit_stage)
    np.testing.assert_allclose(scores, real.scores, rtol=0, atol=1e-6)
    if threshold < 1.0 and policy == "candidate" and threshold == 0.6:
        assert (stages < len(cascade.exits) - 1).any(), "the synthetic model should let some candidates exit"


def point(policy: str, threshold: float, rel: float, cost: float) -> SweepPoint:
    return SweepPoint(policy, threshold, 0.7 * rel, rel, 6 * cost, cost)


def test_choose_cheapest_within_loss_or_best_within_cost() -> None:
    points = [point("fixed", 0, 0.9, 0.33), point("candidate", 0.9, 0.995, 0.5), point("candidate", 0.8, 0.98, 0.3),
              point("query", 0.5, 0.992, 0.45), point("topk", 0.9, 1.0, 0.7)]
    assert choose(points, max_loss=0.01) == points[3]
    assert choose(points, max_loss=None, cost_target=0.5) == points[1]
    with pytest.raises(OptionError, match="looser budget"):
        choose([points[0], points[2]], max_loss=0.01)
    with pytest.raises(OptionError, match="exactly one"):
        choose(points, max_loss=0.01, cost_target=0.4)
    with pytest.raises(OptionError, match="relative loss"):
        choose(points, max_loss=1.5)


def test_tune_query_sample_is_seeded_judged_and_checked() -> None:
    from matryoshka.plugin.tune_cli import sample_queries

    candidates = {f"q{i}": [f"d{i}"] for i in range(10)}
    qrels = {f"q{i}": {f"d{i}": 1 if i % 3 else 0} for i in range(10)}  # q0, q3, q6, q9 have no relevant doc
    assert sample_queries(candidates, qrels, None, 0) is candidates
    a, b = sample_queries(candidates, qrels, 4, seed=1), sample_queries(candidates, qrels, 4, seed=1)
    assert a == b and len(a) == 4 and all(int(q[1:]) % 3 for q in a)
    assert list(a) == [q for q in candidates if q in a]  # run order kept
    assert sample_queries(candidates, qrels, 6, seed=0).keys() == {f"q{i}" for i in range(10) if i % 3}
    with pytest.raises(OptionError, match="--queries"):
        sample_queries(candidates, qrels, 7, seed=0)


def test_tune_cache_round_trip_key_mismatch_and_corrupt_file(tmp_path: Path) -> None:
    from matryoshka.errors import DataFormatError
    from matryoshka.plugin.tuning import Recorded

    rec = Recorded(["q1", "q1", "q2"], ["a", "b", "c"], np.array([0, 0, 1]), np.arange(6.0).reshape(3, 2), (3, 6),
                   (0.5, 0.0), np.array([0.5, 1.0]), np.array([3.0, 2.0, 1.0]))
    path = tmp_path / "cache.npz"
    rec.save(path, "key-1")
    back = Recorded.load(path, "key-1")
    assert back is not None and back.qids == rec.qids and back.docids == rec.docids and back.exits == (3, 6)
    np.testing.assert_array_equal(back.exit_scores, rec.exit_scores)
    np.testing.assert_array_equal(back.first_stage, rec.first_stage)
    assert back.residual_std == (0.5, 0.0)
    assert Recorded.load(path, "key-2") is None and Recorded.load(tmp_path / "absent.npz", "key-1") is None
    path.write_bytes(b"not numpy")
    with pytest.raises(DataFormatError, match="not a tuning cache"):
        Recorded.load(path, "key-1")


def test_tune_compares_with_the_first_stage_alone() -> None:
    # one query; the reranker ranks the relevant document first, the first stage last
    qrels = {"q": {"d3": 1}}
    scores = np.array([[0.0], [1.0], [2.0]])

    def recorded(first: np.ndarray | None) -> Recorded:
        return Recorded(["q"] * 3, ["d1", "d2", "d3"], np.zeros(3, dtype=np.int64), scores, (6,), (0.1,),
                        np.array([1.0]), first)
    result = tune(recorded(np.array([3.0, 2.0, 1.0])), qrels, [0.0], depths=[None], max_loss=0.5)
    assert result.first_stage_ndcg == pytest.approx(0.5) and result.best.ndcg10 == pytest.approx(1.0)
    assert result.adds_to_first_stage is True
    unscored = tune(recorded(None), qrels, [0.0], depths=[None], max_loss=0.5)
    assert unscored.first_stage_ndcg is None and unscored.adds_to_first_stage is None
