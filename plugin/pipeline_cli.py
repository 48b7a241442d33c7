"""``python -m matryoshka pipeline``: BM25 + the matryoshka cascade on a BEIR split, with Pyserini's own CLIs.

1. index the BEIR corpus (``python -m pyserini.index.lucene``, reused when present);
2. BM25 (``python -m pyserini.search.lucene --bm25``) and BM25 + cascade (the same command with
   ``--reranker matryoshka``), both top-``hits``;
3. evaluate both with ``python -m pyserini.eval.trec_eval``;
4. unless ``--no-compare``: one full-depth pass recording every exit's score, from which the fixed exits and a
   threshold sweep per policy are replayed exactly, giving full depth for reference and the nDCG@10-versus-cost plot.

Prints the effectiveness and cost table; writes the cascade's run file, its statistics and the plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from matryoshka.errors import cli_main
from matryoshka.io.atomic import atomic_write
from matryoshka.pipeline import bm25_search, prepare_beir, run_pyserini, trec_eval
from matryoshka.plugin.bm25_cli import DEFAULT_DATA


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m matryoshka pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR folder (default: the bundled SciFact)")
    p.add_argument("--split", default="test")
    p.add_argument("--model", type=Path, default=None, help="exported model folder (default: the bundled model)")
    p.add_argument("--policy", default=None, help="cascade policy (default: the model's tuned one)")
    p.add_argument("--threshold", type=float, default=None, help="cascade threshold (default: the model's)")
    p.add_argument("--hits", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("runs/work"), help="index, topics and qrels (reused)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/pipeline"),
                   help="where the run files, statistics and plot go")
    p.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip the full-depth pass (fixed exits, sweep, plot)")
    return p


def row(name: str, m: dict[str, float], layers: str = "—", cost: str = "—", speed: str = "—", p50: str = "—",
        p95: str = "—") -> str:
    return (f"| {name} | {m['ndcg_cut_10']:.4f} | {m['recip_rank']:.4f} | {m['recall_100']:.4f} | {layers} | {cost} "
            f"| {speed} | {p50} | {p95} |")


def compare(args: argparse.Namespace, model: Path, prepared, bm25_path: Path, out: Path) -> tuple[list[str], Path]:
    """Full depth, fixed exits and the sweep, replayed from one recorded full-depth pass; writes the plot.

    The fixed exits are shown plain and, when the model's policy has a first-stage weight, fused with the BM25 score
    as the cascade's own scores are; the sweep (and its 99% line) uses that same weight."""
    from matryoshka.io import read_run, write_run
    from matryoshka.io.atomic import atomic_write
    from matryoshka.plugin.cascade import Cascade
    from matryoshka.plugin.policies import make_policy
    from matryoshka.plugin.tuning import record_run, sweep

    run = read_run(bm25_path)
    texts = {e.docid: prepared.dataset.corpus[e.docid].contents for hits in run.queries.values() for e in hits}
    chain = Cascade(model, threads=args.threads)
    weight = chain.manifest.policy.first_stage_weight
    recorded = record_run(chain, run.queries, prepared.dataset.queries, texts)
    lines = []
    for w in dict.fromkeys((0.0, weight)):
        for e in recorded.exits:
            final, stage = recorded.replay(make_policy("fixed", None, recorded.exits, 1.0, exit_layer=e), w)
            path = out / (f"fixed-exit-{e}" + (f"-w{w:g}" if w else "") + ".txt")
            write_run(path, recorded.to_run(final), tag=f"matryoshka-exit{e}")
            label = f"full depth (fixed exit {e})" if e == recorded.exits[-1] else f"fixed exit {e}"
            label += f" + BM25 (w={w:g})" if w else ""
            layers, cost = recorded.layers_and_cost(stage)
            lines.append(row(label, trec_eval(prepared.qrels, path), f"{layers:.2f}", f"{cost:.1%}"))
    full, points = sweep(recorded, prepared.dataset.qrels, first_stage_weight=weight)
    curve = {"full": full, "first_stage_weight": weight, "points": [p.as_dict() for p in points]}
    with atomic_write(out / "sweep.json") as handle:
        json.dump(curve, handle, indent=1)
    return lines, plot(curve, out / "ndcg_vs_cost.png", args.data.name)


