"""Training losses, chosen by :class:`LossType` (an Enum, never by matching strings).

All share one call signature (:mod:`matryoshka.training.losses.group`, with the single-formula losses):
``loss(scores [E, B], group_size, teacher_scores [B] | None) -> Tensor[E]`` (one value per exit). Build one with
:func:`build_loss`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from matryoshka.training.losses.group import (
    GapLoss,
    GroupLoss,
    ListwiseCELoss,
    LossInputError,
    TeacherDistillLoss,
    as_groups,
    tempered_kl,
)
from matryoshka.training.losses.self_distill import SelfDistillLoss, SelfDistillStrategy, teacher_indices


class LossType(Enum):
    LISTWISE_CE = "listwise_ce"
    TEACHER_DISTILL = "teacher_distill"
    SELF_DISTILL = "self_distill"
    GAP = "gap"


LOSS_REGISTRY: dict[LossType, type[GroupLoss]] = {
    LossType.LISTWISE_CE: ListwiseCELoss,
    LossType.TEACHER_DISTILL: TeacherDistillLoss,
    LossType.SELF_DISTILL: SelfDistillLoss,
    LossType.GAP: GapLoss,
}


def build_loss(loss_type: LossType, **options: Any) -> GroupLoss:
    """An instance of the loss registered for ``loss_type`` (options go to its constructor)."""
    if not isinstance(loss_type, LossType):
        raise LossInputError(f"loss_type={loss_type!r} is invalid: expected one of {[t.name for t in LossType]}")
    try:
        return LOSS_REGISTRY[loss_type](**options)
    except TypeError as exc:
        raise LossInputError(f"{loss_type.name}: bad options {sorted(options)} ({exc})") from None


__all__ = ["LOSS_REGISTRY", "GapLoss", "GroupLoss", "ListwiseCELoss", "LossInputError", "LossType",
           "SelfDistillLoss", "SelfDistillStrategy", "TeacherDistillLoss", "as_groups", "build_loss",
           "tempered_kl", "teacher_indices"]
