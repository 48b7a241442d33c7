"""The inputs, outputs and dynamic axes of every exported graph, declared as data (in the style of optimum's
``OnnxConfig``): the exporter, the validator and the manifest all read them from here.

Stage k runs the 0-based layers ``[exits[k-1], exits[k])`` (stage 0 from layer 0, including the embeddings) and
returns the state for the next stage plus the compensated score of exit ``exits[k]``; with
``encoding="segments"`` it runs them on one segment and also returns the segment's ``embedding`` (its score is
against ``query_embedding``). The full graph runs every layer and returns only the score. Names follow
``matryoshka.plugin.manifest`` (the schema owner).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from matryoshka.plugin.manifest import STAGE_CONTRACTS

DType = Literal["int64", "float32"]
BATCH, SEQUENCE, SEQUENCE_OUT, HIDDEN = "batch", "sequence", "sequence_out", "hidden"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and axes (a string names a dynamic axis, an int is fixed)."""

    name: str
    dtype: DType
    axes: tuple[str | int, ...]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: a for i, a in enumerate(self.axes) if isinstance(a, str) and a != HIDDEN}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: which layers it runs, what it reads and writes, and where it goes in the model folder."""

    name: str  # file stem, e.g. "stage_1" or "full"
    index: int | None  # stage index (0-based); None for the full graph
    start: int  # first 0-based layer
    end: int  # one past the last layer (= the 1-based exit layer)
    first: bool  # includes the embeddings (reads token ids)
    compression: Mapping[str, int] | None  # the inference compression this graph applies, if it crosses its layer
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    encoding: str = "pair"  # "segments": the graph encodes one segment and scores it against query_embedding

    @property
    def segments(self) -> bool:
        return self.encoding == "segments"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def exit_layer(self) -> int:
        return self.end

    @property
    def is_full(self) -> bool:
        return self.index is None

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """The ``dynamic_axes`` argument of ``torch.onnx.export``."""
        return {t.name: t.dynamic_axes for t in (*self.inputs, *self.outputs) if t.dynamic_axes}

    def file(self, precision: str) -> str:
        """The POSIX path of this graph's file for ``precision`` inside the model folder."""
        return f"{precision}/{self.name}.onnx"


#: every tensor a graph may read or write, by name (``S`` is ``sequence_out`` for outputs of a compressing stage)
def _tensor(name: str, compresses: bool = False) -> TensorSpec:
    seq = SEQUENCE_OUT if compresses and name.endswith("_out") else SEQUENCE
    if name in ("hidden_states", "hidden_states_out"):
        return TensorSpec(name, "float32", (BATCH, seq, HIDDEN))
    if name in ("query_embedding", "embedding"):
        return TensorSpec(name, "float32", (BATCH, HIDDEN))
    if name == "score":
        return TensorSpec(name, "float32", (BATCH,))
    return TensorSpec(name, "int64", (BATCH, seq))  # token ids, masks, positions


def _io(encoding: str, first: bool, compresses: bool) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    first_inputs, state_inputs, outputs = STAGE_CONTRACTS[encoding]
    return (tuple(_tensor(n) for n in (first_inputs if first else state_inputs)),
            tuple(_tensor(n, compresses) for n in outputs))


def compression_in(compression: Mapping[str, Any] | None, start: int, end: int) -> dict[str, int] | None:
    """``compression`` when its layer (1-based, "after layer l") lies in ``(start, end]``, else None."""
    if not compression:
        return None
    layer, ratio = int(compression["layer"]), int(compression["ratio"])
    return {"layer": layer, "ratio": ratio} if start < layer <= end and ratio > 1 else None


def stage_specs(exits: Sequence[int], compression: Mapping[str, Any] | None = None, encoding: str = "pair"
                ) -> list[GraphSpec]:
    """One :class:`GraphSpec` per exit, with the stage contract of ``encoding`` (``"pair"`` or ``"segments"``)."""
    specs, start = [], 0
    for k, end in enumerate(exits):
        comp = compression_in(compression, start, end)
        specs.append(GraphSpec(f"stage_{k + 1}", k, start, int(end), k == 0, comp,
                               *_io(encoding, k == 0, comp is not None), encoding=encoding))
        start = int(end)
    return specs


def full_graph_spec(num_layers: int, compression: Mapping[str, Any] | None = None) -> GraphSpec:
    """The single full-depth graph (same model, same compression) that the cascade is compared with."""
    inputs, _ = _io("pair", True, False)
    return GraphSpec("full", None, 0, num_layers, True, compression_in(compression, 0, num_layers), inputs,
                     (_tensor("score"),))
