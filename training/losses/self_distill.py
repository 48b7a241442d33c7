"""Self-distillation between exits: deeper exits teach shallower ones (or an external teacher teaches all).

For a student exit ``e`` with teacher logits ``t`` (a deeper exit's scores, or external teacher scores), the loss is

    T^2 * mean_q KL(softmax(t[q]/T) || softmax(s_e[q]/T))          (teacher detached)

Direction: the teacher's distribution is the target (forward KL, as in Hinton et al. and FlagEmbedding's code).
The reverse direction, ``KL(softmax(s_l/T) || softmax(s_L/T))`` (student first), is also seen; with a detached
teacher the two differ only in which distribution weights the log-ratio; we use the teacher-weighted one, which is the
cross-entropy to the teacher's soft labels minus a constant, so its gradient is ``(p_student - p_teacher) / T``
per logit (times ``T^2``), well behaved for every ``T``.

Who teaches whom (:class:`SelfDistillStrategy`):

- ``FINAL``: the final exit teaches every other exit;
- ``NEXT_DEEPER``: each exit is taught by the next deeper exit (a chain);
- ``ANCHORS``: fixed anchor exits teach the exits below them: exit ``e`` learns from the shallowest anchor deeper
  than ``e``; the final exit is always an anchor;
- ``TEACHER``: the external teacher's scores teach every exit, the final one included (exactly
  :class:`~matryoshka.training.losses.group.TeacherDistillLoss`, which it runs).

The final exit gets 0 in every strategy but ``TEACHER``.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from matryoshka.training.losses.group import GroupLoss, LossInputError, TeacherDistillLoss, tempered_kl


class SelfDistillStrategy(Enum):
    FINAL = "final"
    NEXT_DEEPER = "next_deeper"
    ANCHORS = "anchors"
    TEACHER = "teacher"


def teacher_indices(strategy: SelfDistillStrategy, exits: Sequence[int], anchors: Sequence[int] = ()
                    ) -> list[int | None]:
    """For each exit (by index), the index of the exit that teaches it (``None``: not taught by an exit)."""
    exits = list(exits)
    last = len(exits) - 1
    if strategy is SelfDistillStrategy.FINAL:
        return [last if i < last else None for i in range(len(exits))]
    if strategy is SelfDistillStrategy.NEXT_DEEPER:
        return [i + 1 if i < last else None for i in range(len(exits))]
    if strategy is SelfDistillStrategy.ANCHORS:
        bad = [a for a in anchors if a not in exits]
        if bad or not anchors:
            raise LossInputError(f"anchors={list(anchors)} is invalid: expected a non-empty subset of the exits "
                                 f"{exits}")
        anchor_index = sorted({exits.index(a) for a in anchors} | {last})
        return [next((a for a in anchor_index if a > i), None) for i in range(len(exits))]
    return [None] * len(exits)


class SelfDistillLoss(GroupLoss):
    """Per-exit KL to the teacher chosen by ``strategy`` (see the module docstring)."""

    def __init__(self, exits: Sequence[int], strategy: SelfDistillStrategy = SelfDistillStrategy.FINAL,
                 temperature: float = 1.0, anchors: Sequence[int] = ()) -> None:
        if not isinstance(strategy, SelfDistillStrategy):
            raise LossInputError(f"strategy={strategy!r} is invalid: expected one of "
                                 f"{[s.name for s in SelfDistillStrategy]}")
        if not temperature > 0:
            raise LossInputError(f"temperature={temperature!r} is invalid: expected > 0")
        self.exits = tuple(exits)
        self.strategy = strategy
        self.temperature = float(temperature)
        self.teachers = teacher_indices(strategy, self.exits, anchors)
        self.external = TeacherDistillLoss(temperature) if strategy is SelfDistillStrategy.TEACHER else None
        self.needs_teacher = self.external is not None

    def per_exit(self, groups: Tensor, teacher: Tensor | None) -> Tensor:
        if groups.shape[0] != len(self.exits):
            raise LossInputError(f"got scores of {groups.shape[0]} exits: expected {len(self.exits)} "
                                 f"(exits {list(self.exits)})")
        if self.external is not None:
            return self.external.per_exit(groups, teacher)
        losses = []
        for index, source in enumerate(self.teachers):
            if source is None:
                losses.append(groups.new_zeros(()))
            else:
                losses.append(tempered_kl(groups[index], groups[source], self.temperature))
        return torch.stack(losses)
