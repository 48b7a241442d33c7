"""Backbone adapters: how to embed, run one layer and read the exit of each supported Hugging Face architecture.

The reranker calls the backbone's layer modules one by one (never the backbone's own ``forward``), so that
compression can shorten the sequence between two layers and so that any layer range can become an ONNX stage. Each
adapter knows, for its architectures:

- ``embed``: token (+ position, + token type) embeddings; which position ids the backbone really uses;
- ``attention_bias``: the additive attention mask, built here (not by ``transformers``' mask helpers, whose output
  depends on the attention implementation): encoders ``[B, 1, 1, S]`` (padding only), decoders ``[B, 1, S, S]``
  (causal AND padding). Blocked entries hold ``finfo(dtype).min``; every row keeps one allowed key ([CLS] for
  encoders; the first token, always real, for decoders), so softmax never sees an all-blocked row;
- segments (``segment_start = query_length``, BERT only): each of the two segments attends only within itself,
  its positions count from 0 and its token type is 0, so every segment is encoded exactly as a bi-encoder encodes
  that text alone (the bias is ``[B, 1, S, S]``; each segment starts with a real [CLS]);
- ``layer_context``: what every layer needs besides the mask, computed once per sequence length (MPNet's relative
  position bias, decoders' rotary ``(cos, sin)``);
- ``call_layer`` and ``exit_hidden`` (encoders: position 0 = [CLS]; decoders: the final norm on the last position).

Everything here is traceable by ``torch.onnx.export(dynamo=False)``: no Python branch depends on tensor values.
Position ids for encoders follow the backbone's own rule (BERT ``0..S-1``; RoBERTa/XLM-R/MPNet count non-pad tokens
from ``padding_idx + 1``), so the layer loop reproduces ``backbone(...).last_hidden_state`` exactly; the position ids
given to :meth:`embed` are carried in the state (for a uniform stage interface) but do not change encoder outputs.
Decoders use the given ``position_ids`` (the layout's ``cumsum(mask) - 1``), or compute them from the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


def supported_model_types() -> dict[str, str]:
    """``model_type`` -> family, for every architecture the reranker supports (from :data:`ADAPTERS`)."""
    return {model_type: adapter.family for model_type, adapter in ADAPTERS.items()}


def decoder_model_types() -> tuple[str, ...]:
    return tuple(t for t, family in supported_model_types().items() if family == "decoder")


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``allowed`` (bool) is true, the dtype's most negative value elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)


@dataclass(frozen=True)
class FamilyAdapter:
    """Base adapter; subclasses implement one group of architectures (see the module docstring)."""

    model_type: str

    family = "encoder"

    def embed(self, backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
              position_ids: Tensor | None, segment_start: int | None = None) -> tuple[Tensor, Tensor]:
        """Return ``(hidden_states [B,S,H], position_ids [B,S])``."""
        raise NotImplementedError

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def attention_bias(self, attention_mask: Tensor, dtype: torch.dtype, segment_start: int | None = None) -> Tensor:
        if segment_start is None:
            return additive_mask(attention_mask.bool()[:, None, None, :], dtype)
        second = torch.arange(attention_mask.shape[1], device=attention_mask.device) >= segment_start
        same = second[:, None] == second[None, :]                    # [S(query), S(key)]
        return additive_mask(same[None, None] & attention_mask.bool()[:, None, None, :], dtype)

    def layer_context(self, backbone: nn.Module, hidden: Tensor, position_ids: Tensor) -> dict[str, Any]:
        return {}

    def call_layer(self, layer: nn.Module, hidden: Tensor, bias: Tensor, position_ids: Tensor,
                   context: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def exit_hidden(self, backbone: nn.Module, hidden: Tensor) -> Tensor:
        return hidden[:, 0]

    def load_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained``/``from_config`` keyword arguments of this architecture's base model class."""
        return {"add_pooling_layer": False}


class BertLikeAdapter(FamilyAdapter):
    """BERT, RoBERTa and XLM-R (``BertLayer``-style layers under ``backbone.encoder.layer``)."""

    def embed(self, backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
              position_ids: Tensor | None, segment_start: int | None = None) -> tuple[Tensor, Tensor]:
        config = backbone.config
        if self.model_type == "bert":
            index = torch.arange(input_ids.shape[1], device=input_ids.device)
            if segment_start is not None:  # each segment counts its own positions; one token type, as encoded alone
                index = torch.where(index >= segment_start, index - segment_start, index)
                token_type_ids = torch.zeros_like(input_ids)
            used = index.unsqueeze(0).expand_as(input_ids)
        else:
            used = padding_position_ids(input_ids, int(config.pad_token_id))
        if token_type_ids is None or int(config.type_vocab_size) < 2:
            token_type_ids = torch.zeros_like(input_ids)  # RoBERTa/XLM-R have one token type
        hidden = backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=used)
        return hidden, (position_ids if position_ids is not None else used)

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.encoder.layer

    def call_layer(self, layer: nn.Module, hidden: Tensor, bias: Tensor, position_ids: Tensor,
                   context: dict[str, Any]) -> Tensor:
        out = layer(hidden, bias)
        return out[0] if isinstance(out, tuple) else out


