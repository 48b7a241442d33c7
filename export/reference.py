"""The PyTorch side of the export: the modules handed to ``torch.onnx.export`` and the reference outputs the ONNX
graphs are validated against. Both call the one model definition (``matryoshka.training.modeling``) through its
stage API (``embed`` / ``run_layers`` / ``exit_score``) with keyword arguments, never a copy of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from matryoshka.export.spec import GraphSpec
from matryoshka.layout import PairLayout
from matryoshka.training.modeling import LayerwiseReranker, State, segment_embedding

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class StageOutput:
    """The PyTorch outputs of one stage, keyed by the graph's output names."""

    arrays: dict[str, np.ndarray]


class GraphModule(nn.Module):
    """One stage (or the full graph) as a module with positional tensor inputs in the declared order."""

    def __init__(self, model: LayerwiseReranker, spec: GraphSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.compression = model.config.inference_compression

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        values = dict(zip(self.spec.input_names, tensors, strict=True))
        if self.spec.segments:
            return self._segment_forward(values)
        if self.spec.first:
            state = self.model.embed(input_ids=values["input_ids"], attention_mask=values["attention_mask"],
                                     token_type_ids=values["token_type_ids"], position_ids=values["position_ids"])
        else:
            state = State(hidden_states=values["hidden_states"], attention_mask=values["attention_mask"],
                          position_ids=values["position_ids"])
        state = self.model.run_layers(state, self.spec.start, self.spec.end, self.compression)
        score = self.model.exit_score(state, self.spec.exit_layer, calibrated=True)
        if self.spec.is_full:
            return (score,)
        return state.hidden_states, state.attention_mask, state.position_ids, score

    def _segment_forward(self, values: dict[str, Tensor]) -> tuple[Tensor, ...]:
        if self.spec.first:
            state = self.model.embed_segment(values["input_ids"], values["attention_mask"])
        else:
            state = State(values["hidden_states"], values["attention_mask"], values["position_ids"])
        state = self.model.run_segment_layers(state, self.spec.start, self.spec.end)
        embedding = segment_embedding(state)
        score = self.model.segment_score(values["query_embedding"], embedding, self.spec.exit_layer)
        return state.hidden_states, state.attention_mask, state.position_ids, embedding, score


def make_batch(layout: PairLayout, passage_lengths: Sequence[int], vocab_size: int, seed: int,
               overlaps: Sequence[float] | None = None) -> Batch:
    """A batch of random token ids laid out by ``layout`` (one pair per passage length), with ``position_ids``.

    Ids are drawn from the upper three quarters of the vocabulary (ordinary tokens, not the specials at its start).
    Queries have varied lengths too, so padding occurs inside segment A and B. ``overlaps[i]`` is the share of
    passage i's tokens copied from its query: lexical overlap spreads a trained reranker's scores, so that rank
    agreement of quantized variants is measured on scores that differ (random pairs all look irrelevant).
    """
    rng = np.random.default_rng(seed)
    low = min(vocab_size // 4, 1000)
    budget = layout.query_budget
    queries = [rng.integers(low, vocab_size, int(rng.integers(1, budget + 1))) for _ in passage_lengths]
    passages = []
    for i, (query, n) in enumerate(zip(queries, passage_lengths, strict=True)):
        passage = rng.integers(low, vocab_size, max(int(n), 1))
        if overlaps is not None:
            copied = rng.random(len(passage)) < overlaps[i]
            passage[copied] = rng.choice(query, int(copied.sum()))
        passages.append(passage.tolist())
    batch = layout.assemble([q.tolist() for q in queries], passages)
    if "position_ids" not in batch:  # encoders: 0..S-1 (the contract's stage-1 input; BERT ignores it)
        seq = batch["input_ids"].shape[1]
        batch["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int64), batch["input_ids"].shape).copy()
    return batch


def query_embedding_key(stage_index: int) -> str:
    """The key under which a segment batch holds the query embeddings stage ``stage_index`` reads."""
    return f"query_embedding.{stage_index}"


@torch.inference_mode()
def segment_batch(model: LayerwiseReranker, pairs: Batch) -> Batch:
    """A pair batch (:func:`make_batch`) recast for ``encoding="segments"`` graphs: the passage segments (segment
    B's columns, trimmed to the longest) as ``input_ids``/``attention_mask``/``position_ids``, and per stage k the
    PyTorch query embedding stage k reads (:func:`query_embedding_key`): the query segment's at exit k, or at the
    final exit with ``query_exit="final"``."""
    split = model.layout.query_length
    mask = pairs["attention_mask"][:, split:]
    width = max(int(mask.sum(axis=1).max()), 1)
    ids, mask = pairs["input_ids"][:, split:split + width], mask[:, :width]
    batch = {"input_ids": np.ascontiguousarray(ids), "attention_mask": np.ascontiguousarray(mask),
             "position_ids": np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()}
    query = {k: torch.from_numpy(np.ascontiguousarray(pairs[k][:, :split])) for k in ("input_ids", "attention_mask")}
    means = model.encode_segment(query["input_ids"], query["attention_mask"])
    stacked = torch.stack([means[e] for e in model.config.exits], dim=-2)     # [B, E, H]
    for k in range(len(model.config.exits)):
        batch[query_embedding_key(k)] = model.exit_query(stacked, k).numpy()
    return batch


def stage_feed(spec: GraphSpec, values: Batch, batch: Batch) -> Batch:
    """The inputs of ``spec`` from ``values`` (token ids or the previous stage's state) plus, for a segment stage,
    the query embeddings of its exit from ``batch`` (:func:`segment_batch`)."""
    feed = {name: values[name] for name in spec.input_names if name != "query_embedding"}
    if spec.segments:
        feed["query_embedding"] = batch[query_embedding_key(spec.index)]
    return feed


def to_tensors(spec: GraphSpec, batch: Batch) -> tuple[Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[name])) for name in spec.input_names)


@torch.inference_mode()
def reference_outputs(model: LayerwiseReranker, stages: Sequence[GraphSpec], batch: Batch) -> list[StageOutput]:
    """Run the PyTorch stages in sequence on ``batch``; each stage starts from the previous stage's state."""
    outputs: list[StageOutput] = []
    state_values: dict[str, np.ndarray] = batch
    for spec in stages:
        module = GraphModule(model, spec).eval()
        result = module(*to_tensors(spec, stage_feed(spec, state_values, batch)))
        arrays = {name: t.detach().cpu().numpy() for name, t in zip(spec.output_names, result, strict=True)}
        outputs.append(StageOutput(arrays))
        state_values = state_feed(arrays)
    return outputs


def state_feed(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stage's outputs renamed to the next stage's inputs (``X_out`` feeds ``X``)."""
    return {name.removesuffix("_out"): value for name, value in outputs.items() if name.endswith("_out")}


def graph_inputs(model: LayerwiseReranker, graphs: Sequence[GraphSpec], batch: Batch) -> dict[str, Batch]:
    """The inputs each graph sees for ``batch`` (token ids for first graphs, the PyTorch state for later stages)."""
    stages = [g for g in graphs if not g.is_full]
    outputs = reference_outputs(model, stages, batch)
    feeds = {}
    for graph in graphs:
        values = batch if graph.first else state_feed(outputs[graph.index - 1].arrays)
        feeds[graph.name] = values if graph.is_full else stage_feed(graph, values, batch)
    return feeds
