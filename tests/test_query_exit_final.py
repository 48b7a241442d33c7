"""``query_exit="final"``: every early exit scores its passage against the query's final-layer embedding. The pair
forward, the cached means, the ONNX stages and the cascade agree; the regression init fits passages only; training
resumes to the same weights; what cannot carry the query's final embedding (pair encoding, other readouts, other
manifest encodings) is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch.nn.functional import normalize

from matryoshka.export.errors import ExportError
from matryoshka.export.pipeline import ExportOptions, export_checkpoint
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.manifest import ManifestError, load_manifest
from matryoshka.plugin.policies import make_policy
from matryoshka.training.config import ModelConfigError
from matryoshka.training.modeling import LayerwiseReranker
from matryoshka.training.segment_cache import SegmentCache, exit_scores
from matryoshka.training.segment_heads import EncodedSet, main, regression_projections
from tests.fixtures.tiny_models import make_tiny_base
from tests.test_segment_encoding import count_stage_calls, texts
from tests.test_training_loop import make_training_data
from tests.test_training_segments import run_args, weights

QUERIES = ["the cat sat", "protein cell gene", "blue ocean fish"]
PASSAGES = ["the cat sat on the mat", "gene study shows result on protein", "red dog on the mat"]


def build(base: Path, query_exit: str = "final") -> LayerwiseReranker:
    model = LayerwiseReranker.build(base, exits=(1, 2, 4), max_length=40, query_length=10, readout="cosine",
                                    attention="segments", query_exit=query_exit).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking early exits
        for key in ("1", "2"):
            model.projections[key].weight.add_(0.3 * torch.randn(32, 32, generator=generator))
            model.heads[key].weight.mul_(0.5)
            model.compensation[key].adapter[2].weight.normal_(0.0, 0.5, generator=generator)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("query-exit-final")
    base = make_tiny_base(root / "base", "bert", num_layers=4, hidden=32, heads=4)
    checkpoint = build(base).save(root / "checkpoint")
    segments = export_checkpoint(checkpoint, root / "segments", ExportOptions(encoding="segments")).folder
    data, _teacher = make_training_data(root)
    return {"root": root, "base": base, "checkpoint": checkpoint, "segments": segments, "data": data}


def pair_forward(model: LayerwiseReranker, queries: list[str], passages: list[str]):
    batch = model.layout.encode(model.tokenizer, queries, passages)
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()})


def test_early_exits_read_the_final_query_and_the_cache_equals_the_pair_forward(setup: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    model, same = build(setup["base"]), build(setup["base"], "same")
    cache = SegmentCache(model, tmp_path / "cache", batch_size=2)
    q = torch.from_numpy(cache.means(QUERIES, "query"))             # [3, E, H]
    p = torch.from_numpy(cache.means(PASSAGES, "passage"))
    with torch.no_grad():
        cached = exit_scores(model, q, p)
        by_hand = normalize(model.projections["4"](q[:, -1]), dim=-1) * normalize(model.projections["1"](p[:, 0]),
                                                                                 dim=-1)
        expected_exit1 = model.head_scores(by_hand, 1)[1]
    forward = pair_forward(model, QUERIES, PASSAGES)
    torch.testing.assert_close(cached, forward.calibrated, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached[0], expected_exit1, atol=1e-5, rtol=0)
    other = pair_forward(same, QUERIES, PASSAGES)
    assert not torch.allclose(other.calibrated[0], forward.calibrated[0], atol=1e-3)   # exit 1 changed ...
    torch.testing.assert_close(other.calibrated[-1], forward.calibrated[-1])          # ... the final exit did not


def test_stages_and_cascade_equal_pytorch(setup: dict[str, Path]) -> None:
    manifest = load_manifest(setup["segments"])
    assert manifest.query_exit == "final"
    assert json.loads((setup["segments"] / "manifest.json").read_text())["query_exit"] == "final"
    rng = np.random.default_rng(1)
    queries = [q for q in texts(rng, 3, 1, 14) for _ in range(7)]
    passages, groups = texts(rng, 21, 1, 45), np.repeat(np.arange(3), 7)
    model = LayerwiseReranker.load(setup["checkpoint"]).eval()
    expected = pair_forward(model, queries, passages).calibrated.numpy()
    cascade = Cascade(setup["segments"], precision="fp32", threads=1, batch_size=4)
    for k, exit_layer in enumerate(cascade.exits):
        policy = make_policy("fixed", None, cascade.exits, 0.9, exit_layer=exit_layer)
        np.testing.assert_allclose(cascade.run(queries, passages, policy, groups).scores, expected[k], atol=1e-4)


def test_queries_run_every_stage_before_the_first_passage(setup: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cascade = Cascade(setup["segments"], precision="fp32", threads=1, batch_size=64)
    calls = count_stage_calls(monkeypatch)
    cascade.run(["a cat", "a cat", "blue fish"], ["the mat", "a dog", "red ocean"],
                make_policy("fixed", None, cascade.exits, 0.9, exit_layer=1), np.array([0, 0, 1]))
    assert calls == [("stage_1.onnx", 2), ("stage_2.onnx", 2), ("stage_3.onnx", 2), ("stage_1.onnx", 3)]


def test_regression_init_fits_passages_only(setup: dict[str, Path]) -> None:
    # passages: layer-1 means are an exact affine image of their unit final means; queries: pure noise. With the
    # query at the final exit P_1 never sees a query, so the fit is exact; the "same" model must fit both and cannot
    generator = torch.Generator().manual_seed(0)
    final = normalize(torch.randn(150, 32, generator=generator))
    mixing, shift = torch.randn(32, 32, generator=generator), torch.randn(32, generator=generator)
    passages = torch.stack([final @ mixing.T + shift, torch.randn(150, 32, generator=generator), final], dim=1)
    queries = torch.randn(60, 3, 32, generator=generator)
    data = EncodedSet(queries, passages, [[0]] * 60, [[1]] * 60)
    assert regression_projections(build(setup["base"]), data, ridge=1e-9)[1] == pytest.approx(1.0, abs=1e-6)
    assert regression_projections(build(setup["base"], "same"), data, ridge=1e-9)[1] < 0.9


def test_training_with_the_final_query_resumes_to_the_same_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    extra = ("--query_exit", "final", "--projection_init", "regression", "--max_steps", "6")
    assert main(run_args(setup, tmp_path / "straight", *extra, "--save_steps", "0")) == 0
    partial = tmp_path / "resumed"
    assert main(run_args(setup, partial, *extra, "--save_steps", "3")) == 0
    (partial / "model").rename(tmp_path / "unused")
    assert main(run_args(setup, partial, *extra, "--save_steps", "3", "--resume")) == 0
    straight, resumed = weights(tmp_path / "straight" / "model"), weights(partial / "model")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=0, rtol=0, msg=key)
    assert LayerwiseReranker.load(tmp_path / "straight" / "model").config.query_exit == "final"


def test_what_cannot_carry_the_final_query_is_refused(setup: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ModelConfigError, match="query_exit='bogus' is invalid"):
        build(setup["base"], "bogus")
    with pytest.raises(ModelConfigError, match="and 'same' unless readout='cosine'"):
        LayerwiseReranker.build(setup["base"], exits=(2, 4), max_length=40, query_length=10, readout="mean",
                                query_exit="final")
    with pytest.raises(ExportError, match="--encoding pair cannot export a checkpoint with query_exit='final'"):
        export_checkpoint(setup["checkpoint"], tmp_path / "out", ExportOptions(encoding="pair"))
    assert not (tmp_path / "out").exists()
    capsys.readouterr()
    assert main(run_args(setup, tmp_path / "bad", "--query_exit", "last")) == 2
    assert capsys.readouterr().err.strip() == "error: query_exit='last' is invalid: expected one of same, final"
    assert not (tmp_path / "bad").exists()
    folder = tmp_path / "model"
    shutil.copytree(setup["segments"], folder)
    data = json.loads((folder / "manifest.json").read_text())
    for change, match in (({"query_exit": "last"}, "query_exit: expected one of same, final"),
                          ({"query_exit": 1}, "query_exit"),
                          ({"encoding": "pair"}, "'same' unless encoding is 'segments'")):
        (folder / "manifest.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(ManifestError, match=match) as info:
            load_manifest(folder, verify=False)
        assert "\n" not in str(info.value)
