"""``python -m matryoshka tune``: pick the cascade's policy and threshold on a dev split, store it in the manifest.

BM25 top-``hits`` of the dev queries (Pyserini), one full-depth pass recording every exit's score (the BM25 scores
are kept), then the first-stage weight W among ``--first-stage-weights`` (default 0 0.1 ... 0.7) whose fused
full-depth nDCG@10, ``(1-W) * n(reranker) + W * n(BM25)`` per query (``n`` by ``--fusion``: z or minmax), is best,
an offline replay of every (policy, threshold, rerank depth) of the sweep with the same fusion, then the cheapest
point whose nDCG@10 is within ``--max-loss`` of that fused full depth (default 1%), or the best point within
``--cost`` (share of full-depth layer-FLOPs of scoring every candidate). The rerank depth d scores only each query's
top d BM25 candidates (``--depths``, default all 80 60 50 40 30 20; ``--depths all`` = every candidate). The choice
is written into the model's ``manifest.json`` (``policy``: name, threshold, first_stage_weight, fusion, depth, and
what it was tuned on) unless ``--dry-run``. ``--first-stage-weights 0`` tunes the plain reranker (no fusion).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from matryoshka.errors import DataFormatError, OptionError, cli_main
from matryoshka.io import Run, read_run
from matryoshka.io.atomic import atomic_write
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.fusion import DEFAULT_FUSION, NORMALIZATIONS
from matryoshka.plugin.manifest import PolicySpec, load_manifest, write_manifest
from matryoshka.plugin.tuning import (
    DEFAULT_FIRST_STAGE_WEIGHTS,
    Recorded,
    SweepPoint,
    check_depths,
    check_weights,
    record_run,
    tune,
)

logger = logging.getLogger(__name__)
#: rerank depths the command chooses from by default (None = every candidate)
TUNE_DEPTHS: tuple[int | None, ...] = (None, 80, 60, 50, 40, 30, 20)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m matryoshka tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model folder (manifest.json)")
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder of the dev data")
    parser.add_argument("--split", default="dev", help="dev split (qrels/<split>.tsv); never tune on test")
    parser.add_argument("--work", type=Path, default=Path("runs/work"), help="folder for index/topics/runs")
    parser.add_argument("--hits", type=int, default=100, help="BM25 candidates per query (default: 100)")
    parser.add_argument("--run", type=Path, default=None, metavar="RUN.trec",
                        help="tune on this first-stage run of the dev queries instead of BM25 (TREC format with "
                             "scores, e.g. from pyserini.search.faiss or .hybrid): the weight and depth then fit "
                             "that first stage; --hits is ignored")
    parser.add_argument("--queries", type=int, default=None, metavar="N",
                        help="tune on a seeded random sample of N judged dev queries (default: all); the full-depth "
                        "recording pass costs about 0.05 s per candidate on a 2-core CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --queries sample (default: 0)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-loss", type=float, default=None,
                        help="largest relative nDCG@10 loss against full depth (default: 0.01 = 1%%)")
    budget.add_argument("--cost", type=float, default=None,
                        help="instead: a cost target, the share of full-depth layer-FLOPs (e.g. 0.4)")
    parser.add_argument("--first-stage-weights", type=_weights, nargs="+", metavar="W",
                        default=[list(DEFAULT_FIRST_STAGE_WEIGHTS)],
                        help="weights of the normalised BM25 score in the final score to choose from (best "
                             "full-depth nDCG@10 wins; space- or comma-separated, each in [0, 1]; 0 alone = no "
                             f"fusion; default: {' '.join(f'{w:g}' for w in DEFAULT_FIRST_STAGE_WEIGHTS)})")
    parser.add_argument("--fusion", choices=list(NORMALIZATIONS), default=DEFAULT_FUSION,
                        help="per-query normalisation of the fusion, stored in the manifest (default: %(default)s; "
                             "minmax = the training-free BM25 + bi-encoder fusion)")
    parser.add_argument("--depths", type=_depth, nargs="+", metavar="D", default=list(TUNE_DEPTHS),
                        help="rerank depths to choose from: 'all' or a number of candidates per query (default: "
                             f"{' '.join('all' if d is None else str(d) for d in TUNE_DEPTHS)})")
    parser.add_argument("--precision", default=None, help="stage files to tune with (default: the manifest's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sweep-output", type=Path, default=None, help="also write every sweep point as JSON")
    parser.add_argument("--cache", type=Path, default=None, metavar="FILE.npz",
                        help="keep the recorded exit scores in this file and reuse them when the model files, data, "
                        "split, hits and query sample are the same (re-tune another budget in seconds)")
    parser.add_argument("--dry-run", action="store_true", help="print the choice, leave the manifest unchanged")
    return parser


def _depth(text: str) -> int | None:
    """One ``--depths`` value: ``all`` or a positive integer."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'all' or an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'all' or an integer >= 1")
    return value


