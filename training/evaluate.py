"""Rerank a BM25 run with trained rerankers (torch) and report nDCG@10 per exit, with Pyserini's trec_eval.

For each model, every exit's (compensated) score reranks the top ``depth`` hits of each query; one TREC run per
exit is written (``<output_dir>/<dataset>-<model>-exit<l>.trec``, :func:`matryoshka.io.write_run`) and scored
with :func:`matryoshka.pipeline.trec_eval`. Optional zero-shot baselines on the same hits: ``cosine`` (the
bi-encoder alone) and ``fusion`` (BM25 + cosine, min-max per query, :mod:`matryoshka.training.teacher`).

``--no_trec_eval`` only writes the runs (a machine without Java, e.g. a GPU box); ``--runs_only_from DIR`` later
scores runs written that way, without the model.

    python -m matryoshka.training.evaluate --model_dirs runs/minilm-distill --data_dir data/scifact --split test
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matryoshka.errors import MatryoshkaError, MissingInputError, OptionError, cli_main
from matryoshka.io import atomic_write, load_beir, read_run, write_run, write_trec_qrels
from matryoshka.io.beir import BeirDataset

RunScores = dict[str, dict[str, float]]
MEASURES = ("ndcg_cut.10", "recall.100")


@dataclass
class EvaluateArguments:
    data_dir: str = field(metadata={"help": "BEIR folder to evaluate on"})
    output_dir: str = field(metadata={"help": "folder for the per-exit runs and results.json"})
    model_dirs: list[str] = field(default_factory=list, metadata={"help": "saved reranker folders"})
    split: str = field(default="test", metadata={"help": "qrels split"})
    run: str | None = field(default=None, metadata={"help": "first-stage run (default: Pyserini BM25, computed)"})
    depth: int = field(default=100, metadata={"help": "hits reranked per query"})
    batch_size: int = field(default=128, metadata={"help": "pairs per forward pass"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the reranker"})
    baselines: list[str] = field(default_factory=list, metadata={"help": "zero-shot rows: cosine and/or fusion"})
    encoder: str | None = field(default=None, metadata={"help": "bi-encoder folder for the baselines"})
    work_dir: str = field(default="runs/work", metadata={"help": "Pyserini index/topics/qrels folder"})
    no_trec_eval: bool = field(default=False, metadata={"help": "only write the runs (no Java needed)"})
    runs_only_from: str | None = field(default=None, metadata={"help": "score the runs in this folder instead"})
    name: str = field(default="", metadata={"help": "dataset name in file names (default: data folder name)"})

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise OptionError("depth", self.depth, ">= 1")
        unknown = sorted(set(self.baselines) - {"cosine", "fusion"})
        if unknown:
            raise OptionError("baselines", self.baselines, "a subset of ['cosine', 'fusion']")
        if self.baselines and not self.encoder:
            raise OptionError("encoder", self.encoder, "a bi-encoder folder when baselines are asked for")
        if not self.model_dirs and not self.baselines and not self.runs_only_from:
            raise OptionError("model_dirs", self.model_dirs, "at least one model, baseline or --runs_only_from")


def top_hits(run_path: str | os.PathLike[str], depth: int, qids: Sequence[str]) -> dict[str, list[tuple[str, float]]]:
    """The first ``depth`` hits (docid, first-stage score) of each judged query in the run, in rank order."""
    run = read_run(run_path).queries
    out = {}
    for qid in qids:
        entries = sorted(run.get(qid, []), key=lambda e: (e.rank, e.docid))[:depth]
        if entries:
            out[qid] = [(e.docid, e.score) for e in entries]
    if not out:
        raise MatryoshkaError(f"{run_path}: the run has none of the {len(qids)} judged queries: expected a run "
                              "over this split's topics")
    return out


def rerank_scores(model: object, dataset: BeirDataset, hits: Mapping[str, Sequence[tuple[str, float]]],
                  batch_size: int, device: str, bf16: bool = False) -> dict[int, RunScores]:
    """Score every (query, hit) pair with the reranker; ``{exit: {qid: {docid: score}}}`` (compensated)."""
    import torch
    from tqdm.auto import tqdm

    from matryoshka.layout import prepare_tokenizer

    pairs = [(qid, docid) for qid, docs in hits.items() for docid, _ in docs]
    missing = [d for _, d in pairs if d not in dataset.corpus]
    if missing:
        raise MatryoshkaError(f"run document {missing[0]!r} is not in {dataset.root}/corpus.jsonl: expected a run "
                              "over this corpus")
    pairs.sort(key=lambda p: len(dataset.corpus[p[1]].contents))
    tokenizer = prepare_tokenizer(model.tokenizer)
    exits = tuple(model.config.exits)
    out: dict[int, RunScores] = {e: {qid: {} for qid in hits} for e in exits}
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, len(pairs), batch_size), desc="reranking", leave=False):
            chunk = pairs[start: start + batch_size]
            encoded = model.layout.encode(tokenizer, [dataset.queries[q] for q, _ in chunk],
                                          [dataset.corpus[d].contents for _, d in chunk])
            inputs = {k: torch.from_numpy(v).to(device) for k, v in encoded.items()}
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                scores = model(**inputs, compression=model.config.inference_compression).calibrated.float().cpu()
            for row, (qid, docid) in enumerate(chunk):
                for index, exit_layer in enumerate(exits):
                    out[exit_layer][qid][docid] = float(scores[index, row])
    return out


def baseline_scores(kind: str, encoder_dir: str, dataset: BeirDataset, hits: Mapping[str, Sequence[tuple[str, float]]],
                    device: str, cache_dir: str) -> RunScores:
    from matryoshka.training.teacher import BiEncoder, cosine_scores, fuse

    encoder = BiEncoder(encoder_dir, device=device, cache_dir=cache_dir)
    pairs = {qid: [d for d, _ in docs] for qid, docs in hits.items()}
    passages = {d: dataset.corpus[d].contents for docs in pairs.values() for d in docs}
    cos = cosine_scores(encoder, dataset.queries, pairs, passages, Path(dataset.root).name)
    if kind == "cosine":
        return cos
    return {qid: fuse(dict(docs), cos[qid], pairs[qid], 0.5) for qid, docs in hits.items()}


def format_table(title: str, rows: Sequence[tuple[str, Mapping[str, float]]], reference: str = "BM25") -> str:
    base = dict(rows).get(reference, {}).get("ndcg_cut_10")
    lines = [title, "", "| run | nDCG@10 | vs BM25 | R@100 |", "|---|---|---|---|"]
    for name, metrics in rows:
        delta = f"{metrics['ndcg_cut_10'] - base:+.4f}" if base is not None else "n/a"
        lines.append(f"| {name} | {metrics['ndcg_cut_10']:.4f} | {delta} | {metrics['recall_100']:.4f} |")
    return "\n".join(lines)


def evaluate(args: EvaluateArguments) -> list[tuple[str, dict[str, float]]]:
    import torch

    name = args.name or Path(args.data_dir).name
    out_dir = Path(args.output_dir)
    dataset = load_beir(args.data_dir, args.split)
    qrels_path = out_dir / f"{name}-{args.split}.qrels"
    runs: list[tuple[str, Path]] = []
    if args.runs_only_from:
        source = Path(args.runs_only_from)
        manifest = source / f"{name}-runs.json"
        if not manifest.is_file():
            raise MissingInputError(manifest, "list of runs", "write the runs with --no_trec_eval first")
        runs = [(row, source / file) for row, file in json.loads(manifest.read_text(encoding="utf-8"))]
    else:
        run_path = Path(args.run) if args.run else _bm25_run(args, name)
        hits = top_hits(run_path, args.depth, list(dataset.qrels))
        first = out_dir / f"{name}-bm25.trec"
        write_run(first, {q: dict(docs) for q, docs in hits.items()}, "bm25")
        runs.append(("BM25", first))
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        for model_dir in args.model_dirs:
            runs += _model_runs(model_dir, dataset, hits, args, name, device)
        for kind in args.baselines:
            scores = baseline_scores(kind, args.encoder, dataset, hits, device, str(Path(args.work_dir) / "embeddings"))
            path = out_dir / f"{name}-{kind}.trec"
            write_run(path, scores, kind)
            runs.append((f"{kind} (zero-shot)", path))
        with atomic_write(out_dir / f"{name}-runs.json") as handle:
            json.dump([(row, path.name) for row, path in runs], handle, indent=1)
    if args.no_trec_eval:
        return []
    from matryoshka.pipeline import trec_eval

    write_trec_qrels(qrels_path, dataset.qrels)
    rows = [(row, trec_eval(qrels_path, path, MEASURES)) for row, path in runs]
    with atomic_write(out_dir / f"{name}-results.json") as handle:
        json.dump({row: metrics for row, metrics in rows}, handle, indent=2)
    return rows


def _bm25_run(args: EvaluateArguments, name: str) -> Path:
    from matryoshka.pipeline import bm25_search, prepare_beir

    prepared = prepare_beir(args.data_dir, args.split, args.work_dir)
    path = Path(args.work_dir) / f"bm25-{name}-{args.split}-{args.depth}.txt"
    if not path.is_file():
        bm25_search(prepared.index_dir, prepared.topics, path, hits=args.depth)
    return path


def _model_runs(model_dir: str, dataset: BeirDataset, hits: Mapping[str, Sequence[tuple[str, float]]],
                args: EvaluateArguments, name: str, device: str) -> list[tuple[str, Path]]:
    from matryoshka.training.modeling import LayerwiseReranker

    model = LayerwiseReranker.load(model_dir, device=device)
    label = Path(model_dir).name
    scores = rerank_scores(model, dataset, hits, args.batch_size, device, args.bf16)
    out = []
    for exit_layer, run in scores.items():
        path = Path(args.output_dir) / f"{name}-{label}-exit{exit_layer}.trec"
        write_run(path, run, f"{label}-exit{exit_layer}")
        out.append((f"{label} exit {exit_layer}", path))
    return out


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from matryoshka.training.arguments import parse_arguments

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = parse_arguments((EvaluateArguments,), argv, prog="python -m matryoshka.training.evaluate")
    rows = evaluate(args)
    if rows:
        source = f"runs in {args.runs_only_from}" if args.runs_only_from else f"reranking the top-{args.depth} of " \
            f"{args.run or 'Pyserini BM25'}"
        title = f"{args.name or Path(args.data_dir).name} {args.split}: {source}"
        print("\n" + format_table(title, rows))
    else:
        print(f"runs written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
