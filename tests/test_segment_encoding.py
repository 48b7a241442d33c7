"""Segment encoding (``export --encoding segments``): a stage encodes one query or one passage, and the cascade
encodes each query once per stage. Its scores equal the pair encoding's of the same checkpoint; a call holding
several queries gives each query the scores it gets alone; bad manifests and checkpoints are refused in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.export.errors import ExportError
from matryoshka.export.pipeline import ExportOptions, export_checkpoint
from matryoshka.export.validate import Criteria
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.manifest import ManifestError, load_manifest
from matryoshka.plugin.policies import make_policy
from matryoshka.plugin.session import StageSession
from matryoshka.training.modeling import LayerwiseReranker
from tests.fixtures.tiny_models import make_tiny_base

WORDS = "the cat sat on a mat gene protein cell study shows result blue ocean fish red dog runs fast".split()


def texts(rng: np.random.Generator, n: int, low: int, high: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, int(rng.integers(low, high)))) for _ in range(n)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segment-encoding")
    base = make_tiny_base(root / "base", "bert", num_layers=4, hidden=32, heads=4)
    model = LayerwiseReranker.build(base, exits=(1, 2, 4), max_length=40, query_length=10, readout="cosine",
                                    attention="segments", projection_hidden=16).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking early exits: projections and heads away from their start
        for key in ("1", "2"):
            model.projections[key].weight.add_(0.3 * torch.randn(32, 32, generator=generator))
            model.projections[key].mlp[-1].weight.normal_(0.0, 0.3, generator=generator)   # the residual MLP too
            model.heads[key].weight.mul_(0.5)
            model.compensation[key].adapter[2].weight.normal_(0.0, 0.5, generator=generator)
    checkpoint = model.save(root / "checkpoint")
    pair = export_checkpoint(checkpoint, root / "pair", ExportOptions(full_graph=False)).folder
    # the int8 variant here is for call-composition independence, not quality: how far int8 moves a random tiny
    # model's scores depends on the CPU's int8 kernels (CI's differ from ours), so its agreement is not gated
    segments = export_checkpoint(checkpoint, root / "segments",
                                 ExportOptions(encoding="segments", int8=True, int8_mode="per-tensor",
                                               criteria={"int8": Criteria()})).folder
    rng = np.random.default_rng(0)
    queries = texts(rng, 3, 1, 14)  # the longest is cut to the layout's query budget
    data = {"queries": [q for q in queries for _ in range(9)], "passages": texts(rng, 27, 1, 45),
            "groups": np.repeat(np.arange(3), 9)}
    (root / "data.json").write_text(json.dumps({k: np.asarray(v).tolist() for k, v in data.items()}))
    return {"root": root, "checkpoint": checkpoint, "pair": pair, "segments": segments}


def load_data(models: dict[str, Path]) -> tuple[list[str], list[str], np.ndarray]:
    data = json.loads((models["root"] / "data.json").read_text())
    return data["queries"], data["passages"], np.asarray(data["groups"])


def test_manifest_declares_the_segment_contract(models: dict[str, Path]) -> None:
    seg = load_manifest(models["segments"])
    assert seg.encoding == "segments" and seg.full_graph is None
    assert seg.stages[0].inputs == ("input_ids", "attention_mask", "query_embedding")
    assert seg.stages[1].inputs == ("hidden_states", "attention_mask", "position_ids", "query_embedding")
    assert "embedding" in seg.stages[0].outputs
    pair_json = json.loads((models["pair"] / "manifest.json").read_text())
    assert "encoding" not in pair_json  # pair manifests are written as before the field existed
    assert load_manifest(models["pair"]).encoding == "pair"


@pytest.mark.parametrize("policy", ["fixed:1", "fixed:2", "fixed:4", "topk:0.5", "candidate:0.9"])
def test_segment_scores_equal_the_pair_encoding(models: dict[str, Path], policy: str) -> None:
    queries, passages, groups = load_data(models)
    name, value = policy.split(":")
    results = []
    for folder in (models["pair"], models["segments"]):
        cascade = Cascade(folder, precision="fp32", threads=1, batch_size=4)
        chosen = (make_policy("fixed", None, cascade.exits, 0.9, exit_layer=int(value)) if name == "fixed"
                  else make_policy(name, float(value), cascade.exits, 0.9))
        results.append(cascade.run(queries, passages, chosen, groups))
    np.testing.assert_allclose(results[1].scores, results[0].scores, atol=1e-4)
    np.testing.assert_array_equal(results[1].exit_stage, results[0].exit_stage)
    assert results[1].truncated == results[0].truncated > 0  # some passages exceed the budget in both


def test_segment_scores_equal_pytorch(models: dict[str, Path]) -> None:
    queries, passages, groups = load_data(models)
    model = LayerwiseReranker.load(models["checkpoint"]).eval()
    batch = model.layout.encode(model.tokenizer, queries, passages)
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).calibrated.numpy()
    cascade = Cascade(models["segments"], precision="fp32", threads=1)
    for k, exit_layer in enumerate(cascade.exits):
        got = cascade.run(queries, passages, make_policy("fixed", None, cascade.exits, 0.9, exit_layer=exit_layer),
                          groups).scores
        np.testing.assert_allclose(got, expected[k], atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_call_with_several_queries_gives_each_its_own_scores(models: dict[str, Path], precision: str) -> None:
    queries, passages, groups = load_data(models)
    cascade = Cascade(models["segments"], precision=precision, threads=1, batch_size=8)
    policy = make_policy("topk", 0.5, cascade.exits, 0.9)
    together = cascade.run(queries, passages, policy, groups)
    alone_scores, alone_stages = np.empty(len(queries)), np.empty(len(queries), dtype=np.int64)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        part = cascade.run([queries[i] for i in rows], [passages[i] for i in rows], policy, groups[rows])
        alone_scores[rows], alone_stages[rows] = part.scores, part.exit_stage
    np.testing.assert_array_equal(together.exit_stage, alone_stages)
    if precision == "int8":  # one pair per call: exactly the same numbers
        np.testing.assert_array_equal(together.scores, alone_scores)
    else:  # fp32 batches of other compositions pad differently: equal up to float32 rounding
        np.testing.assert_allclose(together.scores, alone_scores, atol=1e-5)


def count_stage_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """From now on, every stage call appends ``(stage file name, rows)`` to the returned list."""
    calls: list[tuple[str, int]] = []
    original = StageSession.run

    def counting(self: StageSession, feeds: dict[str, np.ndarray], fetch: list[str] | None = None):
        calls.append((self.path.name, len(next(iter(feeds.values())))))
        return original(self, feeds, fetch)

    monkeypatch.setattr(StageSession, "run", counting)
    return calls


def test_queries_run_only_while_a_candidate_survives(models: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    queries, passages, groups = load_data(models)
    cascade = Cascade(models["segments"], precision="fp32", threads=1, batch_size=64)
    calls = count_stage_calls(monkeypatch)
    cascade.run(queries, passages, make_policy("fixed", None, cascade.exits, 0.9, exit_layer=1), groups)
    assert calls == [("stage_1.onnx", 3), ("stage_1.onnx", 27)]  # 3 queries once, 27 passages; no later stage
    calls.clear()
    alive_query = np.flatnonzero(groups == 1)  # only query 1's candidates go on: only query 1 runs stage 2
    result = cascade.run([queries[i] for i in alive_query], [passages[i] for i in alive_query],
                         make_policy("fixed", None, cascade.exits, 0.9, exit_layer=2))
    assert calls == [("stage_1.onnx", 1), ("stage_1.onnx", 9), ("stage_2.onnx", 1), ("stage_2.onnx", 9)]
    assert (result.exit_layer == 2).all()


def test_bad_encoding_in_a_manifest_is_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(models["segments"], folder)
    data = json.loads((folder / "manifest.json").read_text())
    for value, match in (("bogus", "encoding: expected one of pair, segments"),
                         ("pair", r"stages\[0\].inputs: expected \['input_ids', 'attention_mask', 'token_type_ids'")):
        (folder / "manifest.json").write_text(json.dumps({**data, "encoding": value}))
        with pytest.raises(ManifestError, match=match) as info:
            load_manifest(folder, verify=False)
        assert "\n" not in str(info.value)


def test_segments_export_of_a_pair_checkpoint_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    base = models["root"] / "base"
    pair_model = LayerwiseReranker.build(base, exits=(2, 4), max_length=40, query_length=10)
    checkpoint = pair_model.save(tmp_path / "pair-checkpoint")
    with pytest.raises(ExportError, match="--encoding segments needs a checkpoint with attention='segments'"):
        export_checkpoint(checkpoint, tmp_path / "out", ExportOptions(encoding="segments"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="--encoding bogus is invalid"):
        export_checkpoint(models["checkpoint"], tmp_path / "out", ExportOptions(encoding="bogus"))
    assert not (tmp_path / "out").exists()
