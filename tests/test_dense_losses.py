"""Bi-encoder losses on hand-made embeddings: InfoNCE (normal / custom), false-negative mask, KL distillation, the
corpus-mode softmax over a fixed index with graded targets."""

from __future__ import annotations

import math

import pytest
import torch

from matryoshka.training.dense.config import DenseConfigError, TrainingMode
from matryoshka.training.dense.corpus import PassageIndex
from matryoshka.training.dense.losses import DenseObjective, contrastive_loss, corpus_loss, distill_loss, group_scores


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


# two queries, groups of two passages (positive first): rows 0,1 belong to q0; rows 2,3 to q1
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
P = torch.tensor([[0.8, 0.1], [0.3, 0.5], [0.2, 0.9], [0.6, 0.4]])


def test_normal_mode_uses_in_batch_negatives() -> None:
    temperature = 0.5
    loss = contrastive_loss(Q, P, 2, temperature, TrainingMode.NORMAL)
    s0 = [0.8 / temperature, 0.3 / temperature, 0.2 / temperature, 0.6 / temperature]  # q0 . every passage
    s1 = [0.1 / temperature, 0.5 / temperature, 0.9 / temperature, 0.4 / temperature]
    expected = ((logsumexp(s0) - s0[0]) + (logsumexp(s1) - s1[2])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_custom_mode_scores_only_the_own_group() -> None:
    loss = contrastive_loss(Q, P, 2, 1.0, TrainingMode.CUSTOM)
    expected = ((logsumexp([0.8, 0.3]) - 0.8) + (logsumexp([0.9, 0.4]) - 0.9)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() != pytest.approx(contrastive_loss(Q, P, 2, 1.0, TrainingMode.NORMAL).item(), rel=1e-3)


def test_known_positives_elsewhere_in_the_batch_are_not_negatives() -> None:
    keys = torch.tensor([11, 12, 21, 22])  # passage row 3 (in q1's group) is a known positive of q0
    positives = torch.tensor([[11, 22], [21, 0]])
    loss = contrastive_loss(Q, P, 2, 1.0, TrainingMode.NORMAL, passage_keys=keys, positive_keys=positives)
    expected = ((logsumexp([0.8, 0.3, 0.2]) - 0.8) + (logsumexp([0.1, 0.5, 0.9, 0.4]) - 0.9)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_distillation_is_kl_to_the_teacher_over_each_group() -> None:
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0]])
    t = [math.exp(1) / (2 * math.exp(1) + 1), math.exp(1) / (2 * math.exp(1) + 1), 1 / (2 * math.exp(1) + 1)]
    log_s = [v - logsumexp([2.0, 0.0, -1.0]) for v in (2.0, 0.0, -1.0)]
    expected = sum(ti * (math.log(ti) - si) for ti, si in zip(t, log_s, strict=True))
    assert distill_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert distill_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    halved = torch.tensor([[0.5, 0.5, 0.0]])  # temperature 2 on the teacher == teacher / 2
    assert distill_loss(student, teacher, 2.0).item() == pytest.approx(distill_loss(student, halved).item())


def test_objective_adds_weighted_distillation_on_group_scores() -> None:
    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    objective = DenseObjective(temperature=0.5, teacher_weight=0.25)
    loss, parts = objective(Q, P, 2, teacher)
    student = group_scores(Q, P, 2) / 0.5
    assert torch.allclose(student, torch.tensor([[1.6, 0.6], [1.8, 0.8]]))
    assert parts["kl/teacher"].item() == pytest.approx(distill_loss(student, teacher).item())
    assert loss.item() == pytest.approx(parts["ce/contrastive"].item() + 0.25 * parts["kl/teacher"].item())
    _, without = DenseObjective(temperature=0.5)(Q, P, 2)
    assert set(without) == {"ce/contrastive"}


def test_shape_mismatches_are_clear_errors() -> None:
    with pytest.raises(DenseConfigError, match="3 passages for 2 queries of group size 2"):
        contrastive_loss(Q, P[:3], 2, 1.0, TrainingMode.NORMAL)
    with pytest.raises(DenseConfigError, match="one teacher score per passage"):
        distill_loss(torch.zeros(2, 2), torch.zeros(2, 3))


def test_corpus_loss_is_soft_cross_entropy_over_every_document() -> None:
    index = PassageIndex(None, ["a", "b", "c", "d"], {"a": 0, "b": 1, "c": 2, "d": 3}, P)  # type: ignore[arg-type]
    targets = index.targets([{"b": 2, "d": 1}, {"c": 1}])
    # grade 2 weighs 2**2 - 1 = 3, grade 1 weighs 1
    assert targets.tolist() == [[0.0, 0.75, 0.0, 0.25], [0.0, 0.0, 1.0, 0.0]]
    temperature = 0.5
    losses = corpus_loss(Q, P, targets, temperature)
    s0 = [0.8 / temperature, 0.3 / temperature, 0.2 / temperature, 0.6 / temperature]
    s1 = [0.1 / temperature, 0.5 / temperature, 0.9 / temperature, 0.4 / temperature]
    expected0 = 0.75 * (logsumexp(s0) - s0[1]) + 0.25 * (logsumexp(s0) - s0[3])
    assert losses.tolist() == pytest.approx([expected0, logsumexp(s1) - s1[2]], rel=1e-6)
    with pytest.raises(DenseConfigError, match=r"expected \[n, H\], \[N, H\] and \[n, N\]"):
        corpus_loss(Q, P, targets[:, :3], temperature)
