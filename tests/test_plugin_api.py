"""The Python API (MatryoshkaReranker) and the run statistics, on a synthetic model folder (TEST FIXTURE)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from matryoshka.errors import MatryoshkaError, MissingInputError, OptionError
from matryoshka.io.trec import Run, RunEntry
from matryoshka.plugin import api
from matryoshka.plugin.api import InputTextError, MatryoshkaReranker, MissingDocumentError, MissingTopicError
from matryoshka.plugin.stats import RunStats
from tests.fixtures.synthetic_model import build_synthetic_model

DATA = Path(__file__).resolve().parent.parent / "data" / "scifact-mini"


@pytest.fixture(scope="module")
def corpus() -> dict[str, str]:
    with (DATA / "corpus.jsonl").open(encoding="utf-8") as handle:
        records = [json.loads(line) for _, line in zip(range(40), handle, strict=False)]
    return {r["_id"]: r["text"] for r in records}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, corpus: dict[str, str]) -> Path:
    return build_synthetic_model(tmp_path_factory.mktemp("synthetic"), corpus.values(), threshold=0.9)


@pytest.fixture(scope="module")
def full(model_dir: Path) -> MatryoshkaReranker:
    return MatryoshkaReranker(model_dir, policy="fixed", batch_size=4, threads=1)


def test_predict_matches_rank_and_keeps_order(full: MatryoshkaReranker, corpus: dict[str, str]) -> None:
    docs = list(corpus.values())[:12]
    scores = full.predict([("insulin resistance", d) for d in docs])
    assert scores.shape == (12,) and scores.dtype == np.float64
    reversed_scores = full.predict([("insulin resistance", d) for d in docs[::-1]])
    np.testing.assert_allclose(reversed_scores[::-1], scores, atol=1e-5)
    ranked = full.rank("insulin resistance", docs, top_k=5, return_documents=True)
    assert len(ranked) == 5 and [r["corpus_id"] for r in ranked] == list(np.argsort(-scores, kind="stable")[:5])
    assert ranked[0]["text"] == docs[ranked[0]["corpus_id"]]
    assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(ranked))
    assert full.rank("insulin resistance", []) == []


def test_default_threshold_comes_from_the_manifest(model_dir: Path) -> None:
    assert MatryoshkaReranker(model_dir).policy.threshold == 0.9
    assert MatryoshkaReranker(model_dir, threshold=0.5).policy.threshold == 0.5


def with_policy(model_dir: Path, folder: Path, **fields: object) -> Path:
    """A copy of ``model_dir`` whose manifest policy has ``fields`` replaced."""
    import dataclasses
    import shutil

    from matryoshka.plugin.manifest import load_manifest, write_manifest

    shutil.copytree(model_dir, folder)
    manifest = load_manifest(folder)
    write_manifest(folder, dataclasses.replace(manifest, policy=dataclasses.replace(manifest.policy, **fields)))
    return folder


def test_the_manifest_policy_name_is_the_default_and_its_threshold_is_only_its_own(model_dir: Path,
                                                                                   tmp_path: Path) -> None:
    from matryoshka.plugin.policies import POLICY_DEFAULT_THRESHOLD, QueryPolicy, TopKPolicy

    tuned = with_policy(model_dir, tmp_path / "topk", name="topk", threshold=0.7)
    default = MatryoshkaReranker(tuned)
    assert isinstance(default.policy, TopKPolicy) and default.policy.threshold == 0.7
    assert MatryoshkaReranker(tuned, policy="topk").policy.threshold == 0.7
    other = MatryoshkaReranker(tuned, policy="query")  # 0.7 was tuned for topk: not reused for another policy
    assert isinstance(other.policy, QueryPolicy) and other.policy.threshold == POLICY_DEFAULT_THRESHOLD
    assert MatryoshkaReranker(tuned, policy="query", threshold=0.3).policy.threshold == 0.3


def test_the_manifest_depth_is_the_default_and_zero_reranks_all(model_dir: Path, corpus: dict[str, str],
                                                                tmp_path: Path) -> None:
    deep = with_policy(model_dir, tmp_path / "depth", depth=3)
    ids = list(corpus)[:8]
    run, topics = {"q1": {d: 8.0 - i for i, d in enumerate(ids)}}, {"q1": "insulin"}
    reranker = MatryoshkaReranker(deep, policy="fixed", batch_size=4, threads=1)
    assert reranker.depth == 3
    out = reranker.rerank_run(run, topics, corpus)["q1"]
    ranked = sorted(out, key=lambda d: (-out[d], d))
    assert set(ranked[:3]) == set(ids[:3]) and ranked[3:] == ids[3:]
    stats = reranker.stats.to_dict()
    assert (stats["candidates"], stats["reranked_candidates"], stats["candidates_below_depth"]) == (8, 3, 5)
    assert stats["mean_layers_per_candidate"] == pytest.approx(6 * 3 / 8)  # unscored candidates cost nothing
    assert stats["relative_layer_cost"] == pytest.approx(3 / 8)
    assert "(5 below the rerank depth, not scored)" in reranker.stats.summary() and stats["depth"] == 3
    assert "depth 3]" in reranker.stats.summary()
    everything = MatryoshkaReranker(deep, policy="fixed", batch_size=4, threads=1, depth=0)
    assert everything.depth is None
    assert everything.rerank_run(run, topics, corpus) == MatryoshkaReranker(
        model_dir, policy="fixed", batch_size=4, threads=1).rerank_run(run, topics, corpus)
    assert reranker.rerank_run(run, topics, corpus, depth=0) == everything.rerank_run(run, topics, corpus)
    assert reranker.rerank_run(run, topics, corpus, depth=5)["q1"].keys() == out.keys()


def test_no_default_model_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(api, "DEFAULT_MODEL_DIR", tmp_path / "default_model")
    with pytest.raises(MissingInputError, match="no default model is installed.*--matryoshka.model DIR"):
        MatryoshkaReranker()


def test_bad_texts(full: MatryoshkaReranker) -> None:
    with pytest.raises(InputTextError, match="pair 1: query is empty"):
        full.predict([("q", "p"), ("  ", "p")])
    with pytest.raises(InputTextError, match="pair 0 is 'qp', expected"):
        full.predict(["qp"])
    with pytest.raises(InputTextError, match="document 1 is not valid Unicode"):
        full.rank("q", ["fine", "bad \udcff byte"])
    with pytest.raises(InputTextError, match="document 0 is int"):
        full.rank("q", [3])


def test_rerank_run_with_depth(full: MatryoshkaReranker, corpus: dict[str, str]) -> None:
    ids = list(corpus)
    run = {"q1": {d: 100.0 - i for i, d in enumerate(ids[:10])}, "q2": ids[10:14]}
    topics = {"q1": "insulin resistance", "q2": "dna repair", "q3": "unused"}
    out = full.rerank_run(run, topics, corpus, depth=4)
    assert list(out) == ["q1", "q2"] and set(out["q1"]) == set(ids[:10])
    ranked = sorted(out["q1"], key=lambda d: (-out["q1"][d], d))
    assert set(ranked[:4]) == set(ids[:4]) and ranked[4:] == ids[4:10]  # below the depth: the run's order
    assert min(out["q1"][d] for d in ids[:4]) > max(out["q1"][d] for d in ids[4:10])
    np.testing.assert_allclose([out["q1"][d] for d in ids[:4]],
                               full.predict([(topics["q1"], corpus[d]) for d in ids[:4]]), atol=1e-5)
    run_obj = Run({"q1": [RunEntry(d, 1.0 / (i + 1), i + 1) for i, d in enumerate(ids[:3])]}, "bm25")
    assert set(full.rerank_run(run_obj, topics, corpus.get)["q1"]) == set(ids[:3])


def test_rerank_run_errors(full: MatryoshkaReranker, corpus: dict[str, str]) -> None:
    with pytest.raises(MissingDocumentError, match="document 'nope' \\(query 'q1'\\) is not in the document lookup"):
        full.rerank_run({"q1": ["nope"]}, {"q1": "x"}, corpus)
    with pytest.raises(MissingTopicError, match="query 'q9' of the run is not in the topics"):
        full.rerank_run({"q9": ["x"]}, {"q1": "x"}, corpus)
    with pytest.raises(InputTextError, match="query 'q1' is empty"):
        full.rerank_run({"q1": list(corpus)[:2]}, {"q1": " "}, corpus)
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(OptionError, match=f"depth={bad!r} is invalid: expected an integer >= 1"):
            full.rerank_run({"q1": list(corpus)[:2]}, {"q1": "x"}, corpus, depth=bad)
    with pytest.raises(OptionError, match="depth=-2 is invalid"):
        MatryoshkaReranker(full.model_dir, depth=-2)


def test_stats_after_a_run(model_dir: Path, corpus: dict[str, str]) -> None:
    reranker = MatryoshkaReranker(model_dir, policy="candidate", threshold=0.0, batch_size=4, threads=1)
    reranker.rerank_run({"q1": list(corpus)[:6], "q2": list(corpus)[6:9]}, {"q1": "a", "q2": "b"}, corpus)
    stats = reranker.stats.to_dict()
    assert stats["queries"] == 2 and stats["candidates"] == 9
    assert stats["exit_histogram"] == {"2": 9, "4": 0, "6": 0}
    assert stats["mean_layers_per_candidate"] == 2.0
    assert stats["relative_layer_cost"] == pytest.approx(1 / 3)
    assert stats["candidates_per_second"] > 0 and stats["ms_per_query_p95"] >= stats["ms_per_query_p50"] > 0
    assert "mean layers/candidate 2.00 of 6" in reranker.stats.summary()
    reranker.reset_stats()
    assert reranker.stats.candidates == 0


def test_run_stats_arithmetic(tmp_path: Path) -> None:
    stats = RunStats((2, 4, 6), (0.25, 0.5, 1.0), "candidate(threshold=0.9)")
    stats.add(np.array([0, 0, 2, 1]), 0.4, queries=1, truncated=1)
    stats.add(np.array([2, 2]), 0.2, queries=2)
    d = stats.to_dict()
    assert d["exit_histogram"] == {"2": 2, "4": 1, "6": 3} and d["candidates"] == 6 and d["queries"] == 3
    assert d["mean_layers_per_candidate"] == pytest.approx((2 * 2 + 4 + 3 * 6) / 6)
    assert d["relative_layer_cost"] == pytest.approx((2 * 0.25 + 0.5 + 3 * 1.0) / 6)
    assert d["candidates_per_second"] == pytest.approx(6 / 0.6)
    assert d["ms_per_query_p50"] == pytest.approx(100.0) and d["passages_truncated"] == 1
    stats.write_json(tmp_path / "stats.json")
    assert json.loads((tmp_path / "stats.json").read_text()) == d


def test_every_error_is_a_matryoshka_error() -> None:
    for cls in (InputTextError, MissingDocumentError, MissingTopicError):
        assert issubclass(cls, MatryoshkaError)


def test_predict_chunks_keep_whole_queries(monkeypatch: pytest.MonkeyPatch, model_dir: Path,
                                           corpus: dict[str, str]) -> None:
    reranker = MatryoshkaReranker(model_dir, policy="query", threshold=0.3, batch_size=4, threads=1)
    docs = list(corpus.values())[:21]
    pairs = [(("alpha", "beta", "gamma")[i % 3], d) for i, d in enumerate(docs)]  # interleaved queries
    whole = reranker.predict(pairs)
    monkeypatch.setattr(api, "MAX_CANDIDATES_PER_CALL", 5)  # 7 candidates per query: one query per call
    chunked = reranker.predict(pairs)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    stages = reranker.last_result.exit_stage
    for q in range(3):
        assert len(set(stages[q::3].tolist())) == 1  # the query policy still saw each query whole


def test_rank_refuses_a_bare_string_and_bad_top_k(full: MatryoshkaReranker) -> None:  # issue 17 #12
    with pytest.raises(InputTextError, match="documents must be a list of strings, got str"):
        full.rank("q", "abc")
    for bad in (-1, 0, 1.5, True):
        with pytest.raises(InputTextError, match=f"top_k must be None .* got {bad!r}"):
            full.rank("q", ["a", "b", "c"], top_k=bad)
    assert len(full.rank("q", ["a", "b", "c"], top_k=2)) == 2


def test_rank_with_first_stage_scores_prunes_on_the_fused_ranking(model_dir: Path,
                                                                   corpus: dict[str, str]) -> None:
    docs = list(corpus.values())[:8]
    first = [float(8 - i) for i in range(8)]
    topk = MatryoshkaReranker(model_dir, policy="topk", threshold=0.0, top_k=2, first_stage_weight=0.9, threads=1)
    ranked = topk.rank("insulin", docs, first_stage_scores=first)
    groups = np.zeros(8, np.int64)
    fused = topk.cascade.run(["insulin"] * 8, docs, topk.policy, groups, first, 0.9, topk.fusion)
    plain = topk.cascade.run(["insulin"] * 8, docs, topk.policy, groups)
    assert not np.array_equal(fused.exit_stage, plain.exit_stage)  # the test can tell the two apart
    np.testing.assert_array_equal(topk.last_result.exit_stage, fused.exit_stage)
    assert sorted(r["corpus_id"] for r in ranked) == list(range(8))


def test_exit_layer_needs_the_fixed_policy(model_dir: Path) -> None:  # issue 17 #16
    with pytest.raises(OptionError, match="exit_layer=.* no exit layer with the candidate policy"):
        MatryoshkaReranker(model_dir, policy="candidate", exit_layer=2)


def test_made_up_documents_below_the_depth_are_refused(full: MatryoshkaReranker, corpus: dict[str, str]) -> None:
    ids = list(corpus)
    with pytest.raises(MissingDocumentError, match="document 'made-up' \\(query 'q1'\\)"):
        full.rerank_run({"q1": [*ids[:3], "made-up"]}, {"q1": "x"}, corpus, depth=2)


def test_error_messages_are_one_capped_line() -> None:  # issue 17 #16
    err = MissingDocumentError("q1", "x" * 5_000_000 + "\nsecond line", "corpus c.jsonl")
    text = str(err)
    assert len(text) < 1100 and "\n" not in text and "characters cut" in text and text.endswith("was retrieved from)")


def test_rank_runs_bounded_chunks_and_keeps_the_truncation_count(monkeypatch: pytest.MonkeyPatch, model_dir: Path,
                                                                 corpus: dict[str, str]) -> None:  # issue 16
    reranker = MatryoshkaReranker(model_dir, policy="candidate", threshold=0.9, threads=1)
    docs = [" ".join([text] * 8) for text in list(corpus.values())[:12]]  # long: every passage is truncated
    whole = reranker.rank("insulin", docs)
    truncated = reranker.last_result.truncated
    assert truncated == 12
    calls = []
    run = reranker.cascade.run
    monkeypatch.setattr(reranker.cascade, "run", lambda q, *a, **k: calls.append(len(q)) or run(q, *a, **k))
    monkeypatch.setattr(api, "MAX_CANDIDATES_PER_CALL", 5)
    chunked = reranker.rank("insulin", docs)
    assert calls == [5, 5, 2] and reranker.last_result.truncated == truncated
    assert [r["corpus_id"] for r in chunked] == [r["corpus_id"] for r in whole]
    np.testing.assert_allclose([r["score"] for r in chunked], [r["score"] for r in whole], atol=1e-5)
    calls.clear()
    grouped = MatryoshkaReranker(model_dir, policy="topk", threshold=0.5, threads=1)
    grouped_run = grouped.cascade.run
    monkeypatch.setattr(grouped.cascade, "run", lambda q, *a, **k: calls.append(len(q)) or grouped_run(q, *a, **k))
    grouped.rank("insulin", docs)
    assert calls == [12]  # topk compares a query's candidates: one query is never split
