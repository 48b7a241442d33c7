"""Listwise cross-entropy: each query's group is a softmax over its candidates; the positive (index 0) is the target.

``loss_e = mean_q [ -log softmax(s_e[q])[0] ]`` for every exit ``e`` (no teacher needed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from matryoshka.training.losses.base import GroupLoss


class ListwiseCELoss(GroupLoss):
    """Cross-entropy with the positive at index 0 of every group, per exit."""

    def per_exit(self, groups: Tensor, teacher: Tensor | None) -> Tensor:
        return -torch.log_softmax(groups, dim=-1)[..., 0].mean(dim=-1)
