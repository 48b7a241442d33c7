"""benchmarks/soup_tradeoff.py: soups of a query-side fine-tuned dense model over its base index, by weight."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import soup_tradeoff
from matryoshka.training.dense.modeling import BiEncoder
from matryoshka.training.dense.select import evaluate
from tests.fixtures.dense import make_tiny_beir, make_tiny_dense_base, tiny_corpus, write_flat_index


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soups")
    base = make_tiny_dense_base(root / "base")
    beir = make_tiny_beir(root / "beir", queries=8)
    index = write_flat_index(root / "index", base, tiny_corpus(), passage_max_length=32)
    models = {}
    torch.manual_seed(0)
    for mode in ("corpus", "normal"):
        model = BiEncoder.build(base, pooling="mean", normalize=True, mode=mode, passage_max_length=32)
        with torch.no_grad():
            for p in model.backbone.parameters():
                p.add_(0.3 * torch.randn_like(p))
        models[mode] = model.save(root / f"tuned-{mode}")
    return {"base": base, "beir": beir, "index": index, **models}


def test_the_ends_are_the_base_and_the_tuned_model(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "soups.md"
    assert soup_tradeoff.main(["--base", str(setup["base"]), "--model", str(setup["corpus"]), "--sets",
                               f"tiny:test:{setup['beir']}:{setup['index']}", "--weights", "0", "0.5", "1",
                               "--output", str(out), "--threads", "1"]) == 0
    cells = re.search(r"\| tiny test \| (.*) \|", out.read_text()).group(1).replace("**", "").split(" | ")
    from matryoshka.io.beir import load_beir

    data = load_beir(setup["beir"], "test")
    docs = [d.contents for d in tiny_corpus().values()]
    tuned = BiEncoder.load(setup["corpus"])
    base = BiEncoder.build(setup["base"], pooling="mean", normalize=True, passage_max_length=32)
    expected = [evaluate(m, list(tiny_corpus()), docs, data.split_queries, data.qrels, 64)["nDCG@10"]
                for m in (base, tuned)]
    assert [float(cells[0]), float(cells[2])] == pytest.approx(expected, abs=1e-4)
    assert expected[0] != expected[1]  # the fixture's fine-tune changed the ranking


def test_refuses_what_would_need_other_document_vectors(setup: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soups.md"
    common = ["--base", str(setup["base"]), "--output", str(out)]
    good = f"tiny:test:{setup['beir']}:{setup['index']}"
    assert soup_tradeoff.main([*common, "--model", str(setup["normal"]), "--sets", good]) == 2
    assert "a query-side fine-tuned model" in capsys.readouterr().err
    other = write_flat_index(tmp_path / "half", setup["base"], dict(list(tiny_corpus().items())[:5]))
    assert soup_tradeoff.main([*common, "--model", str(setup["corpus"]), "--sets",
                               f"tiny:test:{setup['beir']}:{other}"]) == 2
    assert "is missing" in capsys.readouterr().err
    assert soup_tradeoff.main([*common, "--model", str(setup["corpus"]), "--sets", "tiny:test"]) == 2
    assert "NAME:SPLIT:BEIR_FOLDER:BASE_INDEX" in capsys.readouterr().err
    assert soup_tradeoff.main([*common, "--model", str(setup["corpus"]), "--sets", good, "--weights", "1.5"]) == 2
    assert not out.exists()
