"""The compensation phase on a toy set: it trains only the compensation and brings early exits onto the final scale."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.errors import MatryoshkaError
from matryoshka.training.compensation import compensation_parameters, freeze_for_compensation, measure_residuals
from matryoshka.training.modeling import LayerwiseReranker
from matryoshka.training.objective import Objective, PhaseType
from tests.fixtures.tiny_models import make_tiny_base

GROUP = 4
QUERIES = ["cat mat", "ocean fish", "gene protein", "virus cell"]
POSITIVES = ["the cat sat on the mat", "blue ocean fish", "the gene of a protein", "virus of a cell"]
NEGATIVES = ["study result shows", "red dog", "the blue mat", "fish sat on the dog", "protein result", "cat ocean",
             "shows the red cell", "gene dog", "mat fish", "the study", "blue red", "dog sat"]


def _toy_batch(model: LayerwiseReranker) -> dict[str, torch.Tensor]:
    queries, passages = [], []
    for i, (query, positive) in enumerate(zip(QUERIES, POSITIVES, strict=True)):
        queries += [query] * GROUP
        passages += [positive, *NEGATIVES[3 * i: 3 * i + 3]]
    return {k: torch.from_numpy(v) for k, v in model.layout.encode(model.tokenizer, queries, passages).items()}


def _mean_gap(model: LayerwiseReranker, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        scores = model.eval()(**batch)
    return float(((scores.calibrated[:-1] - scores.calibrated[-1]) ** 2).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[LayerwiseReranker, dict[str, torch.Tensor]]:
    """A tiny reranker after a short layer-wise CE phase (exits rank, each on its own scale)."""
    base = make_tiny_base(tmp_path_factory.mktemp("comp") / "bert", "bert", num_layers=4, hidden=32, heads=4, seed=3)
    model = LayerwiseReranker.build(base, exits=[1, 2, 4], max_length=48, query_length=6, seed=3)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = _toy_batch(model)
    objective = Objective(PhaseType.LAYERWISE_CE, exits=model.config.exits)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(20):
        loss, _ = objective(model(**batch), GROUP)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, batch


def test_freeze_leaves_only_the_early_exit_compensation_trainable(trained) -> None:  # noqa: ANN001
    model, _ = trained
    params = freeze_for_compensation(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("compensation.1.", "compensation.2.")) for name in trainable)
    assert {id(p) for p in params} == {id(p) for p in compensation_parameters(model)}
    assert len(params) == 2 * 6                                           # 2 exits x (2 linears x 2 + scale + bias)


def test_compensation_shrinks_the_gap_to_the_final_exit(trained) -> None:  # noqa: ANN001
    model, batch = trained
    before = _mean_gap(model, batch)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("compensation.")}
    final_before = model.compensation["4"].state_dict()
    final_before = {k: v.clone() for k, v in final_before.items()}
    params = freeze_for_compensation(model)
    objective = Objective(PhaseType.COMPENSATION, exits=model.config.exits, gap_weight=5.0)
    optimizer = torch.optim.Adam(params, lr=2e-2)
    model.train()
    first_logged = None
    for _ in range(40):
        loss, logged = objective(model(**batch), GROUP)
        first_logged = first_logged or logged
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _mean_gap(model, batch)
    assert before > 0.05                                                  # the layer-wise phase left a real gap
    assert after < before / 10, (before, after)
    assert logged["gap/1"] < first_logged["gap/1"] and logged["gap/2"] < first_logged["gap/2"]
    # backbone, heads and the final exit's (reference) compensation did not move
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(torch.equal(model.compensation["4"].state_dict()[k], v) for k, v in final_before.items())

    residuals = measure_residuals(model, [batch, batch])
    assert residuals[4] == 0.0 and 0.0 < residuals[1] < before ** 0.5 * 4
    per_exit = model.config.compensation["per_exit"]
    assert per_exit["1"]["residual_std"] == pytest.approx(residuals[1])
    assert per_exit["2"]["scale"] == pytest.approx(float(model.compensation["2"].scale.detach()))
    assert model.config.compensation["residuals_measured_on"] == 2 * len(batch["input_ids"])
    with pytest.raises(MatryoshkaError, match="no batches"):
        measure_residuals(model, [])
