"""Losses and the phase objective on hand-made logits, against values computed by hand (math, not torch)."""

from __future__ import annotations

import math

import pytest
import torch

from matryoshka.training.losses import (
    LOSS_REGISTRY,
    GapLoss,
    ListwiseCELoss,
    LossInputError,
    LossType,
    SelfDistillLoss,
    SelfDistillStrategy,
    TeacherDistillLoss,
    build_loss,
    teacher_indices,
)
from matryoshka.training.modeling import ExitScores
from matryoshka.training.objective import Objective, PhaseType


def softmax(values: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


# two exits, two queries, groups of 3 (positive first)
EXIT_A = [2.0, 0.0, -1.0, 0.5, 1.5, 0.0]
EXIT_B = [1.0, 1.0, 0.0, 3.0, -1.0, 0.0]
TEACHER = [4.0, 1.0, 0.0, 0.0, 2.0, 1.0]


def scores(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_listwise_ce_by_hand() -> None:
    out = ListwiseCELoss()(scores(EXIT_A, EXIT_B), 3)
    for row, values in enumerate((EXIT_A, EXIT_B)):
        expected = (-math.log(softmax(values[:3])[0]) - math.log(softmax(values[3:])[0])) / 2
        assert float(out[row]) == pytest.approx(expected, rel=1e-12)
    # a perfectly separated group costs ~0, a reversed one ~the margin
    assert float(ListwiseCELoss()(scores([50.0, 0.0]), 2)[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(ListwiseCELoss()(scores([0.0, 50.0]), 2)[0]) == pytest.approx(50.0, rel=1e-9)


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_teacher_distill_by_hand(t: float) -> None:
    out = TeacherDistillLoss(temperature=t)(scores(EXIT_A, EXIT_B), 3, torch.tensor(TEACHER))
    for row, values in enumerate((EXIT_A, EXIT_B)):
        per_query = [kl(softmax(TEACHER[s:s + 3], t), softmax(values[s:s + 3], t)) for s in (0, 3)]
        assert float(out[row]) == pytest.approx(t * t * sum(per_query) / 2, rel=1e-6)
    same = TeacherDistillLoss(temperature=t)(scores(TEACHER), 3, torch.tensor(TEACHER))
    assert float(same[0]) == pytest.approx(0.0, abs=1e-7)


def test_teacher_distill_needs_a_teacher() -> None:
    with pytest.raises(LossInputError, match="needs teacher_scores"):
        TeacherDistillLoss()(scores(EXIT_A), 3)
    with pytest.raises(LossInputError, match=r"expected \[6\]"):
        TeacherDistillLoss()(scores(EXIT_A), 3, torch.zeros(4))


def test_gap_by_hand_and_detached_reference() -> None:
    a = scores(EXIT_A, EXIT_B).requires_grad_(True)
    out = GapLoss()(a, 3)
    expected = sum((x - y) ** 2 for x, y in zip(EXIT_A, EXIT_B, strict=True)) / 6
    assert float(out[0].detach()) == pytest.approx(expected, rel=1e-12) and float(out[1].detach()) == 0.0
    out.sum().backward()
    assert torch.count_nonzero(a.grad[1]) == 0                         # the final exit is not pulled
    assert a.grad[0].tolist() == pytest.approx([2 * (x - y) / 6 for x, y in zip(EXIT_A, EXIT_B, strict=True)])


def test_self_distill_strategies_teacher_choice() -> None:
    exits = (2, 3, 4, 5, 6)
    assert teacher_indices(SelfDistillStrategy.FINAL, exits) == [4, 4, 4, 4, None]
    assert teacher_indices(SelfDistillStrategy.NEXT_DEEPER, exits) == [1, 2, 3, 4, None]
    assert teacher_indices(SelfDistillStrategy.ANCHORS, exits, anchors=(4,)) == [2, 2, 4, 4, None]
    assert teacher_indices(SelfDistillStrategy.TEACHER, exits) == [None] * 5
    with pytest.raises(LossInputError, match="anchors"):
        teacher_indices(SelfDistillStrategy.ANCHORS, exits, anchors=(7,))


@pytest.mark.parametrize("strategy", list(SelfDistillStrategy))
def test_self_distill_values_by_hand(strategy: SelfDistillStrategy) -> None:
    exit_c = [0.0, 2.0, 1.0, 1.0, 1.0, -2.0]
    rows = (EXIT_A, EXIT_B, exit_c)
    t = 2.0
    loss = SelfDistillLoss(exits=(1, 2, 3), strategy=strategy, temperature=t, anchors=(2,))
    grads = scores(*rows).requires_grad_(True)
    out = loss(grads, 3, torch.tensor(TEACHER))
    values = out.detach()

    def by_hand(student: list[float], teacher: list[float]) -> float:
        return t * t * sum(kl(softmax(teacher[s:s + 3], t), softmax(student[s:s + 3], t)) for s in (0, 3)) / 2

    teacher_rows = {SelfDistillStrategy.FINAL: [exit_c, exit_c, None],
                    SelfDistillStrategy.NEXT_DEEPER: [EXIT_B, exit_c, None],
                    SelfDistillStrategy.ANCHORS: [EXIT_B, exit_c, None],
                    SelfDistillStrategy.TEACHER: [TEACHER, TEACHER, TEACHER]}[strategy]
    for row, teacher in enumerate(teacher_rows):
        expected = 0.0 if teacher is None else by_hand(rows[row], teacher)
        assert float(values[row]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    out[0].backward()
    assert torch.count_nonzero(grads.grad[1:]) == 0                     # teachers are detached



@pytest.mark.parametrize("t", [0.5, 1.0, 3.0])
def test_self_distill_teacher_strategy_is_the_teacher_loss(t: float) -> None:
    generator = torch.Generator().manual_seed(int(t * 10))
    logits = torch.randn(4, 5 * 6, generator=generator, dtype=torch.float64)
    teacher = torch.randn(5 * 6, generator=generator, dtype=torch.float64) * 3
    strategy = SelfDistillLoss(exits=(1, 2, 3, 4), strategy=SelfDistillStrategy.TEACHER, temperature=t)
    assert torch.equal(strategy(logits, 6, teacher), TeacherDistillLoss(temperature=t)(logits, 6, teacher))

def test_registry_and_build() -> None:
    assert set(LOSS_REGISTRY) == set(LossType)
    assert isinstance(build_loss(LossType.GAP), GapLoss)
    assert build_loss(LossType.SELF_DISTILL, exits=(1, 2), strategy=SelfDistillStrategy.NEXT_DEEPER).teachers == [1,
                                                                                                           None]
    with pytest.raises(LossInputError, match="bad options"):
        build_loss(LossType.GAP, temperature=2.0)
    with pytest.raises(LossInputError, match="loss_type"):
        build_loss("gap")  # type: ignore[arg-type]
    with pytest.raises(LossInputError, match="whole number of groups"):
        ListwiseCELoss()(scores(EXIT_A), 4)


def test_objective_phases() -> None:
    raw = scores(EXIT_A, EXIT_B)
    calibrated = raw * 2
    exit_scores = ExitScores((2, 4), raw, calibrated)
    ce = Objective(PhaseType.LAYERWISE_CE, exits=(2, 4))
    loss, logged = ce(exit_scores, 3)
    ce_by_hand = [sum(-math.log(softmax(v[s:s + 3])[0]) for s in (0, 3)) / 2 for v in (EXIT_A, EXIT_B)]
    assert float(loss) == pytest.approx(sum(ce_by_hand))
    assert set(logged) == {"ce/2", "ce/4", "loss"} and logged["ce/2"] == pytest.approx(ce_by_hand[0])

    sd = Objective(PhaseType.SELF_DISTILL, exits=(2, 4), temperature=1.0, distill_weight=0.5, teacher_weight=2.0)
    loss, logged = sd(exit_scores, 3, torch.tensor(TEACHER))
    distill = sum(kl(softmax(EXIT_B[s:s + 3]), softmax(EXIT_A[s:s + 3])) for s in (0, 3)) / 2
    teach = [sum(kl(softmax(TEACHER[s:s + 3]), softmax(v[s:s + 3])) for s in (0, 3)) / 2 for v in (EXIT_A, EXIT_B)]
    assert float(loss) == pytest.approx(sum(ce_by_hand) + 0.5 * distill + 2.0 * sum(teach))
    assert logged["self_distill/4"] == 0.0 and logged["teacher/4"] == pytest.approx(teach[1])
    assert sd.needs_teacher
    with pytest.raises(LossInputError, match="needs teacher_scores"):
        sd(exit_scores, 3)

    comp = Objective(PhaseType.COMPENSATION, exits=(2, 4), gap_weight=3.0)
    loss, logged = comp(exit_scores, 3)                                 # reads the calibrated scores
    ce2 = [sum(-math.log(softmax([2 * x for x in v[s:s + 3]])[0]) for s in (0, 3)) / 2 for v in (EXIT_A, EXIT_B)]
    gap = sum((2 * x - 2 * y) ** 2 for x, y in zip(EXIT_A, EXIT_B, strict=True)) / 6
    assert float(loss) == pytest.approx(sum(ce2) + 3.0 * gap)
    assert set(logged) == {"ce/2", "ce/4", "gap/2", "gap/4", "loss"}
    with pytest.raises(LossInputError, match="expected \\[2, 4\\]"):
        comp(ExitScores((1, 4), raw, calibrated), 3)
    with pytest.raises(LossInputError, match="phase"):
        Objective("compensation", exits=(2, 4))  # type: ignore[arg-type]
