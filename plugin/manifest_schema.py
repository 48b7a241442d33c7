"""Dataclasses and constants of ``manifest.json`` schema version 1 (public API: :mod:`matryoshka.plugin.manifest`).

See the module docstring there for what is checked and how the export builds a manifest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matryoshka.errors import DataFormatError
from matryoshka.layout import Compression, PairLayout
from matryoshka.plugin.policies import POLICIES

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: precision names a stage file may be stored under ("optimized" = ORT transformer-optimized fp32 graph)
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "optimized", "optimized-int8")
FAMILIES = ("encoder", "decoder")
POLICY_NAMES = tuple(POLICIES)  # derived from the policy registry
CALIBRATION_KINDS = ("affine",)
FIRST_STAGE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
STATE_INPUTS = ("hidden_states", "attention_mask", "position_ids")
STAGE_OUTPUTS = ("hidden_states_out", "attention_mask_out", "position_ids_out", "score")
#: ``encoding="segments"`` (attention within each segment, cosine readout): a stage encodes ONE segment (a query or
#: a passage, never a pair) and scores passages against the query embedding of the same exit, so each query is
#: encoded once per stage instead of once per candidate
SEGMENT_FIRST_INPUTS = ("input_ids", "attention_mask", "query_embedding")
SEGMENT_STATE_INPUTS = ("hidden_states", "attention_mask", "position_ids", "query_embedding")
SEGMENT_OUTPUTS = ("hidden_states_out", "attention_mask_out", "position_ids_out", "embedding", "score")
#: encoding -> (first stage inputs, later stage inputs, stage outputs): the stage contract of each encoding
STAGE_CONTRACTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "pair": (FIRST_STAGE_INPUTS, STATE_INPUTS, STAGE_OUTPUTS),
    "segments": (SEGMENT_FIRST_INPUTS, SEGMENT_STATE_INPUTS, SEGMENT_OUTPUTS),
}
ENCODINGS = tuple(STAGE_CONTRACTS)
REEXPORT = "re-export the model folder from its checkpoint with matryoshka.export"

PathLike = str | os.PathLike[str]


class ManifestError(DataFormatError):
    """A manifest that does not follow schema version 1, or a model folder that does not match its manifest."""

    def __init__(self, path: PathLike, problem: str, fix: str = REEXPORT) -> None:
        super().__init__(path, None, problem, fix)


class ModelIntegrityError(ManifestError):
    """A file of the model folder whose sha256 differs from the one the manifest records."""


# ------------------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Producer:
    package: str = "pyserini-matryoshka"
    version: str = ""
    torch: str = ""
    transformers: str = ""
    onnx: str = ""
    onnxruntime: str = ""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    base_model: str
    num_layers: int
    hidden_size: int


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    sha256: str


@dataclass(frozen=True)
class FileSpec:
    path: str
    sha256: str
    validated_atol: float | None = None

    @classmethod
    def from_file(cls, folder: PathLike, path: str, validated_atol: float | None = None) -> FileSpec:
        """Describe ``folder/path`` (a POSIX path relative to the model folder) with its current sha256."""
        return cls(path, sha256_file(Path(folder) / path), validated_atol)


@dataclass(frozen=True)
class StageSpec:
    index: int
    layers: tuple[int, int]
    exit_layer: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    files: dict[str, FileSpec]
    compression: Compression | None = None
    relative_cost: float = 0.0


@dataclass(frozen=True)
class FullGraphSpec:
    layers: tuple[int, int]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    files: dict[str, FileSpec]


@dataclass(frozen=True)
class ExitCalibration:
    scale: float = 1.0
    bias: float = 0.0
    residual_std: float = 0.0


@dataclass(frozen=True)
class Calibration:
    kind: str = "affine"
    in_graph: bool = True
    per_exit: dict[int, ExitCalibration] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicySpec:
    """The runtime defaults: exit policy and threshold, the weight of the first-stage score in the final score
    (``first_stage_weight``, optional in the JSON: absent = 0.0 = no fusion; see :mod:`matryoshka.plugin.fusion`),
    the rerank depth (``depth``, optional: absent = every candidate; else only each query's top ``depth``
    first-stage candidates are scored, the rest keep their order below them) and the per-query normalisation of the
    fusion (``fusion``, optional: absent = ``z``)."""

    name: str = "candidate"
    threshold: float = 0.95
    tuned_on: Any = None
    first_stage_weight: float = 0.0
    depth: int | None = None
    fusion: str = "z"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object; ``first_stage_weight`` only when it is not 0, ``depth`` only when set and ``fusion`` only
        when it is not ``z``, so manifests
        without them are written exactly as before the fields existed (older plugins ignore unknown fields)."""
        data: dict[str, Any] = {"name": self.name, "threshold": self.threshold, "tuned_on": self.tuned_on}
        if self.first_stage_weight != 0.0:
            data["first_stage_weight"] = self.first_stage_weight
        if self.depth is not None:
            data["depth"] = self.depth
        if self.fusion != "z":
            data["fusion"] = self.fusion
        return data