def _weights(text: str) -> list[float]:
    """One ``--first-stage-weights`` argument: a number or a comma-separated list of numbers."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma-separated list of numbers") from None


def sample_queries(candidates: dict, qrels: Mapping[str, Mapping[str, int]], n: int | None, seed: int) -> dict:
    """``candidates`` restricted to a seeded random sample of ``n`` queries that have judgments (all when None).

    The entries keep the BM25 scores: the first-stage scores of the fusion."""
    if n is None:
        return candidates
    judged = [q for q in candidates if any(g > 0 for g in qrels.get(q, {}).values())]
    if n < 1 or n > len(judged):
        raise OptionError("--queries", n, f"a number of queries in 1..{len(judged)} (the judged queries with "
                          "BM25 candidates)")
    keep = set(np.random.default_rng(seed).choice(len(judged), size=n, replace=False).tolist())
    chosen = {judged[i] for i in keep}
    return {q: hits for q, hits in candidates.items() if q in chosen}


def cache_key(cascade: Cascade, args: argparse.Namespace) -> str:
    """What the recorded scores depend on: the stage files run, the data and the candidate sample."""
    parts = [str(args.data.resolve()), args.split, str(args.hits), str(args.queries), str(args.seed)]
    if getattr(args, "run", None) is not None:  # another first stage: its candidates and scores
        parts.append(hashlib.sha256(Path(args.run).read_bytes()).hexdigest())
    return recording_key(cascade, parts)


def recording_key(cascade: Cascade, parts: Sequence[str]) -> str:
    """Cache key of exit scores recorded with ``cascade``'s stage files over what ``parts`` describe."""
    files = [cascade.precision, *(s.files[cascade.precision].sha256 for s in cascade.manifest.stages)]
    return hashlib.sha256("\n".join([*files, *parts]).encode()).hexdigest()


def check_run_in_collection(run: Run, run_path: Path, data: Path, corpus: Mapping[str, object],
                            queries: Mapping[str, str], split: str) -> None:
    """DataFormatError naming ``run_path`` when a run's document is not in ``data``'s corpus or its query is not
    among ``data``'s queries (a run retrieved from another collection)."""
    unknown = [(q, e.docid) for q, hits in run.queries.items() for e in hits if e.docid not in corpus]
    if unknown:
        raise DataFormatError(run_path, None, f"document {unknown[0][1]!r} of query {unknown[0][0]!r} is not in "
                              f"{data}/corpus.jsonl", "pass the run retrieved from this --data collection")
    stray = [q for q in run.queries if q not in queries]
    if stray:
        raise DataFormatError(run_path, None, f"query {stray[0]!r} is not in {data}/queries.jsonl",
                              f"pass a run of this collection's {split} queries")


