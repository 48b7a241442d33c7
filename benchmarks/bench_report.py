"""The parent side of ``benchmarks/rerank_benchmark.py``: data, quality tables, timing table, plot, BENCHMARKS.md."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matryoshka.io import read_run, write_trec_qrels
from matryoshka.io.atomic import atomic_write
from matryoshka.pipeline import bm25_search, prepare_beir, trec_eval
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.manifest import load_manifest
from matryoshka.plugin.policies import POLICIES, make_policy
from matryoshka.plugin.tuning import record_run, sweep

logger = logging.getLogger("benchmark")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    name: str
    metrics: dict[str, float]
    mean_layers: float | None = None
    cost: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def parse(argv: list[str]) -> argparse.Namespace:
    from benchmarks.bench_worker import add_data_root_argument

    p = argparse.ArgumentParser(prog="python benchmarks/rerank_benchmark.py", description=__doc__)
    p.add_argument("--model", type=Path, default=REPO / "plugin" / "default_model", help="exported model folder")
    p.add_argument("--checkpoint", type=Path, default=None, help="training checkpoint for (a) PyTorch fp32")
    p.add_argument("--full-graph-model", type=Path, default=None,
                   help="exported folder of the same checkpoint with the full-depth graphs for (b), when --model "
                   "ships stages only (default: --model)")
    p.add_argument("--datasets", nargs="+", default=["scifact", "nfcorpus", "cranfield", "cisi", "med", "adi"])
    p.add_argument("--timed-datasets", nargs="+", default=["scifact", "nfcorpus"],
                   help="datasets that also get the side-by-side timed table")
    p.add_argument("--hits", type=int, default=100)
    p.add_argument("--timing-queries", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "work")
    add_data_root_argument(p)
    p.add_argument("--results", type=Path, default=REPO / "runs" / "benchmark")
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "ndcg_vs_cost.png")
    p.add_argument("--recorded", type=Path, nargs="+", default=[],
                   help="folders of recorded per-exit runs (benchmarks/record_exits.py, matryoshka.training.evaluate) "
                   "to replay instead of a full-depth pass over all queries (see benchmarks/recorded.py)")
    p.add_argument("--recorded-tags", nargs="+", default=["int8", "fp32"],
                   help="run tags to look for, in order of preference (NAME-TAG-exit<L>.trec)")
    p.add_argument("--write", type=Path, default=None, help="write the report into this markdown file (BENCHMARKS.md)")
    return p.parse_args(argv)


def fmt(row: Row) -> str:
    m = row.metrics
    layers = f"{row.mean_layers:.2f}" if row.mean_layers is not None else "—"
    cost = f"{row.cost:.1%}" if row.cost is not None else "—"
    return (f"| {row.name} | {m['ndcg_cut_10']:.4f} | {m['recip_rank']:.4f} | {m['recall_100']:.4f} | {layers} | "
            f"{cost} |")


def evaluate(run: dict[str, dict[str, float]], qrels: Path, folder: Path, name: str) -> dict[str, float]:
    from matryoshka.io import write_run

    path = folder / f"{name}.run"
    write_run(path, run, tag="matryoshka")
    return trec_eval(qrels, path)


def quality(name: str, data: Path, args: argparse.Namespace, out: Path) -> tuple[list[Row], dict, dict]:
    """BM25, every fixed exit (plain and fused with the first stage), the tuned default, and the sweep curve."""
    from benchmarks.recorded import find_recorded, load_recorded

    prepared = prepare_beir(data, "test", args.work)
    chain = Cascade(args.model, precision="int8" if "int8" in _precisions(args.model) else None,
                    threads=args.threads, batch_size=args.batch_size)
    exits = list(chain.exits)
    files = find_recorded(name, args.recorded, args.recorded_tags, exits) if args.recorded else None
    if files is not None:
        bm25_path = files.bm25
    else:
        bm25_path = bm25_search(prepared.index_dir, prepared.topics, args.work / f"bm25-{name}-test-{args.hits}.txt",
                                hits=args.hits)
    bm25 = read_run(bm25_path)
    rows = [Row("BM25 (Pyserini)", trec_eval(prepared.qrels, bm25_path), 0.0, 0.0)]
    candidates = {qid: [e.docid for e in entries] for qid, entries in bm25.queries.items()}
    texts = {d: prepared.dataset.corpus[d].contents for docs in candidates.values() for d in docs}
    start = time.perf_counter()
    if files is not None:
        recorded = load_recorded(files, chain)
        source = f"recorded exit scores `{files.describe()}`"
    else:
        recorded = record_run(chain, bm25.queries, prepared.dataset.queries, texts)
        source = f"ONNX {chain.precision} stage chain, recorded by this run"
    logger.info("%s: %d pairs from %s in %.0f s", name, len(recorded.docids), source, time.perf_counter() - start)
    default = chain.manifest.policy
    weight = default.first_stage_weight
    for w in dict.fromkeys((0.0, weight)):
        for e in exits:
            final, stage = recorded.replay(make_policy("fixed", None, exits, 1.0, exit_layer=e), w)
            label = f"(c) fixed exit {e}" + (" = full depth" if e == exits[-1] else "")
            label += f" + first stage (w={w:g})" if w else ""
            rows.append(Row(label, evaluate(recorded.to_run(final), prepared.qrels, out, f"{name}-fixed{e}-w{w:g}"),
                            *recorded.layers_and_cost(stage)))
    final, stage = recorded.replay(make_policy(default.name, default.threshold, exits, default.threshold), weight,
                                   default.depth)
    fusion = f" + first stage (w={weight:g})" if weight else ""
    fusion += f", depth {default.depth}" if default.depth else ""
    rows.append(Row(f"(d) cascade {default.name} @ {default.threshold:g}{fusion} (tuned default)",
                    evaluate(recorded.to_run(final), prepared.qrels, out, f"{name}-default"),
                    *recorded.layers_and_cost(stage)))
    depths = (None, default.depth) if default.depth else (None,)  # the sweep also at the tuned rerank depth
    full, points = sweep(recorded, prepared.dataset.qrels, first_stage_weight=weight, depths=depths)
    curve = {"full": full, "bm25": rows[0].metrics["ndcg_cut_10"], "points": [p.as_dict() for p in points],
             "default": {"ndcg10": rows[-1].metrics["ndcg_cut_10"], "cost": rows[-1].cost},
             "first_stage_weight": weight, "source": source}
    context = {"prepared": prepared, "candidates": candidates, "texts": texts, "source": source,
               "first_stage": {q: {e.docid: e.score for e in entries} for q, entries in bm25.queries.items()}}
    return rows, curve, context


def check_same_model(model: Path, other: Path) -> None:
    """(b) must be the very model of the cascade: same exits, tokenizer and int8 stage files (or no int8)."""
    a, b = load_manifest(model, verify=False), load_manifest(other, verify=False)
    same = a.exits == b.exits and a.tokenizer.sha256 == b.tokenizer.sha256
    for precision in set(a.precisions) & set(b.precisions):
        same = same and all(x.files[precision].sha256 == y.files[precision].sha256
                            for x, y in zip(a.stages, b.stages, strict=True))
    if not same:
        raise SystemExit(f"error: {other} is not an export of the same model as {model} (exits, tokenizer or stage "
                         "files differ): export the same checkpoint with the same --exits")


def _precisions(model: Path) -> list[str]:
    return list(load_manifest(model, verify=False).precisions)


def timed(name: str, context: dict, args: argparse.Namespace, out: Path) -> list[str]:
    from benchmarks.bench_worker import run_config

    prepared, candidates, texts = context["prepared"], context["candidates"], context["texts"]
    qids = [q for q in candidates if q in prepared.dataset.qrels][: args.timing_queries]
    cache = out / f"{name}-timing-cache.json"
    first = context["first_stage"]
    cache.write_text(json.dumps({"queries": {q: {"text": prepared.dataset.queries[q], "docids": candidates[q],
                                                 "passages": [texts[d] for d in candidates[q]],
                                                 "first_stage": [first[q][d] for d in candidates[q]]} for q in qids}}))
    qrels = out / f"{name}-timing.qrels"
    write_trec_qrels(qrels, {q: prepared.dataset.qrels[q] for q in qids})
    manifest = load_manifest(args.model, verify=False)
    exits = manifest.exits
    full_model = args.full_graph_model or args.model
    check_same_model(args.model, full_model)
    full_precisions = _precisions(full_model) if load_manifest(full_model, verify=False).full_graph else []
    configs = (["torch-fp32"] if args.checkpoint else []) + [f"onnx-full-{p}" for p in ("fp32", "int8")
                                                             if p in full_precisions]
    configs += [f"fixed:{e}" for e in exits] + ["default"]
    labels = {"torch-fp32": "(a) PyTorch fp32 full depth", "onnx-full-fp32": "(b) ONNX full graph fp32",
              "onnx-full-int8": "(b) ONNX full graph int8", "default": "(d) cascade, tuned default"}
    results = {}
    for config in configs:
        results[config] = run_config(config, args, cache, out)
    n_cand = sum(len(candidates[q]) for q in qids)
    base_a = sum(results["torch-fp32"]["seconds"]) if "torch-fp32" in results else None
    base_b = sum(results["onnx-full-int8"]["seconds"]) if "onnx-full-int8" in results else None
    lines = [f"\n**{name}**, first {len(qids)} test queries, {n_cand} candidates, {args.threads} threads, batch "
             f"{args.batch_size}\n",
             "| configuration | nDCG@10 | mean layers | cand/s | ms/query p50 | p95 | peak RSS MiB | x vs (a) | "
             "x vs (b int8) |", "|---|---|---|---|---|---|---|---|---|"]
    tuned = manifest.policy  # the worker ran the plugin itself: fused and depth-cut there, timed with it
    labels["default"] += f" + first stage (w={tuned.first_stage_weight:g})" if tuned.first_stage_weight else ""
    labels["default"] += f", depth {tuned.depth}" if tuned.depth else ""
    for config, res in results.items():
        metrics = evaluate(res["run"], qrels, out, f"{name}-timed-{config.replace(':', '_')}")
        total = sum(res["seconds"])
        ms = np.asarray(res["seconds"]) * 1000
        label = labels.get(config, f"(c) fixed exit {config.partition(':')[2]} (int8 chain)")
        speed_a = f"{base_a / total:.2f}" if base_a else "—"
        speed_b = f"{base_b / total:.2f}" if base_b else "—"
        lines.append(f"| {label} | {metrics['ndcg_cut_10']:.4f} | {np.mean(res['layers']):.2f} | {n_cand / total:.1f} "
                     f"| {np.percentile(ms, 50):.0f} | {np.percentile(ms, 95):.0f} | {res['peak_mib']:.0f} | "
                     f"{speed_a} | {speed_b} |")
    return lines


def plot(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.8), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items(), strict=True):
        points = curve["points"]
        depths = sorted({p.get("depth") for p in points}, key=lambda d: (d is not None, d or 0))
        for depth in depths:
            for policy, marker in ((name, cls.marker) for name, cls in POLICIES.items() if cls.sweep):
                pts = sorted((p["relative_cost"], p["ndcg10"]) for p in points
                             if p["policy"] == policy and p.get("depth") == depth)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker + ("-" if depth is None else "--"), ms=3, lw=1,
                            label=f"cascade: {policy}" + (f", depth {depth}" if depth else ""))
        fixed = [(p["relative_cost"], p["ndcg10"]) for p in points if p["policy"] == "fixed"]
        ax.plot(*zip(*fixed, strict=True), "kD", ms=5, label="fixed exits")
        ax.axhline(curve["bm25"], color="grey", ls=":", label="BM25")
        ax.axhline(curve["full"] * 0.99, color="red", ls="--", lw=0.8, label="99% of full depth")
        ax.plot([curve["default"]["cost"]], [curve["default"]["ndcg10"]], "r*", ms=12, label="tuned default")
        ax.set_title(name)
        ax.set_xlabel("layer-FLOPs (share of full depth)")
        ax.set_ylabel("nDCG@10")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)


def frontier(points: list[dict], full: float) -> list[str]:
    """Markdown rows of the sweep's cost/quality frontier: the points no cheaper point matches in nDCG@10."""
    rows, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["relative_cost"], -p["ndcg10"])):
        if p["ndcg10"] > best + 1e-12:
            best = p["ndcg10"]
            threshold = "—" if p["policy"] == "fixed" else f"{p['threshold']:g}"
            what = f"fixed exit {p['mean_layers']:g}" if p["policy"] == "fixed" else p["policy"]
            rows.append(f"| {what} | {threshold} | {p.get('depth') or 'all'} | {p['ndcg10']:.4f} | "
                        f"{p['ndcg10'] / full:.1%} | {p['mean_layers']:.2f} | {p['relative_cost']:.1%} |")
    return rows


