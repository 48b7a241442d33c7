"""Effectiveness versus cost of the matryoshka cascade, side by side with full-depth baselines (issue 6).

For each collection: Pyserini BM25 top-``hits`` of the test queries, then on the SAME candidates:

(a) PyTorch fp32 full depth (what a sentence-transformers CrossEncoder user runs), from the training checkpoint;
(b) one full-depth ONNX graph, fp32 and int8;
(c) every fixed exit of the ONNX int8 stage chain;
(d) the cascade at the model's tuned default (real, timed: exactly what the plugin runs, with the manifest's policy,
    rerank depth and first-stage fusion) and at a sweep of thresholds for each policy.

Two tables come out:

* **all queries** (quality + compute): BM25, (c), (d). The int8 chain runs once at full depth recording every exit's
  score; fixed exits and every sweep point are replayed exactly from those scores (``matryoshka.plugin.tuning``,
  tested equal to real cascade runs). Metrics from trec_eval for table rows, in-process nDCG@10 for the plot.
* **side by side, timed** (the first ``--timing-queries`` queries): (a), (b) fp32, (b) int8, (c), (d default), each run
  in a fresh subprocess (clean peak memory: ru_maxrss), per query as Pyserini would call it: candidates/s, ms per
  query p50/p95, peak RSS, nDCG@10 on those queries, speed-ups against (a) and (b int8).

Layer-FLOPs: the share of full-depth transformer layer compute, from the manifest's per-stage relative cost (which
accounts for compression). Usage: see BENCHMARKS.md (the exact command is written there by ``--write``).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from benchmarks.bench_worker import _worker

    if argv and argv[0] == "_worker":
        config, model, ckpt, cache, out, threads, batch = argv[1:8]
        _worker(config, Path(model), Path(ckpt) if ckpt else None, Path(cache), Path(out), int(threads), int(batch))
        return 0
    from benchmarks.bench_report import run_benchmark  # the table/plot side lives in its own module

    return run_benchmark(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    tempfile.tempdir = tempfile.gettempdir()
    sys.exit(main())
