"""The first stages of ``benchmarks/dense_pipeline.py`` (BM25, dense, hybrid) as Pyserini command lines, with the
command runner, the dense indexes and the small file helpers they share."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matryoshka.io import atomic_write
from matryoshka.training.dense.config import DenseConfig

REPO = Path(__file__).resolve().parent.parent
logger = logging.getLogger("dense_pipeline")


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run a command, its output appended to ``log``; stop the benchmark with the log's tail on failure."""
    logger.info("$ %s", shlex.join(cmd))
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {shlex.join(cmd)}\n")
        handle.flush()
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, **(env or {})}).returncode
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()[-15:])
        raise SystemExit(f"command failed ({code}): {shlex.join(cmd)}\n{tail}")
    logger.info("  done in %.0f s", time.time() - start)


def digest(path: Path, n: int = 8) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:n]


def dataset_dir(name: str) -> Path:
    from benchmarks.bench_worker import require_dataset

    return require_dataset(name)


@dataclass(frozen=True)
class DenseModel:
    path: Path
    plain: bool  # a plain sentence-transformers folder (mean pooling, L2): encoded with --pooling mean --normalize
    tag: str  # file-name tag of its index and runs


@dataclass(frozen=True)
class FirstStage:
    """One first-stage retriever of the table, as the Pyserini CLI that runs it."""

    label: str
    stem: str  # run file stem: bm25, dense-TAG, hybrid-TAG-ALPHA
    module: str  # pyserini.search.lucene / .faiss / .hybrid
    flags: tuple[str, ...] = ()  # query-encoder flags (faiss, hybrid)
    index: Path | None = None  # Faiss index (faiss, hybrid)
    alpha: float | None = None  # hybrid: alpha * BM25 + dense

    @classmethod
    def hybrid(cls, label: str, model: DenseModel, flags: tuple[str, ...], index: Path, alpha: float) -> FirstStage:
        """Pyserini's hybrid of BM25 and ``model`` (its run stem is shared by alpha and cascade tuning)."""
        return cls(f"hybrid BM25 + dense {label}", f"hybrid-{model.tag}-{alpha}", "pyserini.search.hybrid", flags,
                   index, alpha)


@dataclass(frozen=True)
class Selection:
    """The ``--select-on`` split: dataset name as given, split, BEIR folder, Pyserini files."""

    name: str
    split: str
    data: Path
    prepared: Any

    @property
    def tag(self) -> str:  # folder name of its runs
        return f"{self.data.name}-{self.split}"


