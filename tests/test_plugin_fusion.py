"""Interpolation with the first-stage score (``first_stage_weight``): the formula, the manifest field, the runtime
(MatryoshkaReranker) and the tuning (weight chosen on fused full depth, replay with the same fusion, written into the
manifest). Models are synthetic (TEST FIXTURE): scores mean nothing, only the plumbing and the arithmetic are
checked."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from matryoshka.errors import OptionError
from matryoshka.metrics import ndcg_at_k
from matryoshka.plugin.api import MatryoshkaReranker
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.fusion import FirstStageScoreError, check_first_stage_weight, check_fusion, fuse, minmax, znorm
from matryoshka.plugin.manifest import MANIFEST_NAME, ManifestError, load_manifest, write_manifest
from matryoshka.plugin.policies import make_policy
from matryoshka.plugin.tune_cli import build_parser as tune_parser
from matryoshka.plugin.tune_cli import main as tune_main
from matryoshka.plugin.tune_cli import write_choice
from matryoshka.plugin.tuning import choose_weight, record_run, sweep, tune
from tests.fixtures.synthetic_model import build_synthetic_model
from tests.test_plugin_manifest import _edit, make_folder

DATA = Path(__file__).resolve().parent.parent / "data" / "scifact-mini"


def z(values: list[float]) -> list[float]:
    """An independent z-score (statistics module), to check fuse() against."""
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    return [(v - mean) / std for v in values]


# ------------------------------------------------------------------------------------------------ the formula
def test_fuse_hand_made_numbers() -> None:
    model, first = [1.0, 2.0, 4.0], [10.0, 30.0, 20.0]
    expected = [0.7 * a + 0.3 * b for a, b in zip(z(model), z(first), strict=True)]
    np.testing.assert_allclose(fuse(model, first, 0.3), expected, rtol=0, atol=1e-12)
    # z(model) = [-1.069, -0.267, 1.336], z(first) = [-1.225, 1.225, 0]: spelled out once
    np.testing.assert_allclose(fuse(model, first, 0.3), [-1.1157, 0.1804, 0.9354], atol=1e-4)


def test_minmax_fusion_hand_made_numbers() -> None:
    """``fusion="minmax"`` is the training-free fusion: 0.7 * minmax(model) + 0.3 * minmax(first stage)."""
    model, first = [1.0, 2.0, 4.0], [10.0, 30.0, 20.0]
    # minmax(model) = [0, 1/3, 1], minmax(first) = [0, 1, 0.5]
    np.testing.assert_allclose(fuse(model, first, 0.3, fusion="minmax"), [0.0, 0.7 / 3 + 0.3, 0.85], atol=1e-12)
    np.testing.assert_allclose(minmax(np.array([5.0, 5.0])), [0.0, 0.0])
    np.testing.assert_allclose(minmax(np.array([7.0])), [0.0])
    np.testing.assert_allclose(minmax(np.array([-2.0, 0.0, 2.0])), [0.0, 0.5, 1.0])
    # groups are normalised apart; weight 0 is still the identity
    out = fuse([1.0, 3.0, 100.0, 300.0], [0.0, 1.0, 1.0, 0.0], 0.5, [0, 0, 1, 1], fusion="minmax")
    np.testing.assert_allclose(out, [0.0, 1.0, 0.5, 0.5], atol=1e-12)
    assert fuse([2.0, 1.0], [1.0, 2.0], 0.0, fusion="minmax").tolist() == [2.0, 1.0]


@pytest.mark.parametrize("fusion", ["z", "minmax"])
def test_huge_first_stage_scores_do_not_overflow(fusion: str) -> None:
    """Issue 17 #9: +-1e308 gave NaN (a traceback), 1e160 vs 2e160 normalised to zeros (the first stage dropped)."""
    model = [1.0, 2.0, 3.0]
    for first in ([1e308, -1e308, 0.0], [1e160, 2e160, 1.5e160], [-1.7e308, 1.7e308, 1.7e308]):
        out = fuse(model, first, 0.5, fusion=fusion)
        assert np.isfinite(out).all()
        scaled = [v / max(abs(x) for x in first) for v in first]  # both normalisations are scale-free
        np.testing.assert_allclose(out, fuse(model, scaled, 0.5, fusion=fusion), atol=1e-12)
    assert fuse(model, [1e160, 2e160, 1.5e160], 1.0, fusion=fusion).tolist() != [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["Z", "rank", "", None, 3])
