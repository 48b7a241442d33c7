"""Passage compression on hand-made states: shapes, masks, positions, identical-token chunks, all-pad chunks."""

from __future__ import annotations

import pytest
import torch

from matryoshka.training.compression import AttentionPoolScorer, compress_passage, compression_choices, pool_chunks
from matryoshka.training.config import Compression, ModelConfigError

Q, C, H = 3, 2, 4          # query segment, suffix segment, hidden size


def _state(passage_mask: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = len(passage_mask)
    seq = Q + p + C
    hidden = torch.arange(2 * seq * H, dtype=torch.float32).reshape(2, seq, H) / 10
    mask = torch.tensor([[1] * Q + passage_mask + [1] * C] * 2)
    positions = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
    return hidden, mask, positions


@pytest.mark.parametrize("method", ["mean", "attention"])
def test_shapes_segments_and_masks(method: str) -> None:
    scorer = AttentionPoolScorer(H)
    torch.nn.init.normal_(scorer.proj.weight)
    hidden, mask, positions = _state([1, 1, 1, 1, 1, 0, 0, 0])   # chunks of 4: full, one valid; of 2: ..., all-pad
    for ratio in (2, 4):
        h, m, p = compress_passage(hidden, mask, positions, query_length=Q, suffix_length=C, ratio=ratio,
                                   method=method, scorer=scorer)
        n = 8 // ratio
        assert h.shape == (2, Q + n + C, H) and m.shape == p.shape == (2, Q + n + C)
        assert torch.equal(h[:, :Q], hidden[:, :Q]) and torch.equal(h[:, -C:], hidden[:, -C:])
        assert torch.equal(m[:, -C:], mask[:, -C:]) and torch.equal(p[:, -C:], positions[:, -C:])
        expected_mask = {2: [1, 1, 1, 0], 4: [1, 1]}[ratio]
        assert m[0, Q:Q + n].tolist() == expected_mask
        # pooled position = the largest valid position in the chunk (0 for an all-pad chunk)
        expected_pos = {2: [4, 6, 7, 0], 4: [6, 7]}[ratio]
        assert p[0, Q:Q + n].tolist() == expected_pos
    # an all-pad chunk pools to zeros and stays masked
    h, m, _ = compress_passage(hidden, mask, positions, query_length=Q, suffix_length=C, ratio=2, method=method,
                               scorer=scorer)
    assert m[0, Q + 3] == 0 and torch.count_nonzero(h[:, Q + 3]) == 0


def test_mean_pooling_is_the_masked_mean() -> None:
    hidden, mask, positions = _state([1, 1, 1, 0])
    h, _, _ = compress_passage(hidden, mask, positions, query_length=Q, suffix_length=C, ratio=2, method="mean")
    assert torch.allclose(h[:, Q], (hidden[:, Q] + hidden[:, Q + 1]) / 2)
    assert torch.allclose(h[:, Q + 1], hidden[:, Q + 2])                # the pad token does not count


@pytest.mark.parametrize("method", ["mean", "attention"])
def test_a_chunk_of_identical_tokens_pools_to_that_token(method: str) -> None:
    scorer = AttentionPoolScorer(H)
    torch.nn.init.normal_(scorer.proj.weight, std=3.0)
    token = torch.tensor([0.3, -1.2, 2.5, 7.0])
    hidden = token.expand(1, 8, H).clone()
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    pooled, pooled_mask, _ = pool_chunks(hidden, mask, torch.arange(8)[None], 4, method, scorer)
    assert torch.allclose(pooled[0, 0], token, atol=1e-6) and torch.allclose(pooled[0, 1], token, atol=1e-6)
    assert pooled_mask.tolist() == [[1, 1]]


def test_attention_pooling_starts_as_mean_and_learns_weights() -> None:
    hidden, mask, positions = _state([1, 1, 1, 1])
    scorer = AttentionPoolScorer(H)
    mean = compress_passage(hidden, mask, positions, query_length=Q, suffix_length=C, ratio=2, method="mean")[0]
    attention = compress_passage(hidden, mask, positions, query_length=Q, suffix_length=C, ratio=2,
                                 method="attention", scorer=scorer)[0]
    assert torch.allclose(mean, attention)
    with torch.no_grad():
        scorer.proj.weight.fill_(1.0)
    skewed = compress_passage(hidden, mask, positions, query_length=Q, suffix_length=C, ratio=2, method="attention",
                              scorer=scorer)[0]
    # larger-valued token gets more weight: the pooled vector lies between the mean and the second token
    assert bool((skewed[:, Q] > mean[:, Q]).all()) and bool((skewed[:, Q] < hidden[:, Q + 1]).all())


def test_bad_lengths_and_methods() -> None:
    hidden, mask, positions = _state([1, 1, 1])
    with pytest.raises(ModelConfigError, match="not a multiple of ratio 2"):
        compress_passage(hidden, mask, positions, query_length=Q, suffix_length=C, ratio=2, method="mean")
    hidden, mask, positions = _state([1, 1])
    with pytest.raises(ModelConfigError, match="compress_method"):
        compress_passage(hidden, mask, positions, query_length=Q, suffix_length=C, ratio=2, method="max")
    with pytest.raises(ModelConfigError, match="needs an AttentionPoolScorer"):
        compress_passage(hidden, mask, positions, query_length=Q, suffix_length=C, ratio=2, method="attention")
    with pytest.raises(ModelConfigError, match="ratio"):
        Compression(2, 1)
    assert compression_choices((1, 3), (2,), include_uncompressed=True) == [None, Compression(1, 2),
                                                                          Compression(3, 2)]