@dataclass
class Stages:
    """Runs the Pyserini CLIs of the first stages; every output is cached in ``args.work``."""

    args: argparse.Namespace
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    selected: Selection | None = None  # the --select-on split, prepared once

    def py(self, *cmd: object) -> None:
        run([sys.executable, *map(str, cmd)], self.log, self.env)

    def search(self, module: str, output: Path, *args: object) -> Path:
        """A Pyserini search CLI writing ``output``; the file appears complete or not at all."""
        if output.is_file():
            return output
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_name(f".{output.name}.partial")
        try:
            self.py("-m", module, *(partial if a is output else a for a in args))
            partial.replace(output)
        finally:
            partial.unlink(missing_ok=True)
        return output

    # ------------------------------------------------------------------------------------------- dense models
    def encode(self, model: DenseModel, name: str) -> tuple[Path, tuple[str, ...]]:
        """``model``'s Faiss index of dataset ``name`` and its search flags, encoded when missing. A query-side
        fine-tuned model reuses the off-the-shelf index (``encode --reuse_index``, which checks that its frozen
        passage encoder has the base model's weights): the vectors would be the same."""
        data = dataset_dir(name)
        out = self.args.work / "faiss" / f"{data.name}-{model.tag}"
        if not (out / "dense_index.json").is_file():
            if model.plain:
                extra = ["--pooling", "mean", "--normalize"]
            elif DenseConfig.load(model.path).passage_encoder:
                extra = ["--reuse_index", self.base_index(name)]
            else:
                extra = []
            self.py("-m", "matryoshka.training.dense.encode", "--model", model.path, *extra, "--corpus", data,
                    "--output", out, "--max_length", self.args.max_length, "--batch_size", 32, "--skip_empty",
                    "--overwrite")
        return out, tuple(json.loads((out / "dense_index.json").read_text(encoding="utf-8"))["search_flags"])

    def base_index(self, name: str) -> Path:
        """The off-the-shelf model's Faiss index of dataset ``name`` (built when missing)."""
        return self.encode(DenseModel(self.args.base_model, True, "off-the-shelf"), name)[0]

    def first_stages(self, name: str, models: dict[str, DenseModel], alphas: dict[str, float]) -> list[FirstStage]:
        """BM25, then per dense model: dense alone and its hybrid with BM25 (``alphas[tag]``), on dataset ``name``."""
        stages = [FirstStage("BM25", "bm25", "pyserini.search.lucene")]
        for label, model in models.items():
            index, flags = self.encode(model, name)
            stages.append(FirstStage(f"dense {label}", f"dense-{model.tag}", "pyserini.search.faiss", flags, index))
            if model.tag in alphas:
                stages.append(FirstStage.hybrid(label, model, flags, index, alphas[model.tag]))
        return stages

    def retrieve(self, stage: FirstStage, prepared: Any, output: Path, rerank: Sequence[object] = ()) -> Path:
        """Run ``stage``'s Pyserini CLI on ``prepared``'s topics (with the reranker flags ``rerank``, if any)."""
        a = self.args
        if stage.module == "pyserini.search.hybrid":
            return self.search(stage.module, output, "dense", "--index", stage.index, *stage.flags, "sparse",
                               "--index", prepared.index_dir, "fusion", "--alpha", stage.alpha, "--hits", a.hits,
                               "run", "--topics", prepared.topics, "--output", output, "--hits", a.hits,
                               "--threads", a.threads, *rerank)
        index = stage.index if stage.module == "pyserini.search.faiss" else prepared.index_dir
        extra = ["--bm25"] if stage.module == "pyserini.search.lucene" else list(stage.flags)
        docs = ["--matryoshka.index", prepared.index_dir] if rerank and stage.module == "pyserini.search.faiss" else []
        return self.search(stage.module, output, "--index", index, "--topics", prepared.topics, *extra, "--hits",
                           a.hits, "--threads", a.threads, "--batch-size", 64, "--output", output, *rerank, *docs)

    def selection(self) -> Selection:
        """The ``--select-on`` split, prepared for Pyserini (once)."""
        from matryoshka.pipeline import prepare_beir

        if self.selected is None:
            name, split = self.args.select_on.split(":")
            data = dataset_dir(name)
            self.selected = Selection(name, split, data, prepare_beir(data, split, self.args.work / "pyserini",
                                                                      threads=self.args.threads))
        return self.selected


def atomic_json(path: Path, data: object) -> None:
    with atomic_write(path) as handle:
        handle.write(json.dumps(data, indent=2) + "\n")


def truncate_run(lines: Sequence[str], depth: int) -> list[str]:
    """The first ``depth`` lines of each query of a TREC run (its order kept): the candidates the cascade reranks."""
    seen: dict[str, int] = {}
    kept = []
    for line in lines:
        if not line.strip():
            continue
        qid = line.split(maxsplit=1)[0]
        seen[qid] = seen.get(qid, 0) + 1
        if seen[qid] <= depth:
            kept.append(line)
    return kept


def evaluate(qrels: Path, run_file: Path) -> dict[str, float]:
    from matryoshka.pipeline import trec_eval

    m = trec_eval(qrels, run_file, measures=("ndcg_cut.10", "recall.100"))
    return {"nDCG@10": m["ndcg_cut_10"], "R@100": m["recall_100"]}
