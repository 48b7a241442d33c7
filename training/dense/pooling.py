"""Pooling token states into one vector per text: last real token, masked mean, or [CLS].

``last`` finds each row's last real token from the attention mask itself, so it is right with left padding (the
last column), right padding (``length - 1``) and any mix, unlike ``mask.sum() - 1``, which is wrong for left padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from matryoshka.training.dense.config import DenseConfigError, Pooling


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last position whose mask is 1, per row (``[B]``); error on an all-padding row."""
    mask = attention_mask.to(torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise DenseConfigError("a row of the attention mask is all padding: expected at least one real token per text")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)


def pool(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """``[B, S, H]`` token states -> ``[B, H]`` (see the module docstring)."""
    if pooling is Pooling.CLS:
        return hidden[:, 0]
    if pooling is Pooling.MEAN:
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    if pooling is Pooling.LAST:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(attention_mask)]
    raise DenseConfigError(f"pooling={pooling!r} is invalid: expected one of {[p.value for p in Pooling]}")


def decoder_position_ids(attention_mask: Tensor) -> Tensor:
    """``cumsum(mask) - 1`` clamped at 0: real tokens count from 0 whatever the padding side."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
