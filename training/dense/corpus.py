"""Query-side fine-tuning (``--mode corpus``): fixed document vectors from a Faiss index and graded targets.

In ``corpus`` mode the passage encoder is frozen, so every document's vector is known before training: it is read
from a flat Faiss index folder (``index`` + ``docid``, as ``python -m matryoshka.training.dense.encode`` or
``pyserini.encode --to-faiss`` write it) made with that passage encoder. Each query is then scored against the
whole corpus (an exact softmax over every document, no sampled negatives), with its graded positives as the
target distribution (weight ``2**grade - 1``, so a grade-2 document counts three times a grade-1 one).

An index made with another model, another text format or another length would train the queries towards the
wrong vectors, so :func:`load_passage_index` re-encodes a few of the training set's shortest documents (short
enough that no truncation length matters) with the frozen passage encoder and refuses the index when they differ.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from matryoshka.errors import DataFormatError, MissingInputError
from matryoshka.training.data import TrainingSet

logger = logging.getLogger(__name__)
#: documents re-encoded to check an index against the frozen passage encoder, and the tolerance of that check
CHECK_DOCUMENTS = 4
CHECK_ATOL = 2e-3


def read_faiss_vectors(folder: str | Path) -> tuple[list[str], Tensor]:
    """(docids, ``[N, H]`` float32 tensor) of a flat Faiss index folder (``index`` + ``docid``)."""
    import faiss

    folder = Path(folder)
    if not (folder / "index").is_file() or not (folder / "docid").is_file():
        raise MissingInputError(folder / "index", "Faiss index folder",
                                "expected the index + docid files of python -m matryoshka.training.dense.encode")
    index = faiss.read_index(str(folder / "index"))
    docids = (folder / "docid").read_text(encoding="utf-8").split()
    if len(docids) != index.ntotal:
        raise DataFormatError(folder / "docid", None, f"{len(docids)} docids for {index.ntotal} vectors",
                              "expected one docid per vector: re-encode the corpus")
    if len(set(docids)) != len(docids):
        raise DataFormatError(folder / "docid", None, "duplicate docids", "expected each document once")
    try:
        vectors = index.reconstruct_n(0, index.ntotal)
    except RuntimeError as err:
        raise DataFormatError(folder / "index", None, f"vectors cannot be read back ({err})",
                              "expected a flat (exact) Faiss index") from None
    return docids, torch.from_numpy(vectors).float()


@dataclass
class PassageIndex:
    """The fixed document vectors of one training set: ``vectors[row[docid]]``."""

    folder: Path
    docids: list[str]
    row: dict[str, int]
    vectors: Tensor

    def targets(self, positives: Sequence[Mapping[str, int]]) -> Tensor:
        """``[n, N]`` target distributions: each query's positives weighted ``2**grade - 1``, summing to 1."""
        out = torch.zeros(len(positives), len(self.docids))
        for i, graded in enumerate(positives):
            for docid, grade in graded.items():
                out[i, self.row[docid]] = float(2 ** int(grade) - 1)
        return out / out.sum(dim=1, keepdim=True)


def load_passage_index(folder: str | Path, training_set: TrainingSet, passage_model) -> PassageIndex:
    """The index of ``folder`` for ``training_set``, checked: every positive is in it, its dimension is the
    model's, and it holds the frozen ``passage_model``'s vectors (see the module docstring)."""
    folder = Path(folder)
    docids, vectors = read_faiss_vectors(folder)
    row = {d: i for i, d in enumerate(docids)}
    missing = sorted({d for q in training_set.queries for d in q.positives if d not in row})
    if missing:
        raise DataFormatError(folder / "docid", None, f"{len(missing)} positives of training set "
                              f"{training_set.root} are not in the index (e.g. {missing[:3]})",
                              "encode the training set's whole corpus into the index")
    hidden = passage_model.config.hidden_size
    if hidden and vectors.shape[1] != hidden:
        raise DataFormatError(folder / "index", None, f"vectors of dimension {vectors.shape[1]}",
                              f"expected {hidden}, the passage encoder's hidden size")
    sample = sorted((d for d in training_set.corpus if d in row),
                    key=lambda d: (len(training_set.corpus[d].contents), d))[:CHECK_DOCUMENTS]
    if sample:
        fresh = passage_model.encode_texts([training_set.corpus[d].contents for d in sample], "passage")
        stored = vectors[[row[d] for d in sample]]
        gap = float((fresh - stored).abs().max())
        if gap > CHECK_ATOL:
            raise DataFormatError(folder / "index", None, f"the vectors of documents {sample} differ from the "
                                  f"passage encoder's by up to {gap:.4f} (tolerance {CHECK_ATOL})",
                                  "encode the corpus with the model training starts from (the frozen passage "
                                  "encoder), its pooling, normalisation and passage prefix")
    logger.info("passage index %s: %d documents of dimension %d", folder, len(docids), vectors.shape[1])
    return PassageIndex(folder, docids, row, vectors)
