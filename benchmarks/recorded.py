"""Exit scores recorded earlier, as per-exit TREC runs, turned back into a :class:`~matryoshka.plugin.tuning.Recorded`.

A full-depth pass over BM25 top-100 of a test split costs 20-40 minutes on a 2-core CPU, so the benchmark can replay
the cascade from per-exit runs written by ``benchmarks/record_exits.py`` (the ONNX stage chain) or by
``python -m matryoshka.training.evaluate`` (PyTorch, any device). A folder qualifies for collection ``NAME`` and tag
``TAG`` when it holds ``NAME-bm25.trec`` (the candidates and their first-stage scores) and ``NAME-TAG-exit<L>.trec``
for every exit ``L`` of the model; every exit run must score exactly the BM25 candidates of every query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matryoshka.errors import DataFormatError
from matryoshka.io import read_run
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.tuning import Recorded


@dataclass(frozen=True)
class RecordedFiles:
    bm25: Path
    exits: dict[int, Path]
    tag: str

    def describe(self) -> str:
        return f"{self.bm25.parent}/{self.bm25.name.removesuffix('-bm25.trec')}-{self.tag}-exit*.trec"


def find_recorded(name: str, folders: Sequence[Path], tags: Sequence[str], exits: Sequence[int]
                  ) -> RecordedFiles | None:
    """The first (folder, tag), in the given orders, with a BM25 run and a run for every exit; None if none has."""
    for folder in folders:
        bm25 = folder / f"{name}-bm25.trec"
        if not bm25.is_file():
            continue
        for tag in tags:
            paths = {e: folder / f"{name}-{tag}-exit{e}.trec" for e in exits}
            if all(p.is_file() for p in paths.values()):
                return RecordedFiles(bm25, paths, tag)
    return None


def load_recorded(files: RecordedFiles, chain: Cascade) -> Recorded:
    """The recorded exit scores of ``files`` over its BM25 candidates (in BM25 order), for ``chain``'s model."""
    bm25 = read_run(files.bm25)
    qids: list[str] = []
    docids: list[str] = []
    groups: list[int] = []
    first: list[float] = []
    for g, (qid, entries) in enumerate(bm25.queries.items()):
        for entry in entries:
            qids.append(qid)
            docids.append(entry.docid)
            groups.append(g)
            first.append(entry.score)
    scores = np.empty((len(docids), len(chain.exits)))
    for k, exit_layer in enumerate(chain.exits):
        path = files.exits[exit_layer]
        run = {qid: {e.docid: e.score for e in entries} for qid, entries in read_run(path).queries.items()}
        for i, (qid, docid) in enumerate(zip(qids, docids, strict=True)):
            value = run.get(qid, {}).get(docid)
            if value is None:
                raise DataFormatError(path, None, f"query {qid} has no score for BM25 candidate {docid} of "
                                      f"{files.bm25}", "record the exit scores on the same BM25 run")
            scores[i, k] = value
        extra = sum(len(v) for v in run.values()) - len(docids)
        if extra:
            raise DataFormatError(path, None, f"{extra} scored documents are not BM25 candidates of {files.bm25}",
                                  "record the exit scores on the same BM25 run")
    residual = tuple(chain.manifest.exit_calibration(e).residual_std for e in chain.exits)
    return Recorded(qids, docids, np.asarray(groups, dtype=np.int64), scores, tuple(chain.exits), residual,
                    chain.cumulative_cost, np.asarray(first, dtype=np.float64))