def run_benchmark(argv: list[str]) -> int:
    from benchmarks.bench_worker import DATA_ROOTS, dataset_dir, set_data_roots

    args = parse(argv)
    set_data_roots(args.data_root)
    args.results.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="bench-", dir=args.results))
    command = "python benchmarks/rerank_benchmark.py " + shlex.join(argv)
    report = ["# Benchmarks", "", f"Command: `{command}`", "",
              f"Machine: {platform.machine()}, {args.threads} threads, Python {platform.python_version()}; "
              f"model `{args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model}`.", "",
              f"## Effectiveness and compute, all test queries, BM25 top-{args.hits} reranked", "",
              "| run | nDCG@10 | MRR@10 | R@100 | mean layers | layer-FLOPs |", "|---|---|---|---|---|---|"]
    timing, curves, notes, sweeps = [], {}, [], []
    for name in args.datasets:
        data = dataset_dir(name)
        if data is None:
            logger.warning("skipping %s: not found in data/ or under %s (--data-root)", name,
                           ", ".join(str(r) for r in DATA_ROOTS))
            continue
        rows, curve, context = quality(name, data, args, out)
        curves[name] = curve
        report.append(f"| **{name}** | | | | | |")
        report.extend(fmt(r) for r in rows)
        default = rows[-1]
        notes.append(f"- {name}: scores from {curve['source']}; tuned default = "
                     f"{default.metrics['ndcg_cut_10'] / curve['full']:.1%} of full-depth nDCG@10 (same first-stage "
                     f"weight {curve['first_stage_weight']:g}) at {default.cost:.1%} of its layer-FLOPs "
                     f"(targets: >= 99% at <= 40%)")
        sweeps += [f"\n**{name}** (full depth {curve['full']:.4f})\n",
                   "| policy | threshold | depth | nDCG@10 | of full depth | mean layers | layer-FLOPs |",
                   "|---|---|---|---|---|---|---|", *frontier(curve["points"], curve["full"])]
        if name in args.timed_datasets:
            timing.extend(timed(name, context, args, out))
    report += ["", *notes, "", "## Cost/quality frontier of the sweep (replayed; points no cheaper point matches)",
               *sweeps, "", "## Side by side, timed (same candidates, each configuration in a fresh process)",
               *timing]
    plot(curves, args.plot)
    shown = args.plot.relative_to(REPO) if args.plot.is_relative_to(REPO) else args.plot
    report += ["", f"![nDCG@10 against layer-FLOPs]({shown})", ""]
    text = "\n".join(report) + "\n"
    print(text)
    (out / "report.md").write_text(text)
    with atomic_write(out / "curves.json") as handle:
        json.dump(curves, handle, indent=1)
    if args.write:
        with atomic_write(args.write) as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_benchmark(sys.argv[1:]))