class MPNetAdapter(FamilyAdapter):
    """MPNet: like BERT, plus a relative position bias shared by all layers (recomputed per sequence length)."""

    def embed(self, backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
              position_ids: Tensor | None, segment_start: int | None = None) -> tuple[Tensor, Tensor]:
        used = padding_position_ids(input_ids, int(backbone.embeddings.padding_idx))
        hidden = backbone.embeddings(input_ids=input_ids, position_ids=used)
        return hidden, (position_ids if position_ids is not None else used)

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.encoder.layer

    def layer_context(self, backbone: nn.Module, hidden: Tensor, position_ids: Tensor) -> dict[str, Any]:
        return {"position_bias": backbone.encoder.compute_position_bias(hidden)}

    def call_layer(self, layer: nn.Module, hidden: Tensor, bias: Tensor, position_ids: Tensor,
                   context: dict[str, Any]) -> Tensor:
        return layer(hidden, bias, context["position_bias"])[0]


class DecoderAdapter(FamilyAdapter):
    """Llama, Mistral, Qwen2 and Gemma: rotary positions, causal mask, final norm on the last token."""

    family = "decoder"

    def embed(self, backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None,
              position_ids: Tensor | None, segment_start: int | None = None) -> tuple[Tensor, Tensor]:
        if position_ids is None:
            position_ids = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)
        hidden = backbone.embed_tokens(input_ids)
        if self.model_type.startswith("gemma") and not hasattr(backbone.embed_tokens, "embed_scale"):
            # Gemma scales its embeddings by sqrt(hidden): inside the embedding module in newer transformers (which
            # has ``embed_scale``), in GemmaModel.forward in older ones (a plain nn.Embedding): do it here then
            hidden = hidden * torch.tensor(float(backbone.config.hidden_size) ** 0.5, dtype=hidden.dtype)
        return hidden, position_ids

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.layers

    def attention_bias(self, attention_mask: Tensor, dtype: torch.dtype, segment_start: int | None = None) -> Tensor:
        seq = attention_mask.shape[1]
        index = torch.arange(seq, device=attention_mask.device)
        causal = index[None, :] <= index[:, None]                     # [S(query), S(key)]
        allowed = causal[None, None, :, :] & attention_mask.bool()[:, None, None, :]
        return additive_mask(allowed, dtype)

    def layer_context(self, backbone: nn.Module, hidden: Tensor, position_ids: Tensor) -> dict[str, Any]:
        return {"position_embeddings": backbone.rotary_emb(hidden, position_ids)}

    def call_layer(self, layer: nn.Module, hidden: Tensor, bias: Tensor, position_ids: Tensor,
                   context: dict[str, Any]) -> Tensor:
        out = layer(hidden, attention_mask=bias, position_ids=position_ids,
                    position_embeddings=context["position_embeddings"])
        return out[0] if isinstance(out, tuple) else out

    def exit_hidden(self, backbone: nn.Module, hidden: Tensor) -> Tensor:
        return backbone.norm(hidden[:, -1])

    def load_kwargs(self) -> dict[str, Any]:
        return {}


def padding_position_ids(input_ids: Tensor, padding_idx: int) -> Tensor:
    """RoBERTa/MPNet positions: real tokens count from ``padding_idx + 1``, pad tokens get ``padding_idx``."""
    real = input_ids.ne(padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


#: Hugging Face ``model_type`` -> its adapter: the one source of the supported architectures (a new backbone
#: family is one adapter class plus its entries here)
ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "bert": BertLikeAdapter, "roberta": BertLikeAdapter, "xlm-roberta": BertLikeAdapter, "mpnet": MPNetAdapter,
    "llama": DecoderAdapter, "mistral": DecoderAdapter, "qwen2": DecoderAdapter, "gemma": DecoderAdapter,
}


def get_adapter(model_type: str) -> FamilyAdapter:
    from matryoshka.training.config import ModelConfigError

    if model_type in ADAPTERS:
        return ADAPTERS[model_type](model_type)
    raise ModelConfigError(f"model_type={model_type!r} is not supported: expected one of "
                           f"{sorted(supported_model_types())} (choose a base model of a supported architecture)")
