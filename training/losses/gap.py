"""Gap loss: pull each exit's (compensated) score onto the final exit's score, pair by pair.

``loss_e = mean_i (s'_e[i] - s_L[i])^2`` with ``s_L`` the final exit's score, detached (the reference does not move
towards the early exits). The final exit's own value is 0. Used by the COMPENSATION phase so one confidence
threshold means the same thing at every exit.
"""

from __future__ import annotations

from torch import Tensor

from matryoshka.training.losses.base import GroupLoss


class GapLoss(GroupLoss):
    """Mean squared difference to the detached final exit, per exit (0 for the final exit)."""

    def per_exit(self, groups: Tensor, teacher: Tensor | None) -> Tensor:
        final = groups[-1].detach()
        return ((groups - final.unsqueeze(0)) ** 2).mean(dim=(-2, -1))
