"""Per-exit segment means of texts, encoded once and cached (models with ``attention="segments"``).

With segment attention a query and a passage never see each other, so the masked mean of a segment after every
exit layer depends on that text alone. :class:`SegmentCache` encodes each distinct text once per model (queries in
the query segment, passages in the passage segment, both laid out by the model's own :class:`PairLayout`, so the
truncation is the one the plugin applies) and keeps ``sha1(kind + text) -> [E, H]`` in ``<folder>/<key>.npz``.
Scoring cached means with :meth:`LayerwiseReranker.cosine_features` and the exit heads gives exactly the scores the
full pair forward gives (tested), at a tiny fraction of its cost; the segment-head training and the ablations use it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from matryoshka.io import atomic_write
from matryoshka.training.config import ModelConfigError
from matryoshka.training.modeling import LayerwiseReranker

logger = logging.getLogger(__name__)
KINDS = ("query", "passage")


def model_key(model: LayerwiseReranker) -> str:
    """What the cached means depend on: the backbone's weights, the layout and the exits."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(repr((model.layout.to_dict(), model.config.exits)).encode())
    return digest.hexdigest()[:16]


class SegmentCache:
    """``means(texts, kind) -> float32 [N, E, H]`` (E = the model's exits, in order), encoded once per text."""

    def __init__(self, model: LayerwiseReranker, folder: str | os.PathLike[str] | None, batch_size: int = 64) -> None:
        if model.segment_start is None:
            raise ModelConfigError("a segment cache needs a model with attention='segments'")
        if model.tokenizer is None:
            raise ModelConfigError("the model has no tokenizer: expected one from build() or load()")
        self.model, self.batch_size = model, batch_size
        self.path = Path(folder) / f"{model_key(model)}.npz" if folder else None
        self.known: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.is_file():
            with np.load(self.path) as stored:
                self.known = dict(zip(stored["keys"].tolist(), stored["means"], strict=True))

    @staticmethod
    def text_key(text: str, kind: str) -> str:
        return hashlib.sha1(f"{kind}\0{text}".encode()).hexdigest()

    def means(self, texts: Sequence[str], kind: str, desc: str = "") -> np.ndarray:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {list(KINDS)}")
        keys = [self.text_key(t, kind) for t in texts]
        todo = list(dict.fromkeys(k for k in keys if k not in self.known))
        if todo:
            by_key = dict(zip(keys, texts, strict=True))
            self.known.update(zip(todo, self._encode([by_key[k] for k in todo], kind, desc or kind), strict=True))
            self._save()
        logger.info("%s: %d %s texts, %d encoded now", desc or kind, len(texts), kind, len(todo))
        hidden = self.model.config.hidden_size
        if not keys:
            return np.zeros((0, len(self.model.config.exits), hidden), dtype=np.float32)
        return np.stack([self.known[k] for k in keys])

    def keyed(self, texts: Mapping[str, str], kind: str, desc: str = "") -> dict[str, np.ndarray]:
        names = list(texts)
        return dict(zip(names, self.means([texts[n] for n in names], kind, desc), strict=True))

    @torch.no_grad()
    def _encode(self, texts: list[str], kind: str, desc: str) -> list[np.ndarray]:
        from tqdm.auto import tqdm

        model, layout = self.model, self.model.layout
        split = layout.query_length
        tokenizer = model.tokenizer
        ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        order = np.argsort([-len(i) for i in ids], kind="stable")
        device = next(model.parameters()).device
        out: list[np.ndarray] = [np.empty(0)] * len(texts)
        was_training = model.training
        model.eval()
        try:
            for start in tqdm(range(0, len(texts), self.batch_size), desc=f"encoding {desc}", leave=False):
                index = order[start: start + self.batch_size]
                chosen = [ids[i] for i in index]
                empty: list[list[int]] = [[] for _ in index]
                pair = (layout.assemble(chosen, empty) if kind == "query" else layout.assemble(empty, chosen))
                columns = slice(0, split) if kind == "query" else slice(split, None)
                input_ids = torch.from_numpy(pair["input_ids"][:, columns])
                mask = torch.from_numpy(pair["attention_mask"][:, columns])
                width = int(mask.sum(dim=1).max())
                means = model.encode_segment(input_ids[:, :width].to(device), mask[:, :width].to(device))
                stacked = torch.stack([means[e] for e in model.config.exits], dim=1).float().cpu().numpy()
                for row, i in enumerate(index):
                    out[i] = stacked[row]
        finally:
            model.train(was_training)
        return out

    def _save(self) -> None:
        if self.path is None:
            return
        with atomic_write(self.path, mode="wb") as handle:
            np.savez(handle, keys=np.array(list(self.known)), means=np.stack(list(self.known.values())))


def exit_scores(model: LayerwiseReranker, query_means: torch.Tensor, passage_means: torch.Tensor,
                calibrated: bool = True) -> torch.Tensor:
    """``[E, ...]`` scores of every exit from cached means: ``query_means [..., E, H]`` against ``passage_means``
    of the same leading shape (broadcast), exactly as the pair forward scores them."""
    rows = []
    for index, exit_layer in enumerate(model.config.exits):
        features = model.cosine_features(model.exit_query(query_means, index), passage_means[..., index, :],
                                         exit_layer)
        raw, compensated = model.head_scores(features, exit_layer)
        rows.append(compensated if calibrated else raw)
    return torch.stack(rows)
