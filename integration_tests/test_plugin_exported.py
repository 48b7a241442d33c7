"""The cascade runtime on a REAL exported model folder (the export's tiny random BERT, with passage compression):
the stage chain reproduces the exported full graph, threshold 1.0 equals fixed full depth exactly, and early-exited
candidates keep the score of their exit, for every precision the export wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from matryoshka.plugin.api import MatryoshkaReranker
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.manifest import load_manifest
from matryoshka.plugin.policies import make_policy

REPO = Path(__file__).resolve().parent.parent


def tiny_exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export's tiny random encoder (exits 1, 2, 4; compression after layer 2, ratio 2; fp32/int8/fp16), built
    once per test session and shared by the plugin's integration tests."""
    pytest.importorskip("torch", reason="building the tiny exported model needs the train/export extras")
    from tests.fixtures.exported import tiny_exported_model

    root = tmp_path_factory.getbasetemp() / "plugin-tiny-exported"
    done = root / "folder.txt"
    if not done.is_file():
        folder = tiny_exported_model(root, "encoder", compression={"layer": 2, "ratio": 2}, int8=True, fp16=True)
        done.write_text(str(folder))
    return Path(done.read_text())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_exported(tmp_path_factory)


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list[str], np.ndarray]:
    with (REPO / "data" / "scifact-mini" / "corpus.jsonl").open(encoding="utf-8") as handle:
        docs = [json.loads(line) for _, line in zip(range(48), handle, strict=False)]
    passages = [" ".join(d["text"].split()[: 3 + (i * 7) % 60]) for i, d in enumerate(docs)]
    queries = ["vitamin d and bone fractures"] * 24 + ["what regulates gene expression"] * 24
    return queries, passages, np.array([0] * 24 + [1] * 24)


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_stage_chain_equals_the_full_graph(model_dir: Path, pairs, precision: str) -> None:
    queries, passages, groups = pairs
    manifest = load_manifest(model_dir)
    assert manifest.full_graph is not None and precision in manifest.full_graph.files
    cascade = Cascade(model_dir, precision=precision, batch_size=48, threads=1)
    chain = cascade.run(queries, passages, make_policy("fixed", None, cascade.exits, 0.5), groups).scores
    full = ort.InferenceSession(str(model_dir / manifest.full_graph.files[precision].path),
                                providers=["CPUExecutionProvider"])
    q_ids, p_ids = cascade.tokenize(queries, passages)
    # as the chain ran: one batch of 48 rows, or one row per call for int8 (its scales are per call)
    batches = [np.arange(len(queries))] if precision != "int8" else [np.array([i]) for i in range(len(queries))]
    direct = np.concatenate([
        full.run(["score"], {i.name: feeds[i.name] for i in full.get_inputs()})[0].reshape(-1)
        for feeds in (cascade._first_feeds(rows, q_ids, p_ids) for rows in batches)])
    tolerance = 1e-4 if precision == "fp32" else 5e-2
    np.testing.assert_allclose(chain, direct, rtol=0, atol=tolerance)


@pytest.mark.parametrize("precision", ["fp32", "int8", "fp16"])
def test_threshold_one_is_fixed_full_depth_and_exits_keep_their_score(model_dir: Path, pairs, precision: str
                                                                      ) -> None:
    queries, passages, groups = pairs
    cascade = Cascade(model_dir, precision=precision, batch_size=8, threads=1)
    per_exit = {e: cascade.run(queries, passages, make_policy("fixed", None, cascade.exits, 0.5, exit_layer=e),
                               groups).scores for e in cascade.exits}
    for name in ("candidate", "query", "topk"):
        at_one = cascade.run(queries, passages, make_policy(name, 1.0, cascade.exits, 0.5, top_k=5), groups)
        assert np.array_equal(at_one.scores, per_exit[cascade.exits[-1]]), name
    # a threshold between the confidences of the first exit lets part of the candidates stop there
    p = 1.0 / (1.0 + np.exp(-per_exit[cascade.exits[0]]))
    threshold = float(np.quantile(np.maximum(p, 1.0 - p), 0.5))
    result = cascade.run(queries, passages, make_policy("candidate", threshold, cascade.exits, 0.5), groups)
    assert 0 < (result.exit_stage == 0).sum() < len(queries)
    for k, layer in enumerate(cascade.exits):  # int8 too: its pairs run one per call, independent of the batch
        rows = result.exit_stage == k
        np.testing.assert_allclose(result.scores[rows], per_exit[layer][rows], rtol=0, atol=1e-5)


def test_an_int8_score_does_not_depend_on_its_batch(model_dir: Path, pairs) -> None:  # issue 17 #7
    queries, passages, groups = pairs
    cascade = Cascade(model_dir, precision="int8", batch_size=16, threads=1)
    policy = make_policy("fixed", None, cascade.exits, 0.5)
    together = cascade.run(queries, passages, policy, groups).scores
    alone = np.array([cascade.run([q], [p], policy).scores[0] for q, p in zip(queries, passages, strict=True)])
    np.testing.assert_array_equal(together, alone)


def test_api_on_the_exported_model(model_dir: Path, pairs) -> None:
    queries, passages, _groups = pairs
    reranker = MatryoshkaReranker(model_dir, policy="candidate", threshold=1.0, threads=1)
    assert reranker.cascade.precision == load_manifest(model_dir).default_precision
    ranked = reranker.rank(queries[0], passages[:10], top_k=3)
    assert len(ranked) == 3 and ranked[0]["score"] >= ranked[1]["score"] >= ranked[2]["score"]
    assert reranker.stats.to_dict()["mean_layers_per_candidate"] == float(reranker.exits[-1])
