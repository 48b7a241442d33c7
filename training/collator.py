"""Batches for training: groups of (query, passage) pairs laid out by the model's :class:`PairLayout`.

A batch of ``n`` groups of size ``g`` becomes ``n * g`` rows, group after group (row ``i * g`` is the positive of
group ``i``), built by ``layout.encode`` — the same code the plugin uses at inference, so training and inference see
identical inputs. The collator adds ``labels`` ``[n, g]`` (grades; 0 for negatives), ``teacher_scores`` ``[n, g]``
(when the groups carry them) and ``group_size``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka.errors import MissingInputError
from matryoshka.layout import PairLayout, prepare_tokenizer
from matryoshka.training.data import Group, TrainingDataError, group_size_of


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
    """``tokenizers.Tokenizer`` from ``<model_dir>/tokenizer.json``, with its own truncation/padding switched off."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise MissingInputError(path, "tokenizer", "expected a model folder with tokenizer.json")
    return prepare_tokenizer(Tokenizer.from_file(str(path)))


class GroupCollator:
    """``collator(groups) -> dict`` of tensors (see the module docstring)."""

    def __init__(self, layout: PairLayout, tokenizer: Any) -> None:
        self.layout = layout
        self.tokenizer = prepare_tokenizer(tokenizer)

    def __call__(self, groups: Sequence[Group]) -> dict[str, Any]:
        size = group_size_of(groups)
        queries = [g.query for g in groups for _ in range(size)]
        passages = [p for g in groups for p in g.passages]
        encoded = self.layout.encode(self.tokenizer, queries, passages)
        batch: dict[str, Any] = {key: torch.from_numpy(value) for key, value in encoded.items()}
        batch["labels"] = torch.tensor([list(g.labels) for g in groups], dtype=torch.long)
        has_teacher = [g.teacher is not None for g in groups]
        if any(has_teacher):
            if not all(has_teacher):
                raise TrainingDataError("some groups carry teacher scores and some do not: expected all or none")
            batch["teacher_scores"] = torch.tensor(np.array([g.teacher for g in groups], dtype=np.float32))
        batch["group_size"] = size
        return batch


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors the model's ``forward`` takes, moved to ``device``."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}