def test_unknown_fusion_is_refused(name: object) -> None:
    with pytest.raises(OptionError, match=r"expected one of z, minmax"):
        check_fusion(name)
    with pytest.raises(OptionError, match=r"fusion="):
        fuse([1.0, 2.0], [1.0, 2.0], 0.3, fusion=name)  # type: ignore[arg-type]


def test_weight_zero_is_the_identity() -> None:
    model = np.array([0.1, -3.25, 7.0, 7.0, 1e-9])
    out = fuse(model, [5.0, 4.0, 3.0, 2.0, 1.0], 0.0, [0, 0, 1, 1, 1])
    assert out.tobytes() == model.tobytes() and out is not model
    assert fuse(model, None, 0).tobytes() == model.tobytes()  # no first-stage scores needed at 0
    assert fuse(model, [math.nan] * 5, 0.0).tobytes() == model.tobytes()


def test_weight_one_is_the_first_stage_z_score() -> None:
    model, first = [3.0, -1.0, 0.5, 2.0], [12.0, 8.0, 11.0, 9.5]
    np.testing.assert_allclose(fuse(model, first, 1.0), z(first), rtol=0, atol=1e-12)


def test_groups_are_independent() -> None:
    model = [1.0, 2.0, 4.0, 0.3, 0.1]
    first = [10.0, 30.0, 20.0, 5.0, 9.0]
    groups = ["qa", "qa", "qa", "qb", "qb"]
    both = fuse(model, first, 0.4, groups)
    np.testing.assert_allclose(both[:3], fuse(model[:3], first[:3], 0.4), atol=1e-12)
    np.testing.assert_allclose(both[3:], fuse(model[3:], first[3:], 0.4), atol=1e-12)
    # another query's scale (BM25 scores vary a lot between queries) does not leak into this one
    scaled = fuse(model[:3] + [30.0, 10.0], first[:3] + [5000.0, 9000.0], 0.4, groups)
    np.testing.assert_allclose(scaled[:3], both[:3], atol=1e-12)
    # interleaved group members
    order = [0, 3, 1, 4, 2]
    mixed = fuse([model[i] for i in order], [first[i] for i in order], 0.4, [groups[i] for i in order])
    np.testing.assert_allclose(mixed, both[order], atol=1e-12)


def test_constant_and_single_candidate_groups() -> None:
    model, first = [1.0, 2.0, 4.0, 7.0], [5.0, 5.0, 5.0, 3.0]
    out = fuse(model, first, 0.3, [0, 0, 0, 1])
    np.testing.assert_allclose(out[:3], [0.7 * v for v in z(model[:3])], atol=1e-12)  # z(constant) = 0
    assert out[3] == 0.0  # a single candidate: both z-scores are 0
    np.testing.assert_array_equal(znorm(np.full(3, 0.1)), np.zeros(3))  # equal values whose mean is not exact
    np.testing.assert_array_equal(fuse([2.0, 2.0], [1.0, 1.0], 0.5), [0.0, 0.0])
    assert fuse([], [], 0.5).shape == (0,)


@pytest.mark.parametrize("weight", [-0.1, 1.5, math.nan, math.inf, True, "0.3", None])
def test_out_of_range_weight(weight: object) -> None:
    with pytest.raises(OptionError, match=r"first_stage_weight=.* is invalid: expected a number in \[0, 1\]"):
        fuse([1.0, 2.0], [1.0, 2.0], weight)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"--x=.* is invalid"):
        check_first_stage_weight(weight, "--x")


def test_bad_first_stage_scores_name_the_document() -> None:
    with pytest.raises(FirstStageScoreError, match=r"first-stage score of document 'd2' \(query 'q1'\) is nan"):
        fuse([1.0, 2.0, 3.0], [1.0, math.nan, 2.0], 0.3, qids=["q1"] * 3, docids=["d1", "d2", "d3"])
    with pytest.raises(FirstStageScoreError, match=r"candidate 1 \(query group 7\) is inf"):
        fuse([1.0, 2.0], [1.0, math.inf], 0.3, [7, 7])
    with pytest.raises(FirstStageScoreError, match="needs first-stage scores"):
        fuse([1.0, 2.0], None, 0.3)
    with pytest.raises(ValueError, match="shape"):
        fuse([1.0, 2.0], [1.0], 0.3)


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_without_the_field_parses_to_zero(tmp_path: Path) -> None:
    make_folder(tmp_path)
    assert "first_stage_weight" not in json.loads((tmp_path / MANIFEST_NAME).read_text())["policy"]
    assert load_manifest(tmp_path).policy.first_stage_weight == 0.0
    _edit(tmp_path, lambda d: d["policy"].__setitem__("first_stage_weight", None))
    assert load_manifest(tmp_path).policy.first_stage_weight == 0.0


