"""Segment attention + cosine readout: the bi-encoder at step 0, the cache = the pair forward, the segment-head
phase (losses on hand values, resume = no stop, bad options), and the ONNX export of such a model."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch.nn.functional import normalize as nn_normalize

from matryoshka.training.config import ModelConfigError
from matryoshka.training.modeling import COSINE_SCALE, LayerwiseReranker
from matryoshka.training.segment_cache import SegmentCache, exit_scores
from matryoshka.training.segment_heads import (
    EncodedSet,
    SegmentHeadArguments,
    distillation_loss,
    gap_loss,
    main,
    positive_ce,
    prefit_projections,
    regression_projections,
    step_loss,
)
from tests.fixtures.tiny_models import make_tiny_base
from tests.test_training_loop import make_training_data

QUERIES = ["the cat sat", "protein cell gene", "blue ocean fish"]
PASSAGES = ["the cat sat on the mat", "gene study shows result on protein", "red dog on the mat"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("segments")
    data, _teacher = make_training_data(root)
    return {"root": root, "base": make_tiny_base(root / "base", "bert", num_layers=4, hidden=32, heads=4),
            "data": data}


def build(base: Path) -> LayerwiseReranker:
    return LayerwiseReranker.build(base, exits=(1, 2, 4), max_length=24, query_length=8, readout="cosine",
                                   attention="segments").eval()


def bi_encoder_cosine(base: Path, queries: list[str], passages: list[str]) -> np.ndarray:
    """What sentence-transformers computes: each text alone, [CLS] text [SEP], mean-pooled, cosine."""
    from tokenizers import Tokenizer
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(base)).eval()
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")

    def embed(text: str) -> torch.Tensor:
        ids = torch.tensor([[cls, *tokenizer.encode(text, add_special_tokens=False).ids, sep]])
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state.mean(dim=1)[0]

    return np.array([float(torch.nn.functional.cosine_similarity(embed(q), embed(p), dim=0))
                     for q, p in zip(queries, passages, strict=True)])


def pair_scores(model: LayerwiseReranker, queries: list[str], passages: list[str]):
    batch = model.layout.encode(model.tokenizer, queries, passages)
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()})


def test_step_zero_final_exit_is_the_bi_encoder(setup: dict[str, Path]) -> None:
    model = build(setup["base"])
    scores = pair_scores(model, QUERIES, PASSAGES)
    expected = COSINE_SCALE * bi_encoder_cosine(setup["base"], QUERIES, PASSAGES)
    np.testing.assert_allclose(scores.raw[-1].numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(scores.calibrated[-1].numpy(), expected, atol=1e-4)


def test_segments_do_not_see_each_other(setup: dict[str, Path]) -> None:
    model = build(setup["base"])
    one = pair_scores(model, ["the cat sat"] * 2, ["the cat sat on the mat", "the cat sat on the mat red dog"])
    # same query, different passage: the query segment's states must be identical (read through encode_segment)
    batch = model.layout.encode(model.tokenizer, ["the cat sat"] * 2, ["mat", "red dog on the mat fish ocean"])
    split = model.layout.query_length
    state = model.run_layers(model.embed(**{k: torch.from_numpy(v) for k, v in batch.items()}), 0, 4)
    query_means, _ = model.segment_means(state)
    torch.testing.assert_close(query_means[0], query_means[1], atol=1e-6, rtol=0)
    assert one.raw.shape == (3, 2) and split == 8


def test_cache_scores_equal_the_pair_forward(setup: dict[str, Path], tmp_path: Path) -> None:
    model = build(setup["base"])
    with torch.no_grad():  # move the early exits away from their initial identity so the test means something
        for key in model.projections:
            model.projections[key].weight.add_(0.1 * torch.randn_like(model.projections[key].weight))
    cache = SegmentCache(model, tmp_path / "cache", batch_size=2)
    q = torch.from_numpy(cache.means(QUERIES, "query"))
    p = torch.from_numpy(cache.means(PASSAGES, "passage"))
    assert q.shape == (3, 3, 32)
    with torch.no_grad():
        cached = exit_scores(model, q, p)
    torch.testing.assert_close(cached, pair_scores(model, QUERIES, PASSAGES).calibrated, atol=1e-4, rtol=1e-4)
    again = SegmentCache(model, tmp_path / "cache")
    assert len(again.known) == 6            # read back from disk, nothing re-encoded
    np.testing.assert_array_equal(again.means(QUERIES, "query"), q.numpy())


def test_losses_on_hand_values() -> None:
    teacher = torch.tensor([[math.log(3.0), 0.0]])          # softmax = [0.75, 0.25]
    student = torch.tensor([[0.0, 0.0]])                     # softmax = [0.5, 0.5]
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(distillation_loss(student, teacher, 1.0)) == pytest.approx(expected, abs=1e-6)
    assert float(distillation_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(positive_ce(torch.tensor([[math.log(3.0), 0.0]]))) == pytest.approx(-math.log(0.75), abs=1e-6)
    assert float(gap_loss(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]))) == pytest.approx(2.5)


def test_regression_init_recovers_an_affine_map_to_the_final_mean(setup: dict[str, Path]) -> None:
    # final means are unit vectors u; layer-1 means are M u + d: the best affine map back is exact
    model = build(setup["base"])
    generator = torch.Generator().manual_seed(0)
    hidden = model.config.hidden_size
    final = nn_normalize(torch.randn(200, hidden, generator=generator))
    mixing, shift = torch.randn(hidden, hidden, generator=generator), torch.randn(hidden, generator=generator)
    layer1 = final @ mixing.T + shift
    means = torch.stack([layer1, torch.randn(200, hidden, generator=generator), final], dim=1)   # exits 1, 2, 4
    data = EncodedSet(means[:120], means[120:], [[0]] * 120, [[1]] * 120)
    r2 = regression_projections(model, data, ridge=1e-9)
    assert r2[1] == pytest.approx(1.0, abs=1e-6) and r2[2] < 0.9     # layer 2 here is noise: a poor fit
    assert set(r2) == {1, 2}                                          # the final exit is left as it is
    q, p = means[:3, None], means[3:6, None]          # 3 queries x 1 passage each
    scores = exit_scores(model, q, p, calibrated=False)
    torch.testing.assert_close(scores[0], scores[2], atol=2e-3, rtol=0)   # exit 1 now scores as exit 4 (of 20)
    torch.testing.assert_close(model.projections["4"].weight, torch.eye(hidden))


def run_args(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--base_model", str(setup["base"]), "--train_sets", str(setup["data"]), "--output_dir", str(out),
            "--final_model_dir", str(out / "model"), "--exits", "1", "2", "4", "--max_length", "24",
            "--query_length", "8", "--group_size", "4", "--queries_per_step", "4", "--learning_rate", "1e-2",
            "--warmup_steps", "2", *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_training_moves_early_exits_only_and_resume_equals_no_stop(setup: dict[str, Path], tmp_path: Path) -> None:
    assert main(run_args(setup, tmp_path / "straight", "--max_steps", "6", "--save_steps", "0")) == 0
    # the first run of 6 steps, stopped after 3 (its checkpoint), then resumed
    assert main(run_args(setup, tmp_path / "resumed", "--max_steps", "6", "--save_steps", "3")) == 0
    partial = tmp_path / "resumed"
    (partial / "model").rename(tmp_path / "unused")
    assert main(run_args(setup, partial, "--max_steps", "6", "--save_steps", "3", "--resume")) == 0
    straight, resumed = weights(tmp_path / "straight" / "model"), weights(partial / "model")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=0, rtol=0, msg=key)
    torch.manual_seed(0)                  # as the run builds it (--seed 0)
    initial = build(setup["base"]).state_dict()
    changed = {k for k, v in straight.items() if not torch.equal(v, initial[k])}
    assert changed and all(k.split(".")[0] in ("projections", "heads", "compensation") for k in changed)
    assert not any(k.split(".")[1] == "4" for k in changed)           # the final exit stays the bi-encoder
    model = LayerwiseReranker.load(tmp_path / "straight" / "model")
    residual = model.config.compensation["per_exit"]
    assert residual["4"]["residual_std"] == 0.0 and residual["1"]["residual_std"] > 0.0


def test_final_exit_trains_only_when_asked_and_resume_equals_no_stop(setup: dict[str, Path], tmp_path: Path) -> None:
    final = ("--final_label_weight", "1.0", "--final_anchor_weight", "0.5", "--max_steps", "6")
    assert main(run_args(setup, tmp_path / "straight", *final, "--save_steps", "0")) == 0
    assert main(run_args(setup, tmp_path / "resumed", *final, "--save_steps", "3")) == 0
    (tmp_path / "resumed" / "model").rename(tmp_path / "unused")
    assert main(run_args(setup, tmp_path / "resumed", *final, "--save_steps", "3", "--resume")) == 0
    straight, resumed = weights(tmp_path / "straight" / "model"), weights(tmp_path / "resumed" / "model")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=0, rtol=0, msg=key)
    torch.manual_seed(0)
    initial = build(setup["base"]).state_dict()
    changed = {k for k, v in straight.items() if not torch.equal(v, initial[k])}
    assert {"projections.4.weight", "heads.4.weight"} <= changed
    assert not any(k.startswith("compensation.4.") for k in changed)     # the final exit's calibration stays 1, 0


def test_final_exit_loss_terms_on_hand_values(setup: dict[str, Path]) -> None:
    model, anchor = build(setup["base"]), build(setup["base"])
    with torch.no_grad():
        model.heads["4"].weight.mul_(0.5)                                  # final exit = half the anchor's scores
    generator = torch.Generator().manual_seed(1)
    data = EncodedSet(torch.randn(2, 3, model.config.hidden_size, generator=generator),
                      torch.randn(4, 3, model.config.hidden_size, generator=generator), [[0], [2]], [[1], [3]])
    batch = (torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]]))
    args = SegmentHeadArguments(base_model="b", train_sets=["t"], output_dir="o", final_model_dir="m",
                                exits=[1, 2, 4], final_label_weight=1.0)
    _, terms = step_loss(model, data, batch, args, anchor)
    q, p = data.queries[batch[0]][:, None], data.passages[batch[1]]
    with torch.no_grad():
        start = exit_scores(anchor, q, p, calibrated=False)[-1]
    assert terms["ce_final"] == pytest.approx(float(positive_ce(start / 2)), abs=1e-5)
    assert terms["kl_final"] == pytest.approx(float(distillation_loss(start / 2, start, 1.0)), abs=1e-5)
    assert terms["kl_final"] > 0
    frozen = SegmentHeadArguments(base_model="b", train_sets=["t"], output_dir="o", final_model_dir="m",
                                  exits=[1, 2, 4])
    assert "ce_final" not in step_loss(model, data, batch, frozen)[1]


@pytest.mark.parametrize(("flag", "value", "named"), [
    ("--group_size", "1", "group_size"), ("--temperature", "0", "temperature"),
    ("--label_weight", "-1", "label_weight"), ("--max_steps", "0", "max_steps"),
    ("--projection_init", "pca", "projection_init"), ("--ridge", "-0.5", "ridge"),
    ("--final_label_weight", "-1", "final_label_weight"), ("--final_anchor_weight", "-0.25", "final_anchor_weight")])
def test_bad_options_exit_2_with_one_line(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                          flag: str, value: str, named: str) -> None:
    assert main(run_args(setup, tmp_path / "bad", flag, value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and value in err[0]
    assert not (tmp_path / "bad" / "model").exists()


def test_resume_without_checkpoint_is_refused(setup: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    assert main(run_args(setup, tmp_path / "fresh", "--max_steps", "2", "--resume")) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_config_refuses_what_segments_cannot_do(setup: dict[str, Path]) -> None:
    with pytest.raises(ModelConfigError, match="attention='segments'"):
        LayerwiseReranker.build(setup["base"], exits=(2, 4), max_length=24, query_length=8, readout="cosine")
    with pytest.raises(ModelConfigError, match="compress_layers"):
        LayerwiseReranker.build(setup["base"], exits=(2, 4), max_length=24, query_length=8, readout="cosine",
                                attention="segments", compress_layers=(2,), compress_ratios=(2,))
    with pytest.raises(ModelConfigError, match="attention='bogus'"):
        LayerwiseReranker.build(setup["base"], exits=(2, 4), max_length=24, query_length=8, attention="bogus")


def test_projection_mlp_starts_as_the_identity_and_only_on_early_exits(setup: dict[str, Path]) -> None:
    plain = build(setup["base"])
    model = LayerwiseReranker.build(setup["base"], exits=(1, 2, 4), max_length=24, query_length=8,
                                    readout="cosine", attention="segments", projection_hidden=8).eval()
    assert model.projections["1"].mlp is not None and model.projections["4"].mlp is None
    expected, got = pair_scores(plain, QUERIES, PASSAGES), pair_scores(model, QUERIES, PASSAGES)
    torch.testing.assert_close(got.raw, expected.raw, atol=1e-6, rtol=0)
    with pytest.raises(ModelConfigError, match="projection_hidden"):
        LayerwiseReranker.build(setup["base"], exits=(2, 4), max_length=24, query_length=8, projection_hidden=8)


def test_prefit_moves_projections_towards_the_final_mean(setup: dict[str, Path]) -> None:
    model = LayerwiseReranker.build(setup["base"], exits=(1, 2, 4), max_length=24, query_length=8,
                                    readout="cosine", attention="segments", projection_hidden=16).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=generator)
    final = torch.tanh(x @ torch.randn(32, 32, generator=generator)) + 0.1 * x ** 2    # non-linear in x
    means = torch.stack([x, x, final], dim=1)                                           # [N, E, H]
    data = EncodedSet(means[:32], means[32:], [[0]] * 32, [[1]] * 32)
    args = SegmentHeadArguments(base_model="b", train_sets=["t"], output_dir="o", final_model_dir="m",
                                exits=[1, 2, 4], prefit_steps=0, learning_rate=1e-2)
    before = prefit_projections(model, data, args)
    args.prefit_steps = 200
    after = prefit_projections(model, data, args)
    assert set(after) == {1, 2} and all(after[e] > before[e] + 0.2 for e in after)
    assert not any(p.requires_grad for p in model.parameters())             # left frozen for the caller


def test_projection_mlp_training_resumes_to_the_same_weights(setup: dict[str, Path], tmp_path: Path) -> None:
    mlp = ("--projection_hidden", "8", "--prefit_steps", "5", "--projection_init", "regression", "--max_steps", "6")
    assert main(run_args(setup, tmp_path / "straight", *mlp, "--save_steps", "0")) == 0
    assert main(run_args(setup, tmp_path / "resumed", *mlp, "--save_steps", "3")) == 0
    (tmp_path / "resumed" / "model").rename(tmp_path / "unused")
    assert main(run_args(setup, tmp_path / "resumed", *mlp, "--save_steps", "3", "--resume")) == 0
    straight, resumed = weights(tmp_path / "straight" / "model"), weights(tmp_path / "resumed" / "model")
    assert "projections.1.mlp.1.weight" in straight and "projections.4.mlp.1.weight" not in straight
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=0, rtol=0, msg=key)
    assert LayerwiseReranker.load(tmp_path / "straight" / "model").config.projection_hidden == 8