@dataclass(frozen=True)
class Manifest:
    producer: Producer
    model: ModelInfo
    tokenizer: TokenizerSpec
    layout: dict[str, Any]
    exits: tuple[int, ...]
    default_precision: str
    stages: tuple[StageSpec, ...]
    calibration: Calibration
    policy: PolicySpec
    full_graph: FullGraphSpec | None = None
    schema_version: int = SCHEMA_VERSION
    #: how stages read their input (see :data:`STAGE_CONTRACTS`); optional in the JSON, absent = ``"pair"``
    encoding: str = "pair"
    #: segment encoding only (:data:`matryoshka.layout.QUERY_EXITS`): "final" = every stage is fed the query's
    #: final-exit embedding (the runtime runs each query through all stages first); optional, absent = ``"same"``
    query_exit: str = "same"

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions every stage has a file for."""
        return tuple(p for p in PRECISIONS if all(p in stage.files for stage in self.stages))

    def pair_layout(self) -> PairLayout:
        return PairLayout.from_dict(self.layout)

    def stage_paths(self, folder: PathLike, precision: str | None = None) -> list[Path]:
        precision = precision or self.default_precision
        if precision not in self.precisions:
            raise ManifestError(Path(folder) / MANIFEST_NAME, f"no stage files for precision {precision!r}; this "
                                f"model has {', '.join(self.precisions)}", "pick one of those precisions")
        return [Path(folder) / stage.files[precision].path for stage in self.stages]

    def exit_calibration(self, exit_layer: int) -> ExitCalibration:
        return self.calibration.per_exit[exit_layer]

    def to_dict(self) -> dict[str, Any]:
        def files(specs: Mapping[str, FileSpec]) -> dict[str, Any]:
            return {name: {"path": f.path, "sha256": f.sha256, "validated_atol": f.validated_atol}
                    for name, f in specs.items()}

        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "producer": vars(self.producer).copy(),
            "model": vars(self.model).copy(),
            "tokenizer": vars(self.tokenizer).copy(),
            "layout": self.layout,
            "exits": list(self.exits),
            "default_precision": self.default_precision,
            "stages": [{"index": s.index, "layers": list(s.layers), "exit_layer": s.exit_layer,
                        "inputs": list(s.inputs), "outputs": list(s.outputs),
                        "compression": vars(s.compression).copy() if s.compression else None,
                        "relative_cost": s.relative_cost, "files": files(s.files)} for s in self.stages],
            "full_graph": None if self.full_graph is None else {
                "layers": list(self.full_graph.layers), "inputs": list(self.full_graph.inputs),
                "outputs": list(self.full_graph.outputs), "files": files(self.full_graph.files)},
            "calibration": {"kind": self.calibration.kind, "in_graph": self.calibration.in_graph,
                            "per_exit": {str(k): vars(v).copy() for k, v in self.calibration.per_exit.items()}},
            "policy": self.policy.to_dict(),
        }
        if self.encoding != "pair":  # absent = "pair": pair manifests are written exactly as before the field
            data["encoding"] = self.encoding
        if self.query_exit != "same":  # absent = "same": earlier manifests are written exactly as before the field
            data["query_exit"] = self.query_exit
        return data


# ------------------------------------------------------------------------------------------------------- hashing
def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
