"""Command-line arguments of the training tools: dataclasses parsed by ``transformers.HfArgumentParser``.

Every tool accepts either flags (``--learning_rate 3e-5``) or a single JSON file with the same keys
(``python -m matryoshka.training run.json``). Values are checked in ``__post_init__`` so a bad option fails before
any work, with one line naming the option, the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matryoshka.errors import DataFormatError, MissingInputError, OptionError

PHASES = ("layerwise_ce", "self_distill", "compensation")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("final", "next_deeper", "anchors", "teacher")


def parse_arguments(types: Sequence[type], argv: Sequence[str] | None, prog: str | None = None) -> tuple[Any, ...]:
    """Parse ``argv`` into instances of the dataclasses ``types`` (flags, or one ``.json`` file)."""
    from transformers import HfArgumentParser

    args = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(list(types), prog=prog)
    if len(args) == 1 and args[0].endswith(".json"):
        path = Path(args[0])
        if not path.is_file():
            raise MissingInputError(path, "arguments JSON file", "pass flags or an existing .json file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataFormatError(path, err.lineno, f"invalid JSON ({err.msg})") from None
        known = {f.name for t in types for f in dataclasses.fields(t)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataFormatError(path, None, f"unknown arguments {unknown}", f"expected a subset of {sorted(known)}")
        return tuple(parser.parse_dict(data))
    return tuple(parser.parse_args_into_dataclasses(args=args))


@dataclass
class ModelArguments:
    base_model: str = field(default="", metadata={"help": "base model folder (HF folder, or one with a GGUF file)"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside base_model"})
    init_checkpoint: str | None = field(default=None, metadata={
        "help": "start from a saved reranker folder instead of base_model (e.g. the compensation phase)"})
    exits: list[int] = field(default_factory=list, metadata={"help": "exit layers, ascending, last = num layers"})
    max_length: int = field(default=256, metadata={"help": "tokens per (query, passage) pair"})
    query_length: int = field(default=32, metadata={"help": "fixed query segment length (special tokens included)"})
    compress_layers: list[int] = field(default_factory=list, metadata={"help": "token compression after layers"})
    compress_ratios: list[int] = field(default_factory=list, metadata={"help": "token compression ratios"})
    compress_method: str = field(default="mean", metadata={"help": "'mean' or 'attention' pooling"})
    freeze_word_embeddings: bool = field(default=False, metadata={
        "help": "keep the token embedding matrix as in the base model (fewer trained weights)"})
    head_seed: int = field(default=0, metadata={"help": "seed of the exit heads' initialisation"})
    readout: str = field(default="token", metadata={
        "help": "what the exit heads read: 'token' ([CLS] / last token), 'mean' (encoders: masked token mean) or "
                "'cosine' (encoders with --attention segments: the cosine of the query's and passage's means)"})
    attention: str = field(default="pair", metadata={
        "help": "'pair' (a cross-encoder: every token sees every token) or 'segments' (BERT: query and passage "
                "each attend within themselves, as the bi-encoder encodes them alone)"})

    def __post_init__(self) -> None:
        if not self.base_model and not self.init_checkpoint:
            raise OptionError("base_model", self.base_model, "a base model folder (or --init_checkpoint)")
        if self.query_length < 3 or self.max_length <= self.query_length:
            raise OptionError("query_length", self.query_length, f"3 <= query_length < max_length={self.max_length}")


@dataclass
class DataArguments:
    train_sets: list[str] = field(default_factory=list, metadata={"help": "training-set folders (mining output)"})
    teacher_files: list[str] = field(default_factory=list, metadata={
        "help": "teacher TSVs, one per training set in the same order (optional)"})
    group_size: int = field(default=16, metadata={"help": "passages per query group: 1 positive + negatives"})
    negative_depth: int = field(default=0, metadata={"help": "draw negatives from the top-N candidates (0 = all)"})
    queries_per_epoch: list[int] = field(default_factory=list, metadata={
        "help": "per training set: a fresh seeded sample of this many queries each epoch (0 = all)"})
    positives_per_query: list[int] = field(default_factory=list, metadata={
        "help": "per training set: groups per query and epoch, each with another positive (0 = every positive; "
                "default 1)"})
    residual_set: str | None = field(default=None, metadata={
        "help": "held-out training-set folder for the compensation residuals (default: training groups)"})
    residual_groups: int = field(default=64, metadata={"help": "groups used to measure the residuals"})

    def __post_init__(self) -> None:
        if not self.train_sets:
            raise OptionError("train_sets", self.train_sets, "at least one training-set folder")
        if self.teacher_files and len(self.teacher_files) != len(self.train_sets):
            raise OptionError("teacher_files", self.teacher_files,
                              f"one teacher file per training set ({len(self.train_sets)}) or none")
        if self.queries_per_epoch and len(self.queries_per_epoch) != len(self.train_sets):
            raise OptionError("queries_per_epoch", self.queries_per_epoch,
                              f"one count per training set ({len(self.train_sets)}; 0 = all) or none")
        if self.positives_per_query and (len(self.positives_per_query) != len(self.train_sets)
                                         or any(k < 0 for k in self.positives_per_query)):
            raise OptionError("positives_per_query", self.positives_per_query,
                              f"one count >= 0 per training set ({len(self.train_sets)}; 0 = every positive) or none")
        if self.group_size < 2:
            raise OptionError("group_size", self.group_size, ">= 2 (one positive and at least one negative)")


@dataclass
class TrainArguments:
    output_dir: str = field(default="", metadata={"help": "folder for checkpoints, log.jsonl and model/"})
    phase: str = field(default="layerwise_ce", metadata={"help": f"one of {list(PHASES)}"})
    num_epochs: int = field(default=1, metadata={"help": "epochs over the training queries"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0 = all epochs)"})
    per_device_batch_size: int = field(default=4, metadata={"help": "query groups per step and rank"})
    learning_rate: float = field(default=3e-5, metadata={"help": "peak AdamW learning rate"})
    head_learning_rate: float = field(default=0.0, metadata={"help": "learning rate of heads/compensation (0 = same)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases/norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "linear warm-up share of all steps"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (GPU; also works on CPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute layers in the backward pass"})
    seed: int = field(default=0, metadata={"help": "seed of groups, dropout and compression sampling"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KL terms"})
    teacher_weight: float = field(default=1.0, metadata={"help": "weight of the KL to the teacher file's scores"})
    teacher_scale: float = field(default=1.0, metadata={"help": "teacher scores are multiplied by this first"})
    distill_weight: float = field(default=1.0, metadata={"help": "self-distillation weight (deeper -> shallower)"})
    distill_strategy: str = field(default="final", metadata={
        "help": "who teaches whom: final | next_deeper | anchors | teacher"})
    anchors: list[int] = field(default_factory=list, metadata={"help": "anchor exits of the 'anchors' strategy"})
    gap_weight: float = field(default=1.0, metadata={"help": "compensation phase: weight of the score-gap term"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (oldest removed)"})
    logging_steps: int = field(default=10, metadata={"help": "write a log.jsonl line every N steps"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in output_dir"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start afresh in an existing output_dir"})
    final_model_dir: str | None = field(default=None, metadata={"help": "where the final model goes (output/model)"})
    device: str = field(default="auto", metadata={"help": f"one of {list(DEVICES)}"})
    stop_after_steps: int = field(default=0, metadata={
        "help": "exit right after this step's checkpoint, as if killed (tests resume); 0 = off"})

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise OptionError("output_dir", self.output_dir, "a folder for checkpoints and the final model")
        checks = [("phase", self.phase in PHASES, f"one of {list(PHASES)}"),
                  ("device", self.device in DEVICES, f"one of {list(DEVICES)}"),
                  ("num_epochs", self.num_epochs >= 1, ">= 1"),
                  ("max_steps", self.max_steps >= 0, ">= 0"),
                  ("per_device_batch_size", self.per_device_batch_size >= 1, ">= 1"),
                  ("learning_rate", self.learning_rate > 0, "> 0"),
                  ("head_learning_rate", self.head_learning_rate >= 0, ">= 0"),
                  ("warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)"),
                  ("temperature", self.temperature > 0, "> 0"),
                  ("distill_strategy", self.distill_strategy in STRATEGIES, f"one of {list(STRATEGIES)}"),
                  ("teacher_weight", self.teacher_weight >= 0, ">= 0"),
                  ("save_steps", self.save_steps >= 0, ">= 0"),
                  ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
                  ("logging_steps", self.logging_steps >= 1, ">= 1"),
                  ("stop_after_steps", self.stop_after_steps >= 0, ">= 0")]
        for name, ok, expected in checks:
            if not ok:
                raise OptionError(name, getattr(self, name), expected)
        if self.resume and self.overwrite_output_dir:
            raise OptionError("resume", self.resume, "not together with overwrite_output_dir")
