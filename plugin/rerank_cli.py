"""``python -m matryoshka rerank``: rerank a TREC run file with a matryoshka model (cascade with early exits).

    python -m matryoshka rerank --run bm25.txt --topics topics.tsv --index lucene-index --output reranked.txt \\
        --model model/ --policy candidate --threshold 0.95 --depth 100 --stats stats.json

``--first-stage-weight W`` interpolates with the run's own scores: per query, ``(1-W) * z(reranker) + W *
z(run score)`` (z-normalised over the query's reranked candidates; default: the model's tuned
``policy.first_stage_weight``, 0 when the manifest has none = the reranker's scores alone).
Passage texts come from a Lucene index that stores raw documents (``--index``) or a corpus file (``--corpus``: BEIR
``corpus.jsonl`` or Pyserini JsonCollection ``.jsonl``). Passages longer than the model's ``max_length`` are
truncated to the layout's passage budget. The output is written atomically, sorted by (-score, docid); bad input
stops the run with one line naming the file, line and value, and no output is written.

``--engine ray [--ray-address ADDR] [--workers N]`` spreads the queries over Ray actors (one query per task; each
actor loads and verifies the model once, ``--threads`` threads each, default 1) and writes the same run file as the
local engine; without ``--ray-address`` a local Ray instance runs for the command (see
:mod:`matryoshka.plugin.ray_engine`). Needs the ``[ray]`` extra.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from matryoshka.errors import cli_main
from matryoshka.plugin.engines import add_engine_options, engine_options, get_engine
from matryoshka.plugin.options import (
    add_model_options,
    build_reranker,
    check_outputs,
    check_source_path,
    document_source,
    rerank_file,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m matryoshka rerank",
                                     description="Rerank a TREC run with a matryoshka (early-exit) reranker.")
    parser.add_argument("--run", required=True, metavar="FILE", help="TREC run file to rerank")
    parser.add_argument("--topics", required=True, metavar="FILE",
                        help="topics: TSV 'qid<TAB>text' (Pyserini) or BEIR queries.jsonl")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", metavar="DIR", help="Lucene index with stored raw documents (-storeRaw)")
    source.add_argument("--corpus", metavar="FILE", help="BEIR corpus.jsonl or Pyserini JsonCollection .jsonl")
    parser.add_argument("--output", required=True, metavar="FILE", help="reranked TREC run to write")
    parser.add_argument("--tag", default="matryoshka", help="run tag of the output (default: %(default)s)")
    add_model_options(parser.add_argument_group("reranker"))
    add_engine_options(parser.add_argument_group("engine"))
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    check_source_path(args.index, args.corpus, "--index", "--corpus")
    check_outputs([("--output", args.output), ("--stats", args.stats)],
                  [("--run", args.run), ("--topics", args.topics), ("--corpus", args.corpus)])
    options = engine_options(args)
    get_engine(args.engine, "--engine").prepare(options, args.threads)  # extra installed, cluster reachable
    reranker = build_reranker(args)
    source = document_source(args.index, args.corpus, "--index", "--corpus")
    rerank_file(reranker, args.run, args.topics, source, args.output, args.tag, args.depth, args.stats,
                engine=args.engine, engine_options=options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