def test_manifest_round_trip_with_a_weight(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path)
    before = (tmp_path / MANIFEST_NAME).read_bytes()
    tuned = dataclasses.replace(manifest, policy=dataclasses.replace(manifest.policy, first_stage_weight=0.3))
    write_manifest(tmp_path, tuned)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["policy"]["first_stage_weight"] == 0.3
    assert load_manifest(tmp_path) == tuned and load_manifest(tmp_path).schema_version == 1
    write_manifest(tmp_path, manifest)  # weight 0: written exactly as before the field existed
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before


def test_manifest_fusion_field(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path)
    before = (tmp_path / MANIFEST_NAME).read_bytes()
    assert manifest.policy.fusion == "z" and "fusion" not in json.loads(before)["policy"]
    tuned = dataclasses.replace(manifest, policy=dataclasses.replace(manifest.policy, fusion="minmax",
                                                                     first_stage_weight=0.3))
    write_manifest(tmp_path, tuned)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["policy"]["fusion"] == "minmax"
    assert load_manifest(tmp_path) == tuned
    write_manifest(tmp_path, manifest)
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before
    _edit(tmp_path, lambda d: d["policy"].__setitem__("fusion", "rrf"))
    with pytest.raises(ManifestError, match=r"policy\.fusion: expected one of z, minmax .* got 'rrf'") as info:
        load_manifest(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)


@pytest.mark.parametrize("value", [1.5, -0.2, "0.3", True, [0.3]])
def test_manifest_bad_weight_names_file_and_field(tmp_path: Path, value: object) -> None:
    make_folder(tmp_path)
    _edit(tmp_path, lambda d: d["policy"].__setitem__("first_stage_weight", value))
    with pytest.raises(ManifestError, match=r"policy\.first_stage_weight: expected") as info:
        load_manifest(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)


# ------------------------------------------------------------------------------------------------ runtime
@pytest.fixture(scope="module")
def corpus() -> dict[str, str]:
    with (DATA / "corpus.jsonl").open(encoding="utf-8") as handle:
        records = [json.loads(line) for _, line in zip(range(40), handle, strict=False)]
    return {r["_id"]: r["text"][:400] for r in records}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, str]) -> Path:
    return build_synthetic_model(tmp_path_factory.mktemp("fusion"), list(corpus.values()) + ["insulin", "dna"],
                                 threshold=0.9)


def ranked(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda d: (-scores[d], d))


def test_rerank_run_weight_changes_the_order_as_expected(model_dir: Path, corpus: dict[str, str]) -> None:
    ids = list(corpus)[:12]
    topics = {"q1": "insulin resistance"}
    plain = MatryoshkaReranker(model_dir, policy="fixed", batch_size=4, threads=1)
    assert plain.first_stage_weight == 0.0  # the manifest has no weight
    model = plain.predict([(topics["q1"], corpus[d]) for d in ids])
    model_order = [ids[i] for i in np.argsort(-model, kind="stable")]
    # first-stage scores that rank exactly against the model: fused = (1 - 2w) * z(model)
    anti = {d: -float(s) for d, s in zip(ids, model, strict=True)}
    below = MatryoshkaReranker(model_dir, policy="fixed", batch_size=4, threads=1, first_stage_weight=0.3)
    above = MatryoshkaReranker(model_dir, policy="fixed", batch_size=4, threads=1, first_stage_weight=0.7)
    assert ranked(below.rerank_run({"q1": anti}, topics, corpus)["q1"]) == model_order
    assert ranked(above.rerank_run({"q1": anti}, topics, corpus)["q1"]) == model_order[::-1]
    # and the numbers are the formula's
    bm25 = {d: 20.0 - 1.5 * i + (i % 3) for i, d in enumerate(ids)}
    out = below.rerank_run({"q1": bm25}, topics, corpus)["q1"]
    expected = [0.7 * a + 0.3 * b for a, b in zip(z(list(model)), z([bm25[d] for d in ids]), strict=True)]
    np.testing.assert_allclose([out[d] for d in ids], expected, atol=1e-5)
    assert "first-stage weight 0.3" in below.stats.summary() and below.stats.to_dict()["first_stage_weight"] == 0.3


