"""``python -m matryoshka tune``: pick the cascade's policy and threshold on a dev split, store it in the manifest.

BM25 top-``hits`` of the dev queries (Pyserini), one full-depth pass recording every exit's score, an offline replay
of every (policy, threshold) of the sweep, then the cheapest point whose nDCG@10 is within ``--max-loss`` of full
depth (default 1%), or the best point within ``--cost`` (share of full-depth layer-FLOPs). The choice is written
into the model's ``manifest.json`` (``policy``: name, threshold, and what it was tuned on) unless ``--dry-run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from matryoshka.errors import MatryoshkaError, OptionError
from matryoshka.io import read_run
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.manifest import PolicySpec, load_manifest, write_manifest
from matryoshka.plugin.tuning import choose, record_run, sweep

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m matryoshka tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="exported model folder (manifest.json)")
    parser.add_argument("--data", type=Path, required=True, help="BEIR folder of the dev data")
    parser.add_argument("--split", default="dev", help="dev split (qrels/<split>.tsv); never tune on test")
    parser.add_argument("--work", type=Path, default=Path("runs/work"), help="folder for index/topics/runs")
    parser.add_argument("--hits", type=int, default=100, help="BM25 candidates per query (default: 100)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--max-loss", type=float, default=None,
                        help="largest relative nDCG@10 loss against full depth (default: 0.01 = 1%%)")
    budget.add_argument("--cost", type=float, default=None,
                        help="instead: a cost target, the share of full-depth layer-FLOPs (e.g. 0.4)")
    parser.add_argument("--precision", default=None, help="stage files to tune with (default: the manifest's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sweep-output", type=Path, default=None, help="also write every sweep point as JSON")
    parser.add_argument("--dry-run", action="store_true", help="print the choice, leave the manifest unchanged")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    max_loss = 0.01 if args.max_loss is None and args.cost is None else args.max_loss
    try:
        if args.split == "test":
            raise OptionError("--split", args.split, "a dev or held-out split: tuning on test inflates its figures")
        from matryoshka.pipeline import bm25_search, prepare_beir  # Pyserini only on this path

        prepared = prepare_beir(args.data, args.split, args.work)
        run_path = bm25_search(prepared.index_dir, prepared.topics, args.work / f"bm25-{args.data.name}-"
                               f"{args.split}-{args.hits}.txt", hits=args.hits)
        run = read_run(run_path)
        candidates = {qid: [e.docid for e in entries] for qid, entries in run.queries.items()}
        texts = {d: prepared.dataset.corpus[d].contents for docs in candidates.values() for d in docs}
        cascade = Cascade(args.model, precision=args.precision, threads=args.threads, batch_size=args.batch_size)
        logger.info("recording exit scores of %d pairs (%d queries)", len(texts), len(candidates))
        recorded = record_run(cascade, candidates, prepared.dataset.queries, texts)
        full, points = sweep(recorded, prepared.dataset.qrels)
        best = choose(points, max_loss=max_loss, cost_target=args.cost)
    except MatryoshkaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nfull depth nDCG@10 on {args.data.name} {args.split}: {full:.4f}\n")
    print("| policy | threshold | nDCG@10 | relative | mean layers | cost |\n|---|---|---|---|---|---|")
    for p in points:
        mark = " **chosen**" if p == best else ""
        print(f"| {p.policy} | {p.threshold:g} | {p.ndcg10:.4f} | {p.relative_ndcg:.3f} | {p.mean_layers:.2f} | "
              f"{p.relative_cost:.3f}{mark} |")
    if args.sweep_output:
        args.sweep_output.write_text(json.dumps({"full_ndcg10": full, "points": [p.as_dict() for p in points]},
                                                indent=1))
    budget = f"max_loss={max_loss}" if max_loss is not None else f"cost={args.cost}"
    print(f"\nchosen: policy={best.policy} threshold={best.threshold:g} (nDCG@10 {best.ndcg10:.4f}, "
          f"{best.relative_ndcg:.1%} of full depth, {best.relative_cost:.1%} of its layer-FLOPs; {budget})")
    if not args.dry_run:
        manifest = load_manifest(args.model, verify=False)
        tuned_on = {"data": args.data.name, "split": args.split, "hits": args.hits, "budget": budget,
                    "precision": cascade.precision, "ndcg10": round(best.ndcg10, 4),
                    "full_ndcg10": round(full, 4), "relative_cost": round(best.relative_cost, 4)}
        policy = PolicySpec(name=best.policy, threshold=best.threshold, tuned_on=tuned_on)
        write_manifest(args.model, dataclasses.replace(manifest, policy=policy))
        print(f"written to {args.model / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
