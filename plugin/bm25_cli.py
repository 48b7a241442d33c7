"""``python -m matryoshka bm25``: BEIR folder → Pyserini Lucene index → BM25 run → trec_eval, with Pyserini's CLIs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from matryoshka.errors import cli_main
from matryoshka.pipeline import bm25_search, prepare_beir, trec_eval

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "scifact"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m matryoshka bm25", description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); default: bundled SciFact")
    parser.add_argument("--split", default="test", help="qrels split to search and evaluate (default: test)")
    parser.add_argument("--work", type=Path, default=Path("runs/work"),
                        help="folder for the collection, index, topics and qrels (reused when present)")
    parser.add_argument("--output", type=Path, default=None, help="run file (default: <work>/bm25-<data>-<split>.txt)")
    parser.add_argument("--hits", type=int, default=100, help="hits per query (default: 100)")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    header = "| run | nDCG@10 | MRR@10 | R@100 |\n|---|---|---|---|"
    body = [f"| {name} | {m['ndcg_cut_10']:.4f} | {m['recip_rank']:.4f} | {m['recall_100']:.4f} |"
            for name, m in rows]
    return "\n".join([header, *body])


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from matryoshka.plugin.session import check_search_options  # imports onnxruntime: only once we run

    check_search_options(args.hits, args.threads)
    prepared = prepare_beir(args.data, args.split, args.work, threads=args.threads)
    output = args.output or args.work / f"bm25-{args.data.name}-{args.split}.txt"
    bm25_search(prepared.index_dir, prepared.topics, output, hits=args.hits, threads=args.threads)
    metrics = trec_eval(prepared.qrels, output)
    print(f"\nBM25 on {args.data.name} {args.split} ({len(prepared.dataset.qrels)} queries), run: {output}\n")
    print(format_table([("BM25 (Pyserini, flat)", metrics)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
