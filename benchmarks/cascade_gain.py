"""Where the cascade can add to a first stage: nDCG@10 of the fused ranking at every first-stage weight W, on all
test queries and split by whether a query's relevant documents were relevant to training queries.

    python benchmarks/cascade_gain.py --model plugin/default_model \
        --data /work/shared/data/scifact /work/shared/data/nfcorpus \
        --runs runs/dense-bench/runs/scifact/hybrid-X.txt runs/dense-bench/runs/nfcorpus/hybrid-X.txt \
        --labels "hybrid fine-tuned" --depth 20 --cache runs/cascade-gain \
        --output benchmarks/results/cascade-gain.md

For each (``--data``, ``--runs``) pair, the run is cut to its top ``--depth`` per query (what the cascade reranks);
the model's exit scores of those candidates are recorded once (cached in ``--cache``, keyed by the stage files and
the run) and fused with the run's scores as the plugin does (``plugin/fusion.py``) at each ``--weights`` W. W = 0
is the reranker alone, W = 1 the first stage alone (nDCG@10 computed here, ties broken by docid as the reranker
breaks them; trec_eval breaks them the other way, so it can differ slightly from the pipeline's figure).

Each section ends with the best W at shallower rerank depths (``--depths``): only each query's top N candidates
rescored, the others below them in first-stage order, as the plugin ranks a run with ``--matryoshka.depth N``.

This is a **diagnostic, not a result**: the W giving the best nDCG@10 here is read off the test split, so it is
an upper bound on what any tuned W can give. The pipeline's own W is tuned on NFCorpus dev
(``benchmarks/dense_pipeline.py``). When no W beats W = 1, no fusion weight can make the cascade add to that first
stage: the reranker itself has to get better.

"Seen" queries are those with a relevant document that is also relevant to some query of the collection's
``--seen-from`` split (default ``train``): a model fine-tuned on that split has been shown those documents as
positives, and a query-side fine-tuned retriever learns to prefer them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from matryoshka.errors import DataFormatError, OptionError, cli_main  # noqa: E402
from matryoshka.io import atomic_write  # noqa: E402
from matryoshka.io.beir import BeirDataset  # noqa: E402
from matryoshka.metrics import ndcg_at_k  # noqa: E402
from matryoshka.plugin.tuning import Recorded  # noqa: E402

logger = logging.getLogger("cascade_gain")

DEFAULT_WEIGHTS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
Qrels = Mapping[str, Mapping[str, int]]


def seen_queries(qrels: Qrels, train_qrels: Qrels) -> set[str]:
    """Queries of ``qrels`` with a relevant document (grade > 0) that is relevant to some query of ``train_qrels``."""
    seen_docs = {d for judged in train_qrels.values() for d, g in judged.items() if g > 0}
    return {q for q, judged in qrels.items() if any(g > 0 and d in seen_docs for d, g in judged.items())}


def judged_queries(qrels: Qrels) -> set[str]:
    """Queries with at least one relevant document (the ones nDCG@10 averages over)."""
    return {q for q, judged in qrels.items() if any(g > 0 for g in judged.values())}


def gain_rows(recorded: Recorded, qrels: Qrels, weights: Sequence[float], subsets: Mapping[str, set[str]]
              ) -> list[dict[str, float]]:
    """One row per W: ``{"W": w, <subset>: nDCG@10 over that subset's queries, ...}`` (final exit, every candidate
    scored), fused with the first stage as the plugin does."""
    rows = []
    final = recorded.exit_scores[:, -1]
    for w in weights:
        run = recorded.to_run(recorded.fused(final, w))
        row: dict[str, float] = {"W": float(w)}
        for name, queries in subsets.items():
            row[name] = ndcg_at_k(run, {q: qrels[q] for q in queries if q in qrels})
        rows.append(row)
    return rows


def depth_rows(recorded: Recorded, qrels: Qrels, weights: Sequence[float], depths: Sequence[int]
               ) -> list[dict[str, float]]:
    """Per rerank depth (each query's top ``depth`` first-stage candidates rescored and fused, the others below them
    in first-stage order, as the plugin ranks them): the best W over all queries (ties: the smallest) and its
    nDCG@10."""
    from matryoshka.plugin.policies import make_policy

    policy = make_policy("fixed", None, recorded.exits, 1.0)  # the final exit for every candidate
    rows = []
    for depth in depths:
        by_weight = {w: ndcg_at_k(recorded.to_run(recorded.replay(policy, w, depth)[0]), qrels) for w in weights}
        best = max(sorted(by_weight), key=lambda w: by_weight[w])
        rows.append({"depth": depth, "W": best, "nDCG@10": by_weight[best]})
    return rows


def render(sections: Sequence[tuple[str, dict[str, int], list[dict[str, float]], list[dict[str, float]]]],
           command: str) -> str:
    """Markdown: per section (title, query count per subset, rows, depth rows) a table of nDCG@10 by W, the best W
    per column in bold, W = 0 / 1 named, then the best W per rerank depth."""
    out = ["# Where the cascade can add to a first stage", "",
           "Diagnostic, not a result: W is read off the test split here, so each column's best is an upper bound on",
           "what a W tuned elsewhere can give. W = 0 is the reranker alone, W = 1 the first stage alone.", "",
           f"`{command}`", ""]
    for title, counts, rows, by_depth in sections:
        names = list(counts)
        best = {n: max(r[n] for r in rows) for n in names}
        out += [f"## {title}", "",
                "| W | " + " | ".join(f"{n} ({counts[n]} queries)" for n in names) + " |",
                "|---|" + "---:|" * len(names)]
        for r in rows:
            label = {0.0: "0 (reranker alone)", 1.0: "1 (first stage alone)"}.get(r["W"], f"{r['W']:g}")
            cells = [f"**{r[n]:.4f}**" if r[n] == best[n] else f"{r[n]:.4f}" for n in names]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        first = next((r for r in rows if r["W"] == 1.0), None)
        if first is not None:
            verdict = [f"{n}: best W adds {best[n] - first[n]:+.4f} over the first stage alone" for n in names]
            out += ["", "; ".join(verdict) + "."]
        if by_depth:
            out += ["", "Best W per rerank depth (all queries; the rest keep the first-stage order below):", "",
                    "| depth | best W | nDCG@10 |", "|---:|---:|---:|"]
            out += [f"| {int(r['depth'])} | {r['W']:g} | {r['nDCG@10']:.4f} |" for r in by_depth]
        out.append("")
    return "\n".join(out)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="exported model folder (manifest.json)")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="BEIR folders, one per --runs file")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="first-stage TREC runs (with scores)")
    p.add_argument("--labels", nargs="+", default=["first stage"],
                   help="name of each run's first stage in the report (one for all, or one per run)")
    p.add_argument("--split", default="test", help="split the runs were retrieved for (default test)")
    p.add_argument("--seen-from", default="train",
                   help="split whose relevant documents make a query 'seen' (default train; none: no split)")
    p.add_argument("--depth", type=int, default=20, help="candidates per query the cascade reranks (default 20)")
    p.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS))
    p.add_argument("--depths", type=int, nargs="*", default=None,
                   help="also the best W when only each query's top N of the cut run are reranked (each N < --depth; "
                        "default: those of 5 10 15 below --depth)")
    p.add_argument("--cache", type=Path, required=True, help="folder for the cut runs and recorded exit scores")
    p.add_argument("--output", type=Path, required=True, help="markdown report (written atomically)")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    if len(args.data) != len(args.runs):
        raise OptionError("--runs", [str(r) for r in args.runs], f"one run per --data folder ({len(args.data)})")
    if len(args.labels) not in (1, len(args.runs)):
        raise OptionError("--labels", args.labels, f"one label, or one per run ({len(args.runs)})")
    if args.depth < 10:
        raise OptionError("--depth", args.depth, "an integer >= 10 (nDCG@10 needs 10 reranked candidates)")
    if args.depths is None:
        args.depths = [d for d in (5, 10, 15) if d < args.depth]
    bad_depths = [d for d in args.depths if not 1 <= d < args.depth]
    if bad_depths:
        raise OptionError("--depths", bad_depths[0], f"rerank depths in 1..{args.depth - 1} (below --depth)")
    bad = [w for w in args.weights if not 0.0 <= w <= 1.0]
    if bad:
        raise OptionError("--weights", bad[0], "numbers in [0, 1]")


def record(args: argparse.Namespace, data: Path, run_path: Path, dataset: BeirDataset) -> Recorded:
    """The exit scores of the run's top ``--depth`` candidates, from ``--cache`` when recorded before."""
    from benchmarks.pipeline_stages import truncate_run
    from matryoshka.io import read_run
    from matryoshka.plugin.cascade import Cascade
    from matryoshka.plugin.tune_cli import check_run_in_collection, recording_key
    from matryoshka.plugin.tuning import record_run

    args.cache.mkdir(parents=True, exist_ok=True)
    lines = truncate_run(run_path.read_text(encoding="utf-8").splitlines(keepends=True), args.depth)
    stem = f"{data.name}-{hashlib.sha256(''.join(lines).encode()).hexdigest()[:8]}-top{args.depth}"
    cut = args.cache / f"{stem}.txt"
    with atomic_write(cut) as handle:
        handle.writelines(lines)
    run = read_run(cut)
    check_run_in_collection(run, run_path, data, dataset.corpus, dataset.queries, args.split)
    cascade = Cascade(args.model, threads=args.threads)
    key = recording_key(cascade, [stem])
    npz = args.cache / f"{stem}.npz"
    recorded = Recorded.load(npz, key)
    if recorded is None:
        texts = {e.docid: dataset.corpus[e.docid].contents for hits in run.queries.values() for e in hits}
        recorded = record_run(cascade, run.queries, dataset.queries, texts)
        recorded.save(npz, key)
    if recorded.first_stage is None:
        raise DataFormatError(run_path, None, "the run has no scores", "pass a TREC run with its retrieval scores")
    return recorded


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from matryoshka.io.beir import load_beir, qrels_path
    from matryoshka.io.trec import read_qrels

    sections = []
    check(args)
    labels = args.labels * len(args.runs) if len(args.labels) == 1 else args.labels
    for data, run_path, label in zip(args.data, args.runs, labels, strict=True):
        dataset = load_beir(data, args.split)
        judged = judged_queries(dataset.qrels)
        subsets = {"all": judged}
        if args.seen_from != "none":
            seen = judged & seen_queries(dataset.qrels, read_qrels(qrels_path(data, args.seen_from)))
            if seen and seen != judged:  # a split only when it splits
                subsets.update(seen=seen, unseen=judged - seen)
            else:
                logger.info("%s: %s %s queries seen in %s", data.name, "all" if seen else "no", args.split,
                            args.seen_from)
        recorded = record(args, data, run_path, dataset)
        weights = sorted(set(args.weights))
        rows = gain_rows(recorded, dataset.qrels, weights, subsets)
        by_depth = depth_rows(recorded, dataset.qrels, weights, [*sorted(set(args.depths)), args.depth])
        sections.append((f"{label} top {args.depth}, {data.name} {args.split}",
                         {n: len(q) for n, q in subsets.items()}, rows, by_depth))
    command = shlex.join(["python", "benchmarks/cascade_gain.py", *(argv if argv is not None else sys.argv[1:])])
    from benchmarks.bench_worker import publish

    return publish(args.output, render(sections, command))


if __name__ == "__main__":
    sys.exit(main())