def test_weight_zero_output_is_unchanged(model_dir: Path, corpus: dict[str, str]) -> None:
    ids = list(corpus)
    run = {"q1": {d: 10.0 - i for i, d in enumerate(ids[:10])},
           "q2": {d: float(i % 4) for i, d in enumerate(ids[10:16])}}
    topics = {"q1": "insulin resistance", "q2": "dna repair"}
    default = MatryoshkaReranker(model_dir, batch_size=4, threads=1).rerank_run(run, topics, corpus, depth=7)
    zero = MatryoshkaReranker(model_dir, batch_size=4, threads=1, first_stage_weight=0.0)
    assert zero.rerank_run(run, topics, corpus, depth=7) == default
    bare = {qid: ranked(hits) for qid, hits in run.items()}
    assert zero.rerank_run(bare, topics, corpus, depth=7) == default


def test_weight_with_depth_and_bare_ids(model_dir: Path, corpus: dict[str, str]) -> None:
    ids = list(corpus)[:10]
    reranker = MatryoshkaReranker(model_dir, policy="fixed", batch_size=4, threads=1, first_stage_weight=1.0)
    run = {"q1": {d: 100.0 - i * i for i, d in enumerate(ids)}}
    out = reranker.rerank_run(run, {"q1": "insulin"}, corpus, depth=4)["q1"]
    assert ranked(out) == ids  # w=1: the head keeps the first stage's order, the tail stays below it
    with pytest.raises(FirstStageScoreError, match="candidates of query 'q1' are bare document ids"):
        reranker.rerank_run({"q1": ids}, {"q1": "insulin"}, corpus)
    with pytest.raises(FirstStageScoreError, match=r"document '.+' \(query 'q1'\) is nan"):
        reranker.rerank_run({"q1": {ids[0]: 1.0, ids[1]: math.nan}}, {"q1": "insulin"}, corpus)


def test_rank_and_predict(model_dir: Path, corpus: dict[str, str]) -> None:
    docs = list(corpus.values())[:6]
    reranker = MatryoshkaReranker(model_dir, policy="fixed", batch_size=4, threads=1, first_stage_weight=1.0)
    model = reranker.predict([("dna", d) for d in docs])  # never fused
    plain = MatryoshkaReranker(model_dir, policy="fixed", batch_size=4, threads=1).predict([("dna", d) for d in docs])
    np.testing.assert_array_equal(model, plain)
    assert [r["corpus_id"] for r in reranker.rank("dna", docs)] == list(np.argsort(-model, kind="stable"))
    first = [3.0, 9.0, 1.0, 7.0, 5.0, 2.0]
    assert [r["corpus_id"] for r in reranker.rank("dna", docs, first_stage_scores=first)] == [1, 3, 4, 0, 5, 2]


