"""The group losses: what every loss shares (the call signature, group reshaping, the tempered KL) and the three
single-formula losses (:class:`ListwiseCELoss`, :class:`TeacherDistillLoss`, :class:`GapLoss`); the exit-to-exit
distillation is :mod:`matryoshka.training.losses.self_distill`.

Every loss is called as ``loss(scores, group_size, teacher_scores=None) -> Tensor[E]``:

- ``scores``: ``[E, B]`` scores of ``E`` exits (rows in exit order, shallowest first, the final exit last) for
  ``B = n_queries * group_size`` pairs, grouped per query as ``[positive, negative_1, ..., negative_{G-1}]``
  (the positive at index 0 of each group, as the collator lays them out);
- ``teacher_scores``: ``[B]`` scores of an external teacher for the same pairs, when the loss needs them;
- the result is one loss value per exit (0 where the loss does not apply to that exit, e.g. the final exit of a
  self-distillation loss), so the objective can weight, sum and log them per exit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from matryoshka.checks import is_int
from matryoshka.errors import MatryoshkaError


class LossInputError(MatryoshkaError, ValueError):
    """Scores or teacher scores a loss cannot use (shape, grouping, missing teacher)."""


class GroupLoss:
    """Base class: subclasses implement :meth:`per_exit` on validated ``[E, n_queries, G]`` groups."""

    needs_teacher = False

    def __call__(self, scores: Tensor, group_size: int, teacher_scores: Tensor | None = None) -> Tensor:
        groups = as_groups(scores, group_size)
        teacher = None
        if teacher_scores is not None:
            if teacher_scores.dim() != 1 or teacher_scores.shape[0] != scores.shape[1]:
                raise LossInputError(f"teacher_scores shape {tuple(teacher_scores.shape)} is invalid: expected "
                                     f"[{scores.shape[1]}] (one teacher score per pair)")
            teacher = teacher_scores.detach().to(scores.dtype).reshape(-1, group_size)
        elif self.needs_teacher:
            raise LossInputError(f"{type(self).__name__} needs teacher_scores: expected a [batch] tensor of "
                                 "teacher scores (give the data a teacher-score column)")
        return self.per_exit(groups, teacher)

    def per_exit(self, groups: Tensor, teacher: Tensor | None) -> Tensor:
        raise NotImplementedError


def as_groups(scores: Tensor, group_size: int) -> Tensor:
    """``[E, B]`` -> ``[E, B / group_size, group_size]``, with a clear error when the shapes do not fit."""
    if scores.dim() != 2:
        raise LossInputError(f"scores shape {tuple(scores.shape)} is invalid: expected [exits, batch]")
    if not is_int(group_size, 1):
        raise LossInputError(f"group_size={group_size!r} is invalid: expected an integer >= 1")
    if scores.shape[1] == 0 or scores.shape[1] % group_size:
        raise LossInputError(f"batch of {scores.shape[1]} pairs is not a whole number of groups of {group_size}: "
                             "expected n_queries * group_size pairs")
    return scores.reshape(scores.shape[0], -1, group_size)


def tempered_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the last axis, averaged over groups.

    ``student``: ``[..., n_queries, G]``; ``teacher``: broadcastable to it and treated as a constant (detached).
    Returns ``[...]`` (one value per leading index, e.g. per exit). The direction is the usual distillation one:
    the teacher distribution is the target, the student is pulled towards covering it.
    """
    if not temperature > 0:
        raise LossInputError(f"temperature={temperature!r} is invalid: expected > 0")
    target = torch.softmax(teacher.detach() / temperature, dim=-1)
    log_student = torch.log_softmax(student / temperature, dim=-1)
    log_target = torch.log_softmax(teacher.detach() / temperature, dim=-1)
    kl = (target * (log_target - log_student)).sum(dim=-1)
    return kl.mean(dim=-1) * temperature ** 2


class ListwiseCELoss(GroupLoss):
    """Listwise cross-entropy, the positive (index 0 of each group) as the target, per exit (no teacher needed):
    ``loss_e = mean_q [ -log softmax(s_e[q])[0] ]``."""

    def per_exit(self, groups: Tensor, teacher: Tensor | None) -> Tensor:
        return -torch.log_softmax(groups, dim=-1)[..., 0].mean(dim=-1)


class TeacherDistillLoss(GroupLoss):
    """Distillation from an external teacher's scores (e.g. BM25 + bi-encoder fusion, or a larger reranker).

    For every exit ``e``: ``T^2 * mean_q KL(softmax(t[q]/T) || softmax(s_e[q]/T))`` with ``t`` the teacher scores
    (detached). The KL runs over each query's whole group, so every candidate's teacher score matters, not only
    the positive's.
    """

    needs_teacher = True

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise LossInputError(f"temperature={temperature!r} is invalid: expected > 0")
        self.temperature = float(temperature)

    def per_exit(self, groups: Tensor, teacher: Tensor | None) -> Tensor:
        if teacher is None:
            raise LossInputError("TeacherDistillLoss needs teacher_scores: expected a [batch] tensor")
        return tempered_kl(groups, teacher.unsqueeze(0), self.temperature)


class GapLoss(GroupLoss):
    """Gap loss: pull each exit's (compensated) score onto the final exit's score, pair by pair.

    ``loss_e = mean_i (s'_e[i] - s_L[i])^2`` with ``s_L`` the final exit's score, detached (the reference does not
    move towards the early exits); the final exit's own value is 0. Used by the COMPENSATION phase so one confidence
    threshold means the same thing at every exit.
    """

    def per_exit(self, groups: Tensor, teacher: Tensor | None) -> Tensor:
        final = groups[-1].detach()
        return ((groups - final.unsqueeze(0)) ** 2).mean(dim=(-2, -1))
