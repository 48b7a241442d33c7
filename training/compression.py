"""Token compression (the matryoshka "width" dimension): pool passage tokens by a ratio between two layers.

The pair layout (``matryoshka/layout.py``) gives every sequence three segments: A (``query_length`` tokens), B (the
passage, ``P`` tokens, a multiple of lcm(ratios)) and C (``suffix_length`` tokens; decoders only). Right after a
compress layer, segment B is reshaped ``[B, P, H] -> [B, P/r, r, H]`` (a static reshape: ``r`` is a Python int, so
the ONNX graph has no data-dependent shape logic) and each chunk of ``r`` tokens becomes one token:

- ``mean``: the masked mean of the chunk's valid tokens;
- ``attention``: a softmax over the chunk of learned scores ``w . h`` (``AttentionPoolScorer``), restricted to
  valid tokens. The scorer starts at zero, so attention pooling starts as exactly mean pooling and learns to weight
  tokens during training (FlagEmbedding's attention-weighted variant, with a learned instead of a fixed score).

The pooled mask is 1 when any token of the chunk is valid (an all-pad chunk stays masked and pools to zeros); the
pooled position id is the largest valid position in the chunk (0 for an all-pad chunk, which nothing attends to).
Segments A and C are kept as they are, so the [CLS] token (encoders) and the scored last token (decoders) stay put.

Training picks a random (layer, ratio) per step with :func:`sample_compression` and a seeded ``torch.Generator``
that the trainer owns (never the global RNG); inference uses the config's fixed ``inference_compression``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from matryoshka.training.config import Compression, ModelConfigError


class AttentionPoolScorer(nn.Module):
    """Learned per-token score for attention pooling; zero-initialised (= mean pooling at the start)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden).squeeze(-1)


def pool_chunks(hidden: Tensor, mask: Tensor, positions: Tensor, ratio: int, method: str,
                scorer: AttentionPoolScorer | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Pool ``[B, P, H]`` / ``[B, P]`` / ``[B, P]`` into chunks of ``ratio`` tokens (``P`` divisible by ``ratio``)."""
    batch, width = hidden.shape[0], hidden.shape[-1]
    h = hidden.reshape(batch, -1, ratio, width)
    m = mask.reshape(batch, -1, ratio)
    p = positions.reshape(batch, -1, ratio)
    valid = m.to(h.dtype)
    if method == "mean":
        weights = valid
    elif method == "attention":
        if scorer is None:
            raise ModelConfigError("compress_method='attention' needs an AttentionPoolScorer: expected a scorer")
        scores = scorer(h)
        scores = scores.float().masked_fill(m == 0, torch.finfo(torch.float32).min)   # fp32 softmax (autocast-safe)
        weights = torch.softmax(scores, dim=-1).to(h.dtype) * valid
    else:
        raise ModelConfigError(f"compress_method={method!r} is invalid: expected 'mean' or 'attention'")
    total = weights.sum(dim=-1, keepdim=True)
    pooled = (h * weights.unsqueeze(-1)).sum(dim=2) / total.clamp(min=torch.finfo(h.dtype).tiny)
    pooled_mask = m.amax(dim=-1)
    pooled_positions = (p * m).amax(dim=-1)
    return pooled, pooled_mask, pooled_positions


def compress_passage(hidden: Tensor, mask: Tensor, positions: Tensor, *, query_length: int, suffix_length: int,
                     ratio: int, method: str, scorer: AttentionPoolScorer | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Pool segment B of ``[B, S, H]`` states by ``ratio``; keep segments A and C. Returns (hidden, mask, positions)."""
    if not torch.jit.is_tracing():
        passage = hidden.shape[1] - query_length - suffix_length
        if passage < 0 or passage % ratio:
            raise ModelConfigError(f"passage segment length {passage} (sequence {hidden.shape[1]} - query_length "
                                   f"{query_length} - suffix {suffix_length}) is not a multiple of ratio {ratio}: "
                                   "build inputs with the model's PairLayout")
    end = hidden.shape[1] - suffix_length
    pooled = pool_chunks(hidden[:, query_length:end], mask[:, query_length:end], positions[:, query_length:end],
                         ratio, method, scorer)
    parts_h = [hidden[:, :query_length], pooled[0]]
    parts_m = [mask[:, :query_length], pooled[1].to(mask.dtype)]
    parts_p = [positions[:, :query_length], pooled[2].to(positions.dtype)]
    if suffix_length:
        parts_h.append(hidden[:, end:])
        parts_m.append(mask[:, end:])
        parts_p.append(positions[:, end:])
    return torch.cat(parts_h, dim=1), torch.cat(parts_m, dim=1), torch.cat(parts_p, dim=1)


def compression_choices(compress_layers: Sequence[int], compress_ratios: Sequence[int],
                        include_uncompressed: bool = False) -> list[Compression | None]:
    """Every trained combination, in a fixed order (``None`` first when uncompressed steps are included)."""
    choices: list[Compression | None] = [None] if include_uncompressed else []
    choices.extend(Compression(layer, ratio) for layer, ratio in itertools.product(compress_layers, compress_ratios))
    return choices


def sample_compression(compress_layers: Sequence[int], compress_ratios: Sequence[int], generator: torch.Generator,
                       include_uncompressed: bool = False) -> Compression | None:
    """One uniformly drawn (layer, ratio) for a training step, from the caller's seeded ``generator``.

    Returns ``None`` (no compression) when no compression is configured, or when drawn among the choices with
    ``include_uncompressed=True``.
    """
    choices = compression_choices(compress_layers, compress_ratios, include_uncompressed)
    if not choices:
        return None
    index = int(torch.randint(len(choices), (1,), generator=generator).item())
    return choices[index]