def plot(curve: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4))
    for policy, marker in (("candidate", "o-"), ("query", "s-"), ("topk", "^-")):
        pts = sorted((p["relative_cost"], p["ndcg10"]) for p in curve["points"] if p["policy"] == policy)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker, ms=3, lw=1, label=f"cascade: {policy}")
    fixed = [(p["relative_cost"], p["ndcg10"]) for p in curve["points"] if p["policy"] == "fixed"]
    ax.plot(*zip(*fixed, strict=True), "kD", ms=5, label="fixed exits")
    ax.axhline(curve["full"] * 0.99, color="red", ls="--", lw=0.8, label="99% of full depth")
    if curve.get("first_stage_weight"):
        title += f" (scores fused with BM25, w={curve['first_stage_weight']:g})"
    ax.set(title=title, xlabel="layer-FLOPs (share of full depth)", ylabel="nDCG@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def print_table(title: str, lines: Sequence[str]) -> None:
    """Print one results table (markdown) under ``title``, flushed so a long run shows it at once."""
    print(f"\n{title}\n")
    print("| run | nDCG@10 | MRR@10 | R@100 | mean layers | layer-FLOPs | cand/s | ms/query p50 | p95 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines), flush=True)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from matryoshka.plugin.session import check_search_options  # imports onnxruntime: only once we run

    check_search_options(args.hits, args.threads)
    from matryoshka.plugin.api import resolve_model_dir

    model = resolve_model_dir(args.model)
    prepared = prepare_beir(args.data, args.split, args.work, threads=args.threads)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.data.name}-{args.split}"
    bm25_path = bm25_search(prepared.index_dir, prepared.topics, out / f"{name}.bm25.txt", hits=args.hits,
                            threads=args.threads)
    cascade_path, stats_path = out / f"{name}.matryoshka.txt", out / f"{name}.matryoshka.stats.json"
    extra = [f"--matryoshka.{k}={v}" for k, v in (("policy", args.policy), ("threshold", args.threshold))
             if v is not None]
    run_pyserini("pyserini.search.lucene", [
        "--index", prepared.index_dir, "--topics", prepared.topics, "--output", cascade_path, "--bm25",
        "--hits", args.hits, "--threads", args.threads, "--reranker", "matryoshka", "--matryoshka.model", model,
        "--matryoshka.threads", args.threads, "--matryoshka.stats", stats_path, *extra])
    stats = json.loads(stats_path.read_text())
    fused = f", + BM25 w={stats['first_stage_weight']:g}" if stats.get("first_stage_weight") else ""
    fused += f", top {stats['depth']} reranked" if stats.get("depth") else ""
    lines = [row("BM25 (Pyserini)", trec_eval(prepared.qrels, bm25_path), "0", "0%"),
             row(f"BM25 + matryoshka cascade ({stats['policy']}{fused})", trec_eval(prepared.qrels, cascade_path),
                 f"{stats['mean_layers_per_candidate']:.2f}", f"{stats['relative_layer_cost']:.1%}",
                 f"{stats['candidates_per_second']:.1f}", f"{stats['ms_per_query_p50']:.0f}",
                 f"{stats['ms_per_query_p95']:.0f}")]
    plot_path = None
    if args.compare:
        # the headline (BM25 against the cascade) first: the comparison's full-depth pass is the slow part
        print_table(f"{args.data.name} {args.split}: BM25 and the cascade (the comparison follows)", lines)
        more, plot_path = compare(args, model, prepared, bm25_path, out)
        lines += more
    hist = ", ".join(f"exit {k}: {v}" for k, v in stats["exit_histogram"].items())
    print_table(f"{args.data.name} {args.split}: {len(prepared.dataset.qrels)} queries, BM25 top-{args.hits}, model "
                f"{model}", lines)
    print(f"\ncascade exits: {hist}; candidates/s and latency measured on this machine, {args.threads} threads")
    print(f"run file: {cascade_path}\nstatistics: {stats_path}" + (f"\nplot: {plot_path}" if plot_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
