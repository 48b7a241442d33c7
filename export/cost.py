"""Relative cost of each stage: its share of the full-depth transformer-layer FLOPs, accounting for compression.

The cost of one layer at sequence length S (multiply-adds counted as 2 FLOPs):
Q and O projections ``4 S H^2``, K and V projections ``4 S H H_kv`` (grouped-query attention: ``H_kv = H * kv/heads``),
attention scores and weighted sum ``4 S^2 H``, MLP ``4 S H I`` (``6 S H I`` for gated MLPs such as Llama's).
Embeddings and exit heads are negligible and left out. The reference pair is the longest the layout allows
(``max_length``): layers after the compression layer ``l`` see ``A + P / r + C`` tokens instead of ``A + P + C``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from matryoshka.layout import PairLayout


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    gated_mlp: bool

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelDims:
        """Read the sizes from a ``transformers`` config (BERT-like or Llama-like)."""
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
        gated = str(getattr(config, "model_type", "")) not in ("bert", "roberta", "xlm-roberta", "mpnet", "electra",
                                                               "distilbert")
        return cls(hidden, intermediate, heads, kv_heads, gated)


def layer_flops(seq: int, dims: ModelDims) -> float:
    h, i = dims.hidden_size, dims.intermediate_size
    h_kv = h * dims.num_kv_heads / dims.num_heads
    projections = 4 * seq * h * h + 4 * seq * h * h_kv
    attention = 4 * seq * seq * h
    mlp = (6 if dims.gated_mlp else 4) * seq * h * i
    return float(projections + attention + mlp)


def sequence_lengths(layout: PairLayout, num_layers: int, compression: Mapping[str, Any] | None) -> list[int]:
    """The sequence length each 0-based layer runs at for the longest pair the layout allows."""
    fixed = layout.query_length + layout.suffix_length
    passage = layout.max_passage_segment
    lengths = [fixed + passage] * num_layers
    if compression:
        layer, ratio = int(compression["layer"]), int(compression["ratio"])
        for index in range(layer, num_layers):
            lengths[index] = fixed + passage // ratio
    return lengths


def relative_costs(exits: Sequence[int], layout: PairLayout, dims: ModelDims,
                   compression: Mapping[str, Any] | None) -> list[float]:
    """The share of the full-depth layer FLOPs spent in each stage (sums to 1)."""
    num_layers = int(exits[-1])
    per_layer = [layer_flops(seq, dims) for seq in sequence_lengths(layout, num_layers, compression)]
    total = sum(per_layer)
    shares, start = [], 0
    for end in exits:
        shares.append(sum(per_layer[start:end]) / total)
        start = int(end)
    return shares
