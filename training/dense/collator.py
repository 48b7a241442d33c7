"""Batches for the bi-encoder: groups (from the shared :class:`~matryoshka.training.data.GroupSampler`) become
tokenised queries ``[n]`` and passages ``[n * g]`` (group after group, the positive first), with the query and
passage prefixes applied exactly as Pyserini's encoder class for the model's pooling applies them.

Besides the tensors, a batch carries ``passage_keys`` ``[n * g]`` and ``positive_keys`` ``[n, K]``: 62-bit ids of
the passages' documents and of every known positive of each query (0 pads), so the loss can mask in-batch passages
that are in fact positives of a query (false negatives), across ranks too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from matryoshka.training.data import Group, TrainingDataError, TrainingSet, group_size_of
from matryoshka.training.dense.modeling import BiEncoder


def doc_key(docid: str) -> int:
    """A stable non-zero 62-bit id of a document id."""
    return (int.from_bytes(hashlib.sha1(docid.encode("utf-8")).digest()[:8], "little") >> 2) | 1


def known_positives(training_sets: Iterable[TrainingSet]) -> dict[str, frozenset[str]]:
    """``qid -> positives`` over all training sets (a qid found in several sets gets the union)."""
    out: dict[str, set[str]] = {}
    for training_set in training_sets:
        for query in training_set.queries:
            out.setdefault(query.qid, set()).update(query.positives)
    return {qid: frozenset(docs) for qid, docs in out.items()}


class DenseCollator:
    """``collator(groups) -> dict`` (see the module docstring)."""

    def __init__(self, model: BiEncoder, positives: Mapping[str, frozenset[str]] | None = None) -> None:
        self.model, self.positives = model, positives or {}

    def __call__(self, groups: Sequence[Group]) -> dict[str, Any]:
        size = group_size_of(groups)
        config = self.model.config
        batch: dict[str, Any] = {
            "query": self.model.tokenize([config.query_text(g.query) for g in groups], "query"),
            "passage": self.model.tokenize([config.passage_text(p) for g in groups for p in g.passages], "passage"),
            "group_size": size,
            "labels": torch.tensor([list(g.labels) for g in groups], dtype=torch.long),
            "passage_keys": torch.tensor([doc_key(d) for g in groups for d in g.docids], dtype=torch.long)}
        positive_sets = [self.positives.get(g.qid) or {g.docids[0]} for g in groups]
        width = max(len(s) for s in positive_sets)
        keys = np.zeros((len(groups), width), dtype=np.int64)
        for row, docs in enumerate(positive_sets):
            keys[row, :len(docs)] = [doc_key(d) for d in sorted(docs)]
        batch["positive_keys"] = torch.from_numpy(keys)
        has_teacher = [g.teacher is not None for g in groups]
        if any(has_teacher):
            if not all(has_teacher):
                raise TrainingDataError("some groups carry teacher scores and some do not: expected all or none")
            batch["teacher_scores"] = torch.tensor(np.array([g.teacher for g in groups], dtype=np.float32))
        return batch
