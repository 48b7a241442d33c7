"""The layer-wise (matryoshka) reranker: a Hugging Face backbone run layer by layer, with a scoring head per exit.

Design (contracts in ARCHITECTURE.md):

- One class for both families; what differs per architecture lives in :mod:`matryoshka.training.families`
  (an adapter picked by ``model_type``), never in copies of this file.
- The backbone's layer modules are called directly with an additive attention mask built here, so segment B can be
  pooled between layers (:mod:`matryoshka.training.compression`) and any layer range ``[start, end)`` can be exported
  as an ONNX stage. The state passed between stages is :class:`State`.
- Each exit ``l`` has a head ``Linear(hidden, 1)`` (encoders: on [CLS], all heads start from one shared seeded
  random init; decoders: on the final norm of the last token, initialised from the ``lm_head`` row of "Yes") and a
  compensation (:class:`~matryoshka.training.compensation.ExitCompensation`, the identity until trained).
- ``readout="cosine"`` (with ``attention="segments"``): the head of exit ``l`` reads ``normalize(P_l a) *
  normalize(P_l b)`` (element-wise), ``a``/``b`` the masked means of the query and passage segments and ``P_l`` a
  linear map that starts as the identity (early exits: plus a residual MLP when ``projection_hidden > 0``, whose
  output layer starts at zero, see :class:`ExitProjection`); the head starts as ``COSINE_SCALE * ones``, so every
  exit starts as the scaled cosine of the two segments, and the final exit as exactly the bi-encoder the backbone
  came from.
- ``forward`` always returns an :class:`ExitScores` (raw and calibrated scores of every exit, ``[E, B]``),
  whatever the arguments. ``compression=None`` means no compression; pass ``model.config.inference_compression``
  for inference, or :meth:`LayerwiseReranker.sample_compression` for a training step.
- A saved model is a folder: ``model.safetensors`` + ``tokenizer.json`` + ``matryoshka_config.json`` (which holds
  the backbone's HF config, so loading needs no base model). Written atomically.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from matryoshka.errors import DataFormatError, MissingInputError
from matryoshka.io import atomic_directory
from matryoshka.layout import PairLayout
from matryoshka.training.compensation import ExitCompensation, record_compensation
from matryoshka.training.compression import AttentionPoolScorer, compress_passage, sample_compression
from matryoshka.training.config import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    Compression,
    ModelConfigError,
    RerankerConfig,
    package_versions,
)
from matryoshka.training.families import FamilyAdapter, get_adapter

logger = logging.getLogger(__name__)
#: the cosine readout's initial score scale (``score = COSINE_SCALE * cos``; the in-batch softmax scale of
#: sentence-transformers' MultipleNegativesRankingLoss, which trained all-MiniLM-L6-v2)
COSINE_SCALE = 20.0


@dataclass
class State:
    """What flows between stages: ``hidden_states [B,S,H]``, ``attention_mask [B,S]``, ``position_ids [B,S]``."""

    hidden_states: Tensor
    attention_mask: Tensor
    position_ids: Tensor


@dataclass
class ExitScores:
    """Scores of every exit, in exit order: ``raw`` (head only) and ``calibrated`` (after compensation), ``[E, B]``."""

    exits: tuple[int, ...]
    raw: Tensor
    calibrated: Tensor

    def index(self, exit_layer: int) -> int:
        if exit_layer not in self.exits:
            raise ModelConfigError(f"exit_layer={exit_layer} is not an exit: expected one of {list(self.exits)}")
        return self.exits.index(exit_layer)

    def raw_at(self, exit_layer: int) -> Tensor:
        return self.raw[self.index(exit_layer)]

    def calibrated_at(self, exit_layer: int) -> Tensor:
        return self.calibrated[self.index(exit_layer)]


class LayerwiseReranker(nn.Module):
    """See the module docstring. Build with :meth:`build` (from a base model) or :meth:`load` (a saved folder)."""

    def __init__(self, config: RerankerConfig, backbone: nn.Module, tokenizer: Any = None) -> None:
        super().__init__()
        self.config = config
        self.adapter: FamilyAdapter = get_adapter(config.model_type)
        self.backbone = backbone
        self.tokenizer = tokenizer
        hidden = config.hidden_size
        self.heads = nn.ModuleDict({str(e): nn.Linear(hidden, 1) for e in config.exits})
        self.compensation = nn.ModuleDict({str(e): ExitCompensation(hidden, config.adapter_hidden)
                                           for e in config.exits})
        self.compress_scorer = AttentionPoolScorer(hidden) if config.compress_method == "attention" else None
        last = config.exits[-1]
        self.projections = (nn.ModuleDict({str(e): ExitProjection(hidden, 0 if e == last else config.projection_hidden)
                                           for e in config.exits})
                            if config.readout == "cosine" else None)
        self.layout: PairLayout = config.pair_layout()
        self.segment_start = self.layout.query_length if config.attention == "segments" else None
        self._checkpointing = False

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def build(cls, base_model_dir: str | os.PathLike[str], exits: list[int] | tuple[int, ...] | None = None,
              start_layer: int | None = None, compress_layers: tuple[int, ...] | list[int] = (),
              compress_ratios: tuple[int, ...] | list[int] = (), compress_method: str = "mean",
              max_length: int = 256, query_length: int = 32,
              inference_compression: Compression | dict[str, int] | None = None, adapter_hidden: int = 64,
              gguf_file: str | None = None, seed: int = 0, name: str | None = None, readout: str = "token",
              attention: str = "pair", projection_hidden: int = 0, query_exit: str = "same") -> LayerwiseReranker:
        """A new reranker on the base model in ``base_model_dir`` (HF folder, or a folder with one GGUF file).

        ``exits``: ascending 1-based layers ending at the last layer. When omitted: every layer from
        ``start_layer`` on if given, otherwise the thirds ``[L//3, 2L//3, L]``. Heads are seeded with ``seed``.
        ``name`` is recorded as ``config.base_model`` (default: the folder's name). ``readout``: what the heads read,
        ``"token"`` ([CLS] / the last token) or, for encoders, ``"mean"`` (the masked mean of the pair's tokens:
        [CLS] barely depends on the pair in the first layers of a mean-pooled bi-encoder such as all-MiniLM-L6-v2)
        or ``"cosine"`` (with ``attention="segments"``: the model starts as the bi-encoder ``base_model_dir`` is;
        ``projection_hidden``: width of the early exits' residual projection MLP, 0 = linear only; ``query_exit``:
        ``"final"`` scores every exit's passage against the query's final-layer embedding).
        """
        from matryoshka.training.loading import default_exits, load_base

        base = load_base(base_model_dir, gguf_file)
        num_layers = int(base.hf_config.num_hidden_layers)
        exits = tuple(exits) if exits is not None else default_exits(num_layers, start_layer)
        layout = base.make_layout(max_length, query_length, tuple(compress_ratios),
                                  passage_cls=attention == "segments")
        config = RerankerConfig(
            family=base.adapter.family, model_type=base.model_type, base_model=name or base.name,
            num_layers=num_layers, hidden_size=int(base.hf_config.hidden_size), exits=exits, layout=layout.to_dict(),
            backbone_config=base.backbone_config_dict(), compress_layers=tuple(compress_layers),
            compress_ratios=tuple(compress_ratios), compress_method=compress_method,
            inference_compression=inference_compression, yes_token_id=base.yes_token_id,
            adapter_hidden=adapter_hidden, readout=readout, attention=attention, projection_hidden=projection_hidden,
            query_exit=query_exit, versions=package_versions())
        if config.family == "decoder":
            window = getattr(base.hf_config, "sliding_window", None)
            if window is not None and max_length > int(window):
                raise ModelConfigError(f"max_length={max_length} is invalid for {base.model_type} with sliding_window="
                                       f"{window}: expected max_length <= {window}")
        model = cls(config, base.backbone, base.tokenizer)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if base.yes_row is not None:
                weight, bias = base.yes_row.reshape(1, -1).float(), torch.zeros(1)
            elif readout == "cosine":
                weight, bias = torch.full((1, config.hidden_size), COSINE_SCALE), torch.zeros(1)
            else:
                std = float(getattr(base.hf_config, "initializer_range", 0.02))
                weight = torch.randn(1, config.hidden_size, generator=generator) * std
                bias = torch.zeros(1)
            for head in model.heads.values():
                head.weight.copy_(weight)
                head.bias.copy_(bias)
        record_compensation(model)
        logger.info("built %s reranker on %s: %d layers, exits %s", config.family, config.base_model, num_layers,
                    list(config.exits))
        return model

    @classmethod
    def load(cls, folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> LayerwiseReranker:
        """Load a folder written by :meth:`save` (clear errors on missing or mismatched files)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        from matryoshka.training.loading import backbone_from_config

        folder = Path(folder)
        config = RerankerConfig.load(folder)
        weights, tok_path = folder / WEIGHTS_FILE, folder / TOKENIZER_FILE
        for path, what in ((weights, "model weights"), (tok_path, "tokenizer")):
            if not path.is_file():
                raise MissingInputError(path, what, "expected a folder written by LayerwiseReranker.save")
        tokenizer = Tokenizer.from_file(str(tok_path))
        model = cls(config, backbone_from_config(config), tokenizer)
        try:
            state = load_file(str(weights), device=str(device))
        except (SafetensorError, OSError) as exc:
            raise DataFormatError(weights, None, f"cannot read safetensors weights ({exc})",
                                  "re-save the model") from None
        missing, unexpected = _compare_keys(model.state_dict(), state)
        if missing or unexpected:
            raise DataFormatError(weights, None, f"weights do not match {CONFIG_FILE}: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}", "re-save the model with LayerwiseReranker.save")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise DataFormatError(weights, None, f"weights do not fit {CONFIG_FILE}: {str(exc).splitlines()[0]}",
                                  "re-save the model with LayerwiseReranker.save") from None
        return model.to(device)

    def save(self, folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write ``model.safetensors``, ``tokenizer.json`` and ``matryoshka_config.json`` atomically into ``folder``."""
        from safetensors.torch import save_file

        if self.tokenizer is None:
            raise ModelConfigError("this model has no tokenizer: expected one from build() or load()")
        record_compensation(self)
        self.config.versions = package_versions()
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_directory(folder, overwrite=overwrite) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            self.tokenizer.save(str(tmp / TOKENIZER_FILE))
            self.config.save(tmp)
        logger.info("saved reranker to %s", folder)
        return Path(folder)

    def select_exits(self, exits: Sequence[int]) -> LayerwiseReranker:
        """Keep only the exits ``exits`` (a subset of this model's, ending with the final layer); the heads and
        compensation of the others are dropped. Scores of the kept exits do not change (each exit's head and
        compensation read only its own layer). Used to leave out an exit that did not learn. Returns ``self``."""
        wanted = tuple(int(e) for e in exits)
        current = tuple(self.config.exits)
        unknown = [e for e in wanted if e not in current]
        if not wanted or unknown:
            raise ModelConfigError(f"exits={list(wanted)} is invalid: expected a subset of this model's exits "
                                   f"{list(current)}" + (f" ({unknown} are not exits)" if unknown else ""))
        if wanted[-1] != current[-1] or list(wanted) != sorted(set(wanted)):
            raise ModelConfigError(f"exits={list(wanted)} is invalid: expected strictly ascending exits ending with "
                                   f"the final layer {current[-1]}")
        for dropped in (e for e in current if e not in wanted):
            del self.heads[str(dropped)]
            del self.compensation[str(dropped)]
            if self.projections is not None:
                del self.projections[str(dropped)]
        self.config = dataclasses.replace(self.config, exits=wanted)
        if self.config.compensation.get("per_exit"):
            info = dict(self.config.compensation)
            info["per_exit"] = {k: v for k, v in info["per_exit"].items() if int(k) in wanted}
            self.config.compensation = info
        logger.info("kept exits %s of %s", list(wanted), list(current))
        return self

    # ------------------------------------------------------------------------------------------------ training aids
    def gradient_checkpointing_enable(self) -> None:
        """Recompute each layer in the backward pass (our own wrapper around the layer loop)."""
        self._checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self._checkpointing = False

    def sample_compression(self, generator: torch.Generator, include_uncompressed: bool = False
                           ) -> Compression | None:
        """A random trained (layer, ratio) for one training step, drawn from the caller's seeded generator."""
        return sample_compression(self.config.compress_layers, self.config.compress_ratios, generator,
                                  include_uncompressed)

    # ------------------------------------------------------------------------------------------------ stages
    def embed(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
              position_ids: Tensor | None = None) -> State:
        hidden, positions = self.adapter.embed(self.backbone, input_ids, attention_mask, token_type_ids,
                                               position_ids, self.segment_start)
        return State(hidden, attention_mask, positions)

    def run_layers(self, state: State, start: int, end: int, compression: Compression | None = None) -> State:
        """Run 0-based layers ``[start, end)``; pool segment B right after layer ``compression.layer`` (1-based)
        when it lies in ``(start, end]``."""
        if not 0 <= start < end <= self.config.num_layers:
            raise ModelConfigError(f"layer range [{start}, {end}) is invalid: expected 0 <= start < end <= "
                                   f"{self.config.num_layers}")
        if compression is not None and compression.layer >= self.config.num_layers:
            raise ModelConfigError(f"compression layer={compression.layer} is invalid: expected 1.."
                                   f"{self.config.num_layers - 1}")
        hidden, mask, positions = state.hidden_states, state.attention_mask, state.position_ids
        layers = self.adapter.layers(self.backbone)
        bias = self.adapter.attention_bias(mask, hidden.dtype, self.segment_start)
        context = self.adapter.layer_context(self.backbone, hidden, positions)
        for index in range(start, end):
            hidden = self._call_layer(layers[index], hidden, bias, positions, context)
            if compression is not None and compression.layer == index + 1:
                hidden, mask, positions = compress_passage(
                    hidden, mask, positions, query_length=self.layout.query_length,
                    suffix_length=self.layout.suffix_length, ratio=compression.ratio,
                    method=self.config.compress_method, scorer=self.compress_scorer)
                bias = self.adapter.attention_bias(mask, hidden.dtype, self.segment_start)
                context = self.adapter.layer_context(self.backbone, hidden, positions)
        return State(hidden, mask, positions)

    def _call_layer(self, layer: nn.Module, hidden: Tensor, bias: Tensor, positions: Tensor,
                    context: dict[str, Any]) -> Tensor:
        run = partial(self.adapter.call_layer, layer, bias=bias, position_ids=positions, context=context)
        if self._checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(run, hidden, use_reentrant=False)
        return run(hidden)

    def exit_hidden(self, state: State, exit_layer: int | None = None, final_query: Tensor | None = None) -> Tensor:
        """The ``[B, H]`` vector the head of ``exit_layer`` reads ([CLS], or the final norm of the last token; with
        readout ``"mean"`` the mean of the hidden states over ``attention_mask``; with ``"cosine"`` the element-wise
        product of the two segments' projected, normalised means, whose sum is their cosine). With
        ``query_exit="final"`` the query side is ``final_query``, the query segment's final-layer mean."""
        if self.config.readout == "mean":
            return _masked_mean(state.hidden_states, state.attention_mask)
        if self.config.readout == "cosine":
            query, passage = self.segment_means(state)
            if self.config.query_exit == "final":
                if final_query is None:
                    raise ModelConfigError("query_exit='final': the early exits need the query's final-layer mean "
                                           "(final_query), e.g. from encode_segment of the query segment")
                query = final_query
            return self.cosine_features(query, passage, exit_layer)
        return self.adapter.exit_hidden(self.backbone, state.hidden_states)

    def exit_query(self, query_means: Tensor, index: int) -> Tensor:
        """From per-exit query means ``[..., E, H]`` (the order of ``config.exits``), the one exit number ``index``
        scores against: that exit's own, or with ``query_exit="final"`` the final exit's."""
        return query_means[..., -1 if self.config.query_exit == "final" else index, :]

    def segment_means(self, state: State) -> tuple[Tensor, Tensor]:
        """``(query, passage)`` ``[B, H]``: the masked mean of each segment's hidden states."""
        split = self.layout.query_length
        hidden, mask = state.hidden_states, state.attention_mask
        return _masked_mean(hidden[:, :split], mask[:, :split]), _masked_mean(hidden[:, split:], mask[:, split:])

    def encode_segment(self, input_ids: Tensor, attention_mask: Tensor) -> dict[int, Tensor]:
        """``{exit: [B, H]}``: the masked mean, after every exit layer, of ONE segment encoded alone (attention
        ``"segments"``; e.g. a pair batch's ``[:, :query_length]`` or ``[:, query_length:]`` columns). Equal to
        :meth:`segment_means` of a pair holding that segment, since segments never see each other."""
        state, out, start = self.embed_segment(input_ids, attention_mask), {}, 0
        for exit_layer in self.config.exits:
            state = self.run_segment_layers(state, start, exit_layer)
            out[exit_layer] = segment_embedding(state)
            start = exit_layer
        return out

    def embed_segment(self, input_ids: Tensor, attention_mask: Tensor) -> State:
        """The embeddings of ONE segment per row (a query or a passage encoded alone; attention ``"segments"``)."""
        if self.segment_start is None:
            raise ModelConfigError("a segment can be encoded alone only with attention='segments': with "
                                   "attention='pair' its states depend on the other segment")
        hidden, positions = self.adapter.embed(self.backbone, input_ids, attention_mask, None, None, 0)
        return State(hidden, attention_mask, positions)

    def run_segment_layers(self, state: State, start: int, end: int) -> State:
        """Run 0-based layers ``[start, end)`` on a state from :meth:`embed_segment` (plain attention within it)."""
        if not 0 <= start < end <= self.config.num_layers:
            raise ModelConfigError(f"layer range [{start}, {end}) is invalid: expected 0 <= start < end <= "
                                   f"{self.config.num_layers}")
        hidden, layers = state.hidden_states, self.adapter.layers(self.backbone)
        bias = self.adapter.attention_bias(state.attention_mask, hidden.dtype)
        context = self.adapter.layer_context(self.backbone, hidden, state.position_ids)
        for index in range(start, end):
            hidden = self._call_layer(layers[index], hidden, bias, state.position_ids, context)
        return State(hidden, state.attention_mask, state.position_ids)

    def segment_score(self, query_embedding: Tensor, passage_embedding: Tensor, exit_layer: int) -> Tensor:
        """The compensated ``[B]`` score of exit ``exit_layer`` from the two segments' embeddings at that exit
        (:func:`segment_embedding`; the query's at the final exit with ``query_exit="final"``): equal to the pair
        forward's score of that exit (readout ``"cosine"``)."""
        return self.head_scores(self.cosine_features(query_embedding, passage_embedding, exit_layer), exit_layer)[1]

    def cosine_features(self, query_mean: Tensor, passage_mean: Tensor, exit_layer: int) -> Tensor:
        """``normalize(P_l q) * normalize(P_l p)`` ``[B, H]`` (readout ``"cosine"``; ``P_L q``, ``q`` the final-layer
        query mean, with ``query_exit="final"``): what exit ``exit_layer``'s head
        and compensation read. Also used on cached segment means (:mod:`matryoshka.training.segment_heads`)."""
        if self.projections is None or str(exit_layer) not in self.projections:
            raise ModelConfigError(f"exit_layer={exit_layer} has no cosine projection: expected readout='cosine' "
                                   f"and one of the exits {list(self.config.exits)}")
        project = self.projections[str(exit_layer)]
        query_side = self.projections[str(self.config.exits[-1])] if self.config.query_exit == "final" else project
        query = nn.functional.normalize(query_side(query_mean), dim=-1)
        passage = nn.functional.normalize(project(passage_mean), dim=-1)
        return query * passage

    def exit_score(self, state: State, exit_layer: int, calibrated: bool = True) -> Tensor:
        """The ``[B]`` score of exit ``exit_layer`` (1-based; ``state`` must be the output of that layer)."""
        raw, compensated = self.head_scores(self.exit_hidden(state, exit_layer), exit_layer)
        return compensated if calibrated else raw

    def head_scores(self, hidden: Tensor, exit_layer: int) -> tuple[Tensor, Tensor]:
        """``(raw, compensated)`` ``[B]`` scores of exit ``exit_layer``'s head on the ``[B, H]`` vector it reads."""
        key = str(exit_layer)
        if key not in self.heads:
            raise ModelConfigError(f"exit_layer={exit_layer} is not an exit: expected one of {list(self.config.exits)}")
        raw = self.heads[key](hidden).squeeze(-1)
        return raw, self.compensation[key](hidden, raw)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None,
                position_ids: Tensor | None = None, compression: Compression | None = None) -> ExitScores:
        """Scores of every exit for a batch built by the model's :class:`PairLayout` (``compression=None``: none)."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ModelConfigError(f"input_ids {tuple(input_ids.shape)} / attention_mask "
                                   f"{tuple(attention_mask.shape)} are invalid: expected two equal [batch, seq] shapes")
        state = self.embed(input_ids, attention_mask, token_type_ids, position_ids)
        states, start = [], 0
        for exit_layer in self.config.exits:
            state = self.run_layers(state, start, exit_layer, compression)
            states.append(state)
            start = exit_layer
        # query_exit="final": the query segment's mean after the last layer, which this pass has just computed
        final_query = self.segment_means(states[-1])[0] if self.config.query_exit == "final" else None
        raws, calibrated = [], []
        for exit_layer, exit_state in zip(self.config.exits, states, strict=True):
            raw, comp = self.head_scores(self.exit_hidden(exit_state, exit_layer, final_query), exit_layer)
            raws.append(raw)
            calibrated.append(comp)
        return ExitScores(tuple(self.config.exits), torch.stack(raws), torch.stack(calibrated))


def segment_embedding(state: State) -> Tensor:
    """``[B, H]``: the masked mean of a segment's hidden states (what the cosine readout compares)."""
    return _masked_mean(state.hidden_states, state.attention_mask)


def _masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class ExitProjection(nn.Linear):
    """``P(x) = W x + b (+ mlp(x))``: a square linear map that starts as the identity, plus, when ``hidden > 0``, a
    residual ``LayerNorm -> Linear(size, hidden) -> GELU -> Linear(hidden, size)`` whose last layer starts at zero,
    so a new projection is the identity either way. The state-dict keys of the linear part are those of a plain
    ``nn.Linear`` (models saved before the MLP existed load unchanged)."""

    def __init__(self, size: int, hidden: int = 0) -> None:
        super().__init__(size, size)
        with torch.no_grad():
            self.weight.copy_(torch.eye(size))
            self.bias.zero_()
        self.mlp: nn.Sequential | None = None
        if hidden:
            self.mlp = nn.Sequential(nn.LayerNorm(size), nn.Linear(size, hidden), nn.GELU(), nn.Linear(hidden, size))
            with torch.no_grad():
                self.mlp[-1].weight.zero_()
                self.mlp[-1].bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out if self.mlp is None else out + self.mlp(x)


def _compare_keys(expected: dict[str, Tensor], found: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