def test_weight_from_manifest_and_override(model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    manifest = load_manifest(folder)
    write_manifest(folder, dataclasses.replace(manifest, policy=dataclasses.replace(manifest.policy,
                                                                                    first_stage_weight=0.25)))
    assert MatryoshkaReranker(folder).first_stage_weight == 0.25
    assert MatryoshkaReranker(folder, first_stage_weight=0).first_stage_weight == 0.0
    with pytest.raises(OptionError, match=r"first_stage_weight=2 is invalid"):
        MatryoshkaReranker(folder, first_stage_weight=2)


def test_minmax_fusion_from_manifest_and_override(model_dir: Path, corpus: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    manifest = load_manifest(folder)
    write_manifest(folder, dataclasses.replace(manifest, policy=dataclasses.replace(
        manifest.policy, first_stage_weight=0.3, fusion="minmax")))
    ids = list(corpus)[:8]
    topics, bm25 = {"q1": "insulin"}, {d: 10.0 - 1.25 * i for i, d in enumerate(ids)}
    reranker = MatryoshkaReranker(folder, policy="fixed", batch_size=4, threads=1)
    assert reranker.fusion == "minmax"
    model = reranker.predict([(topics["q1"], corpus[d]) for d in ids])
    out = reranker.rerank_run({"q1": bm25}, topics, corpus)["q1"]
    expected = 0.7 * minmax(model) + 0.3 * minmax(np.array([bm25[d] for d in ids]))
    np.testing.assert_allclose([out[d] for d in ids], expected, atol=1e-6)
    assert "(minmax)" in reranker.stats.summary() and reranker.stats.to_dict()["fusion"] == "minmax"
    z_out = MatryoshkaReranker(folder, policy="fixed", batch_size=4, threads=1, fusion="z").rerank_run(
        {"q1": bm25}, topics, corpus)["q1"]
    np.testing.assert_allclose([z_out[d] for d in ids], fuse(model, [bm25[d] for d in ids], 0.3), atol=1e-6)
    with pytest.raises(OptionError, match=r"fusion='l2' is invalid"):
        MatryoshkaReranker(folder, fusion="l2")


# ------------------------------------------------------------------------------------------------ tuning
QUERIES = {"q1": "insulin resistance", "q2": "dna repair", "q3": "vitamin d bone", "q4": "cancer cells"}


@pytest.fixture(scope="module")
def scored_run(corpus: dict[str, str]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """A run whose first-stage scores know the relevant documents (so fusion helps the random model)."""
    ids = list(corpus)
    rng = np.random.default_rng(3)
    run, qrels = {}, {}
    for k, qid in enumerate(QUERIES):
        docs = ids[k * 10: k * 10 + 10]
        relevant = docs[7:9]  # ranked low by position, high by first-stage score
        run[qid] = {d: (5.0 if d in relevant else 0.0) + float(rng.uniform(0, 3)) for d in docs}
        qrels[qid] = {d: 1 for d in relevant}
    return run, qrels


@pytest.mark.parametrize("fusion", ["z", "minmax"])
def test_replay_with_fusion_equals_the_runtime(model_dir: Path, corpus: dict[str, str], scored_run,
                                               fusion: str) -> None:
    run, _ = scored_run
    recorded = record_run(Cascade(model_dir, batch_size=4, threads=1), run, QUERIES, corpus, progress=False)
    recorded.fusion = fusion
    assert recorded.first_stage is not None
    np.testing.assert_array_equal(recorded.first_stage, [run[q][d] for q, d in zip(recorded.qids, recorded.docids,
                                                                                    strict=True)])
    for policy, threshold in (("candidate", 0.6), ("query", 0.2), ("topk", 0.7)):
        reranker = MatryoshkaReranker(model_dir, policy=policy, threshold=threshold, top_k=3, batch_size=4,
                                      threads=1, first_stage_weight=0.4, fusion=fusion)
        real = reranker.rerank_run(run, QUERIES, corpus)
        chosen = make_policy(policy, threshold, recorded.exits, 0.9, top_k=3)
        replayed = recorded.to_run(recorded.replay(chosen, 0.4)[0])
        for qid in run:
            np.testing.assert_allclose([replayed[qid][d] for d in run[qid]], [real[qid][d] for d in run[qid]],
                                       atol=1e-5)


@pytest.mark.parametrize("depth", [3, 7])
def test_replay_with_depth_equals_the_runtime(model_dir: Path, corpus: dict[str, str], scored_run, depth: int) -> None:
    run, _ = scored_run
    recorded = record_run(Cascade(model_dir, batch_size=4, threads=1), run, QUERIES, corpus, progress=False)
    for policy, threshold, weight in (("candidate", 0.6, 0.4), ("topk", 0.7, 0.0), ("query", 0.2, 0.7)):
        reranker = MatryoshkaReranker(model_dir, policy=policy, threshold=threshold, top_k=3, batch_size=4,
                                      threads=1, first_stage_weight=weight, depth=depth)
        real = reranker.rerank_run(run, QUERIES, corpus)
        final, stage = recorded.replay(make_policy(policy, threshold, recorded.exits, 0.9, top_k=3), weight, depth)
        replayed = recorded.to_run(final)
        for qid in run:  # scores below the depth included: min(scored) - 1 - i in first-stage order
            np.testing.assert_allclose([replayed[qid][d] for d in run[qid]], [real[qid][d] for d in run[qid]],
                                       atol=1e-5)
        assert (stage == -1).sum() == sum(len(h) - depth for h in run.values())
        stats = reranker.stats.to_dict()
        layers, cost = recorded.layers_and_cost(stage)
        assert (layers, cost) == pytest.approx((stats["mean_layers_per_candidate"], stats["relative_layer_cost"]))


def test_tuning_chooses_a_depth_within_a_cost_and_writes_it(model_dir: Path, corpus: dict[str, str], scored_run,
                                                            tmp_path: Path) -> None:
    run, qrels = scored_run
    recorded = record_run(Cascade(model_dir, batch_size=4, threads=1), run, QUERIES, corpus, progress=False)
    result = tune(recorded, qrels, (0.5,), max_loss=None, cost_target=0.3, depths=(None, 3))
    assert {p.depth for p in result.points} == {None, 3}
    assert all(p.depth is None for p in result.points if p.policy == "fixed")  # fixed exits: every candidate
    # the first exit (layer 2 of 6) costs 1/3 for every scored candidate: only depth 3 (3 of 10) fits 30%
    assert result.best.depth == 3 and result.best.relative_cost <= 0.3
    assert result.points == tune(recorded, qrels, (0.5,), max_loss=None, cost_target=0.3,
                                 depths=(None, 3, None)).points
    with pytest.raises(OptionError, match=r"--depths=0 is invalid"):
        tune(recorded, qrels, (0.5,), depths=(None, 0))
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    write_choice(folder, result.best, result.first_stage_weight, {"data": "synthetic"})
    assert load_manifest(folder, verify=True).policy.depth == 3
    assert MatryoshkaReranker(folder).depth == 3


def test_tuning_chooses_the_weight_and_writes_it(model_dir: Path, corpus: dict[str, str], scored_run,
                                                 tmp_path: Path) -> None:
    run, qrels = scored_run
    recorded = record_run(Cascade(model_dir, batch_size=4, threads=1), run, QUERIES, corpus, progress=False)
    weights = (0.0, 0.2, 0.5)
    result = tune(recorded, qrels, weights, max_loss=0.05)
    by_weight = {w: ndcg_at_k(recorded.to_run(fuse(recorded.exit_scores[:, -1], recorded.first_stage, w,
                                                   recorded.groups)), qrels) for w in weights}
    assert result.full_ndcg_by_weight == pytest.approx(by_weight)
    assert by_weight[result.first_stage_weight] == max(by_weight.values())
    assert result.first_stage_weight > 0 and by_weight[result.first_stage_weight] > by_weight[0.0]
    # the sweep replays with that weight, against the fused full-depth reference
    assert result.full_ndcg == pytest.approx(by_weight[result.first_stage_weight])
    assert all(p.first_stage_weight == result.first_stage_weight for p in result.points)
    full_point = next(p for p in result.points if p.policy == "fixed" and p.mean_layers == recorded.exits[-1])
    assert full_point.relative_ndcg == pytest.approx(1.0)
    assert result.best.policy != "fixed" and result.best.relative_ndcg >= 0.95 - 1e-12
    # weights (0,) is the plain reranker: the same figures as the sweep without fusion
    plain = tune(recorded, qrels, (0.0,), max_loss=0.05)
    assert plain.first_stage_weight == 0.0 and (plain.full_ndcg, plain.points) == sweep(recorded, qrels)
    # written into the manifest, which still verifies
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    write_choice(folder, result.best, result.first_stage_weight, {"data": "synthetic"})
    manifest = load_manifest(folder, verify=True)
    assert manifest.policy.first_stage_weight == result.first_stage_weight
    assert (manifest.policy.name, manifest.policy.threshold) == (result.best.policy, result.best.threshold)
    assert MatryoshkaReranker(folder).first_stage_weight == result.first_stage_weight


def test_choose_weight_needs_first_stage_scores(model_dir: Path, corpus: dict[str, str], scored_run) -> None:
    run, qrels = scored_run
    bare = {qid: ranked(hits) for qid, hits in run.items()}
    recorded = record_run(Cascade(model_dir, batch_size=4, threads=1), bare, QUERIES, corpus, progress=False)
    assert recorded.first_stage is None
    assert choose_weight(recorded, qrels, (0,))[0] == 0.0
    with pytest.raises(OptionError, match="no first-stage scores"):
        choose_weight(recorded, qrels, (0, 0.3))
    with pytest.raises(OptionError, match=r"--first-stage-weights=1.5 is invalid"):
        choose_weight(recorded, qrels, (0, 1.5))


def test_tune_cli_weights_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    parse = tune_parser().parse_args
    base = ["--model", "m", "--data", "d"]
    assert parse(base).first_stage_weights == [[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]]
    assert parse([*base, "--first-stage-weights", "0"]).first_stage_weights == [[0.0]]
    assert parse([*base, "--first-stage-weights", "0", "0.2,0.3"]).first_stage_weights == [[0.0], [0.2, 0.3]]
    with pytest.raises(SystemExit):
        parse([*base, "--first-stage-weights", "abc"])
    assert tune_main(["--model", str(tmp_path), "--data", str(tmp_path), "--first-stage-weights", "0", "1.5"]) == 2
    assert "--first-stage-weights=1.5 is invalid: expected a number in [0, 1]" in capsys.readouterr().err


def test_tune_cli_writes_the_weight(monkeypatch: pytest.MonkeyPatch, model_dir: Path, corpus: dict[str, str],
                                    scored_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m matryoshka tune`` end to end, with Pyserini's BM25 replaced by the scored run above."""
    from types import SimpleNamespace

    from matryoshka import pipeline

    run, qrels = scored_run
    docs = {d: SimpleNamespace(contents=text) for d, text in corpus.items()}
    prepared = SimpleNamespace(dataset=SimpleNamespace(corpus=docs, queries=QUERIES, qrels=qrels),
                               index_dir=tmp_path / "index", topics=tmp_path / "topics.tsv")

    def fake_bm25(index_dir: Path, topics: Path, output: Path, hits: int = 100) -> Path:
        lines = [f"{q} Q0 {d} {r} {s:.6f} bm25\n" for q, hits_ in run.items()
                 for r, (d, s) in enumerate(sorted(hits_.items(), key=lambda x: -x[1]), start=1)]
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("".join(lines))
        return output

    monkeypatch.setattr(pipeline, "prepare_beir", lambda data, split, work: prepared)
    monkeypatch.setattr(pipeline, "bm25_search", fake_bm25)
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    base = ["--model", str(folder), "--data", str(tmp_path / "dev-data"), "--work", str(tmp_path / "work"),
            "--threads", "1", "--batch-size", "4", "--max-loss", "0.05"]
    assert tune_main([*base, "--first-stage-weights", "0"]) == 0
    data = json.loads((folder / MANIFEST_NAME).read_text())
    assert "first_stage_weight" not in data["policy"] and "first_stage_weights" not in data["policy"]["tuned_on"]
    assert "chosen: policy=" in capsys.readouterr().out
    assert tune_main([*base, "--first-stage-weights", "0,0.2", "0.5", "--sweep-output", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    manifest = load_manifest(folder, verify=True)
    weight = manifest.policy.first_stage_weight
    sweep_json = json.loads((tmp_path / "s.json").read_text())
    assert weight > 0 and sweep_json["first_stage_weight"] == weight and f"first_stage_weight={weight:g}" in out
    by_weight = sweep_json["full_ndcg10_by_first_stage_weight"]
    assert set(by_weight) == {"0", "0.2", "0.5"} and by_weight[f"{weight:g}"] == max(by_weight.values())
    assert manifest.policy.tuned_on["first_stage_weights"] == [0.0, 0.2, 0.5]
    assert manifest.policy.tuned_on["depths"] == ["all", 80, 60, 50, 40, 30, 20]
    cheap = [a for a in base if a not in ("--max-loss", "0.05")]
    assert tune_main([*cheap, "--first-stage-weights", "0.5", "--depths", "all", "3", "--cost", "0.3"]) == 0
    manifest = load_manifest(folder, verify=True)
    assert manifest.policy.depth == 3 and "depth=3" in capsys.readouterr().out
    assert manifest.policy.tuned_on["depths"] == ["all", 3]
    assert manifest.policy.fusion == "z"
    assert tune_main([*cheap, "--first-stage-weights", "0.3", "--fusion", "minmax", "--cost", "0.5"]) == 0
    manifest = load_manifest(folder, verify=True)
    assert manifest.policy.fusion == "minmax" and manifest.policy.first_stage_weight == 0.3
    assert "fusion=minmax" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tune_main([*cheap, "--depths", "0"])
    assert "'0' is not 'all' or an integer >= 1" in capsys.readouterr().err
