"""The training objective of each phase: which losses, on which scores, with which weights.

Phases (:class:`PhaseType`), in the order a full run uses them:

- ``LAYERWISE_CE``: listwise CE at every exit on the raw head scores (+ ``teacher_weight`` x KL to an external
  teacher at every exit, when ``teacher_weight > 0``);
- ``SELF_DISTILL``: the same CE, + ``distill_weight`` x self-distillation between exits (``strategy``,
  ``temperature``, ``anchors``; see :mod:`matryoshka.training.losses.self_distill`) (+ the optional teacher term);
- ``COMPENSATION``: on the *calibrated* scores (after each exit's compensation), CE at every exit +
  ``gap_weight`` x gap to the final exit (see :mod:`matryoshka.training.compensation` for why). Use with
  :func:`~matryoshka.training.compensation.freeze_for_compensation`.

The first two phases read ``ExitScores.raw`` so the compensation modules (identity until their own phase) never
train there. The loss is the sum over exits of every term; ``__call__`` also returns each term per exit as floats
(``"ce/2"``, ``"self_distill/2"``, ``"teacher/2"``, ``"gap/2"``, ... and ``"loss"``) for the trainer's log. Which
terms exist is fixed at construction, so the dict has the same keys every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor

from matryoshka.training.losses import GroupLoss, LossInputError, LossType, SelfDistillStrategy, build_loss
from matryoshka.training.modeling import ExitScores


class PhaseType(Enum):
    LAYERWISE_CE = "layerwise_ce"
    SELF_DISTILL = "self_distill"
    COMPENSATION = "compensation"


@dataclass
class Term:
    """One weighted loss of the objective, logged under ``name``."""

    name: str
    weight: float
    loss: GroupLoss


@dataclass
class Objective:
    """Callable objective for one phase (see the module docstring)."""

    phase: PhaseType
    exits: Sequence[int]
    temperature: float = 1.0
    strategy: SelfDistillStrategy = SelfDistillStrategy.FINAL
    anchors: Sequence[int] = ()
    distill_weight: float = 1.0
    teacher_weight: float = 0.0
    gap_weight: float = 1.0
    terms: list[Term] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.phase, PhaseType):
            raise LossInputError(f"phase={self.phase!r} is invalid: expected one of {[p.name for p in PhaseType]}")
        self.exits = tuple(self.exits)
        for name in ("distill_weight", "teacher_weight", "gap_weight"):
            if getattr(self, name) < 0:
                raise LossInputError(f"{name}={getattr(self, name)} is invalid: expected >= 0")
        self.terms = [Term("ce", 1.0, build_loss(LossType.LISTWISE_CE))]
        if self.phase is PhaseType.COMPENSATION:
            self.terms.append(Term("gap", self.gap_weight, build_loss(LossType.GAP)))
            return
        if self.phase is PhaseType.SELF_DISTILL:
            self.terms.append(Term("self_distill", self.distill_weight, build_loss(
                LossType.SELF_DISTILL, exits=self.exits, strategy=self.strategy, temperature=self.temperature,
                anchors=tuple(self.anchors))))
        if self.teacher_weight > 0:
            self.terms.append(Term("teacher", self.teacher_weight,
                                   build_loss(LossType.TEACHER_DISTILL, temperature=self.temperature)))

    @property
    def uses_calibrated(self) -> bool:
        return self.phase is PhaseType.COMPENSATION

    @property
    def needs_teacher(self) -> bool:
        return any(term.loss.needs_teacher for term in self.terms)

    def __call__(self, exit_scores: ExitScores, group_size: int, teacher_scores: Tensor | None = None
                 ) -> tuple[Tensor, dict[str, float]]:
        if tuple(exit_scores.exits) != self.exits:
            raise LossInputError(f"scores are for exits {list(exit_scores.exits)}: expected {list(self.exits)}")
        scores = exit_scores.calibrated if self.uses_calibrated else exit_scores.raw
        total = scores.new_zeros(())
        logged: dict[str, float] = {}
        for term in self.terms:
            per_exit = term.loss(scores, group_size, teacher_scores)
            total = total + term.weight * per_exit.sum()
            for exit_layer, value in zip(self.exits, per_exit.detach().tolist(), strict=True):
                logged[f"{term.name}/{exit_layer}"] = float(value)
        if not torch.isfinite(total):
            raise LossInputError(f"{self.phase.name} loss is not finite ({float(total)}): check the learning rate "
                                 "and the scores for NaN/inf")
        logged["loss"] = float(total.detach())
        return total, logged
