"""Per-stage size, validated error and throughput of an exported model folder, fp32 vs int8 (or any precisions).

    python benchmarks/export_speed.py MODEL_DIR [--batch 32] [--tokens 256] [--repeats 5] [--threads 2]

For every stage (and the full graph) and precision: file size, the ``validated_atol`` the export recorded, the
score agreement with fp32 on the benchmark batch (max abs diff, Spearman), and pairs/s at ``batch`` pairs of
``tokens`` tokens (random ids laid out by the model's PairLayout, every passage full). Stages after the first are fed
the fp32 state of the previous stage, so a stage after compression runs the shorter sequence it really sees.
Timings are interleaved across precisions (round-robin) so that load from other processes hits all of them alike;
the table reports the median of ``repeats`` runs after one warm-up, and the load average is printed with it.
Prints a markdown table and the command that produced it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from matryoshka.layout import PairLayout


@dataclass
class BenchArgs:
    model_dir: Path
    batch: int = 32
    tokens: int = 256
    repeats: int = 5
    threads: int = 2
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    seed: int = 0


@dataclass
class Row:
    graph: str
    precision: str
    size_mb: float
    validated_atol: float | None
    seq: int
    batch: int
    max_diff: float = 0.0
    spearman: float = 1.0
    times: list[float] = field(default_factory=list)

    @property
    def pairs_per_s(self) -> float:
        return 0.0 if not self.times else self.batch / statistics.median(self.times)


def parse_args(argv: Sequence[str] | None = None) -> BenchArgs:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="exported model folder (manifest.json)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256, help="pair length in tokens (capped by the layout)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--seed", type=int, default=0)
    return BenchArgs(**vars(parser.parse_args(argv)))


def bench_batch(layout: PairLayout, batch: int, tokens: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """``batch`` pairs of (at most) ``tokens`` tokens: full-length queries and passages."""
    rng = np.random.default_rng(seed)
    room = min(tokens, layout.max_length) - layout.query_length - layout.suffix_length
    segment = max(layout.passage_multiple, room // layout.passage_multiple * layout.passage_multiple)
    n_passage = segment - len(layout.passage_prefix_ids) - len(layout.passage_suffix_ids)
    low = min(vocab // 4, 1000)
    queries = [rng.integers(low, vocab, layout.query_budget).tolist() for _ in range(batch)]
    passages = [rng.integers(low, vocab, n_passage).tolist() for _ in range(batch)]
    out = layout.assemble(queries, passages)
    if "position_ids" not in out:
        seq = out["input_ids"].shape[1]
        out["position_ids"] = np.broadcast_to(np.arange(seq, dtype=np.int64), out["input_ids"].shape).copy()
    return out


def run(args: BenchArgs) -> list[Row]:
    import onnxruntime as ort

    from matryoshka.export.validate import spearman
    from matryoshka.plugin.manifest import load_manifest

    manifest = load_manifest(args.model_dir, verify=True, precisions=args.precisions)
    missing = [p for p in args.precisions if p not in manifest.precisions]
    if missing:
        raise SystemExit(f"error: {args.model_dir} has no {missing} stages; it has {list(manifest.precisions)}")
    layout = manifest.pair_layout()
    vocab = _vocab_size(args.model_dir / manifest.tokenizer.file)
    batch = bench_batch(layout, args.batch, args.tokens, vocab, args.seed)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    graphs = [(f"stage_{s.index + 1} (layers {s.layers[0]}-{s.layers[1]})", s.inputs, s.files) for s in
              manifest.stages]
    if manifest.full_graph is not None:
        graphs.append(("full graph", manifest.full_graph.inputs, manifest.full_graph.files))
    jobs: list[tuple[Row, object, dict[str, np.ndarray]]] = []
    feed = batch
    reference: dict[str, np.ndarray] = {}
    for name, inputs, files in graphs:
        this_feed = batch if "input_ids" in inputs else feed
        for precision in args.precisions:
            spec = files[precision]
            sess = ort.InferenceSession(str(args.model_dir / spec.path), options, providers=["CPUExecutionProvider"])
            row = Row(name, precision, (args.model_dir / spec.path).stat().st_size / 2**20, spec.validated_atol,
                      this_feed["attention_mask"].shape[1], args.batch)
            outputs = dict(zip([o.name for o in sess.get_outputs()],
                               sess.run(None, {n: this_feed[n] for n in inputs}), strict=True))
            if precision == args.precisions[0]:
                reference = outputs
                if name.startswith("stage"):
                    feed = {k.removesuffix("_out"): v for k, v in outputs.items() if k.endswith("_out")}
            row.max_diff = float(np.max(np.abs(outputs["score"] - reference["score"])))
            row.spearman = spearman(outputs["score"], reference["score"])
            jobs.append((row, sess, {n: this_feed[n] for n in inputs}))
    for _ in tqdm(range(args.repeats), desc="timing rounds", unit="round"):
        for row, sess, job_feed in jobs:
            start = time.perf_counter()
            sess.run(["score"], job_feed)
            row.times.append(time.perf_counter() - start)
    return [row for row, _, _ in jobs]


def _vocab_size(tokenizer_path: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_path)).get_vocab_size()


def table(rows: Sequence[Row], reference: str) -> str:
    lines = [f"| graph | precision | seq | size (MB) | validated_atol | max abs diff vs {reference} | "
             f"Spearman vs {reference} | median s/batch | pairs/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        atol = "-" if r.validated_atol is None else f"{r.validated_atol:g}"
        lines.append(f"| {r.graph} | {r.precision} | {r.seq} | {r.size_mb:.1f} | {atol} | {r.max_diff:.3g} | "
                     f"{r.spearman:.4f} | {statistics.median(r.times):.3f} | {r.pairs_per_s:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = run(args)
    print(table(rows, args.precisions[0]))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\nbatch {args.batch} x {rows[0].seq} tokens, {args.threads} threads, {args.repeats} timed rounds after "
          f"one warm-up, {os.cpu_count()} CPUs, load average {load}")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
