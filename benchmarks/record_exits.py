"""Record every exit's score of an exported model over Pyserini BM25 candidates, as one TREC run per exit.

    python benchmarks/record_exits.py --model MODEL_DIR --data DATA_DIR [--split test] [--hits 100]
        [--precision int8] --output DIR [--name NAME] [--threads 2]

Writes ``DIR/NAME-bm25.trec`` (the candidates, Pyserini BM25) and ``DIR/NAME-PRECISION-exit<L>.trec`` for every exit
``L`` of the model: the score every candidate gets at that exit, from one full-depth pass of the ONNX stage chain,
one cascade call per query as the plugin makes it in Pyserini. ``benchmarks/rerank_benchmark.py --recorded DIR``
replays the cascade from these files (as it does from the per-exit runs of ``matryoshka.training.evaluate``), so the
slow full-depth pass is paid once per (model, collection, precision). Files appear only when complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from matryoshka.errors import cli_main

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("record_exits")


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="exported model folder (manifest.json)")
    p.add_argument("--data", type=Path, required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="test")
    p.add_argument("--hits", type=int, default=100, help="BM25 candidates per query (default 100)")
    p.add_argument("--precision", default=None, help="stage files to run (default: the manifest's)")
    p.add_argument("--output", type=Path, required=True, help="folder for the runs")
    p.add_argument("--name", default=None, help="file name prefix (default: the data folder's name)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "work", help="index, topics and qrels (reused)")
    return p.parse_args(argv)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from matryoshka.errors import OptionError
    from matryoshka.io import read_run, write_run
    from matryoshka.pipeline import bm25_search, prepare_beir
    from matryoshka.plugin.cascade import Cascade
    from matryoshka.plugin.tuning import record_run

    if args.hits < 1:
        raise OptionError("--hits", args.hits, "a positive number of candidates per query")
    name = args.name or args.data.name
    chain = Cascade(args.model, precision=args.precision, threads=args.threads, batch_size=args.batch_size)
    precision = chain.precision
    prepared = prepare_beir(args.data, args.split, args.work, threads=args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    bm25_path = bm25_search(prepared.index_dir, prepared.topics, args.output / f"{name}-bm25.trec",
                            hits=args.hits, threads=args.threads)
    bm25 = read_run(bm25_path)
    candidates = {qid: [e.docid for e in entries] for qid, entries in bm25.queries.items()}
    texts = {d: prepared.dataset.corpus[d].contents for docs in candidates.values() for d in docs}
    start = time.perf_counter()
    recorded = record_run(chain, candidates, prepared.dataset.queries, texts)
    seconds = time.perf_counter() - start
    for k, exit_layer in enumerate(recorded.exits):
        path = args.output / f"{name}-{precision}-exit{exit_layer}.trec"
        write_run(path, recorded.to_run(recorded.exit_scores[:, k]), tag=f"{name}-{precision}-exit{exit_layer}")
        logger.info("wrote %s", path)
    n = len(recorded.docids)
    print(f"recorded {n} pairs x {len(recorded.exits)} exits in {seconds:.0f} s ({n / seconds:.1f} pairs/s at full "
          f"depth, {precision}, {args.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
