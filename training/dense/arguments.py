"""Options of the bi-encoder trainer (``DenseArguments``), parsed with ``HfArgumentParser`` next to the shared
:class:`~matryoshka.training.arguments.DataArguments` and :class:`~matryoshka.training.arguments.TrainArguments`
(their ``temperature``, ``teacher_weight`` and ``teacher_scale`` drive the distillation term)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from matryoshka.errors import OptionError
from matryoshka.training.dense.config import Pooling, TrainingMode


@dataclass
class DenseArguments:
    base_model: str = field(default="", metadata={
        "help": "local Hugging Face model folder (encoder or decoder), or a saved dense model to continue from"})
    pooling: Pooling | None = field(default=None, metadata={
        "help": "last | mean | cls (default: the folder's dense_config.json, else last for decoders, mean for "
                "encoders)"})
    normalize: bool = field(default=False, metadata={"help": "L2-normalise the vectors (cosine similarity)"})
    similarity_temperature: float = field(default=0.05, metadata={
        "help": "scores = similarity / T in the contrastive loss (0.02-0.05 with --normalize; 1 without)"})
    mode: TrainingMode = field(default=TrainingMode.NORMAL, metadata={
        "help": "normal: in-batch negatives; custom: each query against its own group only; corpus: query-side "
                "fine-tuning against --passage_indexes (the passage encoder stays frozen)"})
    negatives_cross_device: bool = field(default=False, metadata={
        "help": "normal mode under DDP: score queries against every rank's passages (all-gather with gradients)"})
    passage_indexes: list[str] = field(default_factory=list, metadata={
        "help": "corpus mode: one Faiss index folder per training set, made with the base model (the frozen passage "
                "encoder); each query is scored against all of its documents"})
    sub_batch_size: int = field(default=0, metadata={"help": "encode in slices of this many texts (0 = off)"})
    query_prefix: str | None = field(default=None, metadata={"help": "query prefix / instruction ('' = none)"})
    passage_prefix: str | None = field(default=None, metadata={"help": "passage prefix ('' = none)"})
    query_max_length: int = field(default=64, metadata={"help": "query tokens (special tokens included)"})
    passage_max_length: int = field(default=256, metadata={"help": "passage tokens (special tokens included)"})

    def __post_init__(self) -> None:
        if not self.base_model:
            raise OptionError("base_model", self.base_model, "a local model folder")
        if self.pooling is not None and self.pooling not in list(Pooling) and self.pooling not in _values(Pooling):
            raise OptionError("pooling", self.pooling, f"one of {_values(Pooling)}")
        if self.mode not in list(TrainingMode) and self.mode not in _values(TrainingMode):
            raise OptionError("mode", self.mode, f"one of {_values(TrainingMode)}")
        self.pooling = Pooling(self.pooling) if self.pooling is not None else None
        self.mode = TrainingMode(self.mode)
        checks = [("similarity_temperature", self.similarity_temperature > 0, "> 0"),
                  ("sub_batch_size", self.sub_batch_size >= 0, ">= 0 (0 = off)"),
                  ("query_max_length", self.query_max_length >= 2, ">= 2"),
                  ("passage_max_length", self.passage_max_length >= 2, ">= 2")]
        for name, ok, expected in checks:
            if not ok:
                raise OptionError(name, getattr(self, name), expected)
        if self.negatives_cross_device and self.mode is not TrainingMode.NORMAL:
            raise OptionError("negatives_cross_device", True, f"off in {self.mode.value} mode (only normal mode "
                              "scores queries against the batch's passages)")
        if self.mode is TrainingMode.CORPUS and not self.passage_indexes:
            raise OptionError("passage_indexes", self.passage_indexes, "one Faiss index folder per training set in "
                              "corpus mode (python -m matryoshka.training.dense.encode with the base model)")
        if self.passage_indexes and self.mode is not TrainingMode.CORPUS:
            raise OptionError("passage_indexes", self.passage_indexes, "none outside corpus mode (--mode corpus "
                              "trains the query encoder against them)")


def _values(enum: type[Enum]) -> list[str]:
    return [member.value for member in enum]
