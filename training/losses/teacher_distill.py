"""Distillation from an external teacher's scores (e.g. BM25 + bi-encoder fusion, or a larger reranker).

For every exit ``e``: ``T^2 * mean_q KL(softmax(t[q]/T) || softmax(s_e[q]/T))`` with ``t`` the teacher scores
(detached). The KL runs over each query's whole group, so every candidate's teacher score matters, not only the
positive's.
"""

from __future__ import annotations

from torch import Tensor

from matryoshka.training.losses.base import GroupLoss, LossInputError, tempered_kl


class TeacherDistillLoss(GroupLoss):
    """KL from the external teacher's group distribution to each exit's (see the module docstring)."""

    needs_teacher = True

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise LossInputError(f"temperature={temperature!r} is invalid: expected > 0")
        self.temperature = float(temperature)

    def per_exit(self, groups: Tensor, teacher: Tensor | None) -> Tensor:
        if teacher is None:
            raise LossInputError("TeacherDistillLoss needs teacher_scores: expected a [batch] tensor")
        return tempered_kl(groups, teacher.unsqueeze(0), self.temperature)