def write_choice(model_dir: str | Path, best: SweepPoint, first_stage_weight: float, tuned_on: dict,
                 fusion: str = DEFAULT_FUSION) -> Path:
    """Store the chosen policy, threshold, rerank depth and first-stage weight in ``model_dir/manifest.json``
    (atomically; the manifest is re-checked before it is written, the model's files are untouched)."""
    manifest = load_manifest(model_dir, verify=False)
    policy = PolicySpec(name=best.policy, threshold=best.threshold, tuned_on=tuned_on,
                        first_stage_weight=float(first_stage_weight), depth=best.depth, fusion=fusion)
    return write_manifest(model_dir, dataclasses.replace(manifest, policy=policy))


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    max_loss = 0.01 if args.max_loss is None and args.cost is None else args.max_loss
    if args.split == "test":
        raise OptionError("--split", args.split, "a dev or held-out split: tuning on test inflates its figures")
    weights = check_weights([w for group in args.first_stage_weights for w in group])
    # the model is checked (manifest, files, hashes) before the BM25 search, not after it
    cascade = Cascade(args.model, precision=args.precision, threads=args.threads, batch_size=args.batch_size)
    from matryoshka.pipeline import bm25_search, prepare_beir  # Pyserini only on this path

    prepared = prepare_beir(args.data, args.split, args.work)
    if args.run is not None:
        run_path = args.run
    else:
        run_path = bm25_search(prepared.index_dir, prepared.topics, args.work / f"bm25-{args.data.name}-"
                               f"{args.split}-{args.hits}.txt", hits=args.hits)
    run = read_run(run_path)
    if args.run is not None:  # the given run's depth replaces --hits (cache key, depths, tuned_on)
        args.hits = max((len(h) for h in run.queries.values()), default=0)
    check_run_in_collection(run, run_path, args.data, prepared.dataset.corpus, prepared.dataset.queries,
                            args.split)
    candidates = sample_queries(run.queries, prepared.dataset.qrels, args.queries, args.seed)
    # a sample is judged on its own queries only (queries of the qrels without a run would count as 0)
    qrels = prepared.dataset.qrels if args.queries is None else {
        q: prepared.dataset.qrels[q] for q in candidates if q in prepared.dataset.qrels}
    texts = {e.docid: prepared.dataset.corpus[e.docid].contents for docs in candidates.values() for e in docs}
    recorded = None
    key = cache_key(cascade, args) if args.cache else ""
    if args.cache:
        recorded = Recorded.load(args.cache, key)
    if recorded is None:
        logger.info("recording exit scores of %d pairs (%d queries)",
                    sum(len(h) for h in candidates.values()), len(candidates))
        recorded = record_run(cascade, candidates, prepared.dataset.queries, texts)
        if args.cache:
            recorded.save(args.cache, key)
    recorded.fusion = args.fusion
    # a depth >= --hits scores every candidate: the same point as 'all'
    depths = check_depths([d if d is None or d < args.hits else None for d in args.depths])
    result = tune(recorded, qrels, weights, max_loss=max_loss, cost_target=args.cost, depths=depths)
    full, points, best, weight = result.full_ndcg, result.points, result.best, result.first_stage_weight
    print("\n| first-stage weight | full-depth nDCG@10 |\n|---|---|")
    for w, ndcg in result.full_ndcg_by_weight.items():
        print(f"| {w:g} | {ndcg:.4f}{' **chosen**' if w == weight else ''} |")
    print(f"\nfull depth nDCG@10 on {args.data.name} {args.split} (first-stage weight {weight:g}, {args.fusion}): "
          f"{full:.4f}\n")
    print("| policy | threshold | depth | nDCG@10 | relative | mean layers | cost |\n|---|---|---|---|---|---|---|")
    for p in points:
        mark = " **chosen**" if p == best else ""
        print(f"| {p.policy} | {p.threshold:g} | {p.depth or 'all'} | {p.ndcg10:.4f} | {p.relative_ndcg:.3f} | "
              f"{p.mean_layers:.2f} | {p.relative_cost:.3f}{mark} |")
    first = result.first_stage_ndcg
    if first is not None:
        print(f"\nfirst stage alone ({'BM25' if args.run is None else args.run.name}): nDCG@10 {first:.4f}")
        if not result.adds_to_first_stage:
            print(f"warning: on {args.data.name} {args.split} the chosen cascade (nDCG@10 {best.ndcg10:.4f}) does not "
                  f"beat the first stage alone ({first:.4f}): reranking these candidates costs compute for no gain. "
                  "Keep the first stage's ranking, or rerank with a stronger model.", file=sys.stderr)
    if args.sweep_output:
        with atomic_write(args.sweep_output) as handle:
            json.dump({"full_ndcg10": full, "first_stage_weight": weight, "first_stage_ndcg10": first,
                       "full_ndcg10_by_first_stage_weight": {f"{w:g}": v for w, v in
                                                             result.full_ndcg_by_weight.items()},
                       "points": [p.as_dict() for p in points]}, handle, indent=1)
    budget = f"max_loss={max_loss}" if max_loss is not None else f"cost={args.cost}"
    print(f"\nchosen: policy={best.policy} threshold={best.threshold:g} depth={best.depth or 'all'} "
          f"first_stage_weight={weight:g} fusion={args.fusion} (nDCG@10 "
          f"{best.ndcg10:.4f}, {best.relative_ndcg:.1%} of full depth, {best.relative_cost:.1%} of its "
          f"layer-FLOPs; {budget})")
    if not args.dry_run:
        tuned_on = {"data": args.data.name, "split": args.split, "hits": args.hits, "budget": budget,
                    "first_stage": "bm25" if args.run is None else args.run.name,
                    "queries": len(candidates), "seed": args.seed,
                    "precision": cascade.precision, "ndcg10": round(best.ndcg10, 4),
                    "full_ndcg10": round(full, 4), "relative_cost": round(best.relative_cost, 4),
                    "first_stage_ndcg10": None if first is None else round(first, 4),
                    "depths": ["all" if d is None else d for d in depths]}
        if weights != (0.0,):
            tuned_on["first_stage_weights"] = list(weights)
            tuned_on["full_ndcg10_unfused"] = round(recorded.full_depth_ndcg(qrels), 4)
        path = write_choice(args.model, best, weight, tuned_on, fusion=args.fusion)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
