"""Checkpoint selection on a dev split (``python -m matryoshka.training.dense.select``): trec_eval's nDCG formula,
weight-space soups, refusal of the test split, the best candidate saved as a loadable dense model."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.training.dense.modeling import BiEncoder
from matryoshka.training.dense.select import main, ndcg_at, recall_at, soup
from tests.fixtures.dense import make_tiny_beir, make_tiny_dense_base, write_flat_index


def test_ndcg_and_recall_by_hand() -> None:
    judged = {"a": 2, "b": 1, "z": 0}
    assert ndcg_at(["a", "b", "c"], judged) == pytest.approx(1.0)
    # b first, a second: (1 + 2/log2(3)) / (2 + 1/log2(3))
    assert ndcg_at(["b", "a"], judged) == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert ndcg_at(["z", "c"], judged) == 0.0
    assert recall_at(["c", "a"], judged, 100) == 0.5


def test_soup_interpolates_float_tensors_only() -> None:
    base = {"w": torch.zeros(2), "ids": torch.tensor([1, 2])}
    tuned = {"w": torch.ones(2) * 4, "ids": torch.tensor([1, 2])}
    mixed = soup(base, tuned, 0.25)
    assert mixed["w"].tolist() == [1.0, 1.0] and mixed["ids"].tolist() == [1, 2]


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = make_tiny_beir(tmp_path / "beir", queries=4)
    shutil.copy(data / "qrels" / "test.tsv", data / "qrels" / "dev.tsv")
    base = make_tiny_dense_base(tmp_path / "base", "bert")
    model = BiEncoder.build(base, pooling="mean", normalize=True, passage_max_length=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "cand")
    return data, base, tmp_path / "cand"


def test_select_scores_candidates_and_saves_the_best(setup: tuple[Path, Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data, base, cand = setup
    out, best = tmp_path / "sel.json", tmp_path / "best"
    assert main(["--data", str(data), "--split", "dev", "--base", str(base), "--candidates", str(cand),
                 "--soups", "0.5", "--max_length", "32", "--output", str(out), "--save_best", str(best)]) == 0
    summary = json.loads(out.read_text())
    assert set(summary["results"]) == {"base", str(cand), f"{cand} @ soup 0.5"}
    assert summary["best"] != "base" and summary["saved"] == str(best)
    reloaded = BiEncoder.load(best)
    assert reloaded.config.passage_max_length == 32 and reloaded.config.normalize
    # the saved model says how it was chosen
    assert json.loads((best / "selection.json").read_text()) == summary


def test_select_refuses_test_split_and_bad_soups(setup: tuple[Path, Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data, base, cand = setup
    common = ["--data", str(data), "--base", str(base), "--candidates", str(cand), "--output", str(tmp_path / "x")]
    assert main([*common, "--split", "test"]) == 2
    assert "selecting on test" in capsys.readouterr().err
    assert main([*common, "--soups", "1.5"]) == 2
    assert "between 0 and 1" in capsys.readouterr().err
    assert main([*common, "--candidates", str(base)]) == 2
    assert not (tmp_path / "x").exists()


def test_corpus_mode_candidate_reuses_the_base_index(setup: tuple[Path, Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A query-side fine-tune (frozen passage encoder = the base) is scored on the base model's document vectors:
    no document is encoded again, and the saved best keeps its passage encoder."""
    data, base, _ = setup
    model = BiEncoder.build(base, pooling="mean", normalize=True, passage_max_length=32, mode="corpus")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "query-side")
    index = write_flat_index(tmp_path / "index", base)
    encoded: list[str] = []
    original = BiEncoder.encode_texts

    def counting(self: BiEncoder, texts: list[str], kind: str, batch_size: int = 32) -> torch.Tensor:
        encoded.append(kind)
        return original(self, texts, kind, batch_size)

    monkeypatch.setattr(BiEncoder, "encode_texts", counting)
    out, best = tmp_path / "sel.json", tmp_path / "best"
    assert main(["--data", str(data), "--split", "dev", "--base", str(base), "--base_index", str(index),
                 "--candidates", str(tmp_path / "query-side"), "--max_length", "32", "--output", str(out),
                 "--save_best", str(best)]) == 0
    assert "passage" not in encoded and encoded.count("query") == 2
    summary = json.loads(out.read_text())
    assert summary["best"] == str(tmp_path / "query-side")
    reloaded = BiEncoder.load(best)
    assert reloaded.config.passage_encoder == "passage_encoder" and (best / "passage_encoder" / "config.json").is_file()
