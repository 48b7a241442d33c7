"""Static (calibrated, QDQ) int8 stages against the shipped dynamic int8 and fp32 stages (issue 18 lever).

Feeds are captured from the real cascade (every stage run at full depth on the first ``--queries`` queries of a
BM25 run); the first ``--calibration`` calls of each stage calibrate ORT's ``quantize_static`` (MinMax, per-channel
s8 weights, u8 activations, MatMul only), the rest are timed and compared with fp32, each session on the same
feeds in one process. Writes a markdown table to ``--output``::

    python benchmarks/static_int8.py --model plugin/default_model --run RUN --topics TOPICS --corpus CORPUS.jsonl \
        --output benchmarks/results/static_int8.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from matryoshka.errors import OptionError, cli_main  # noqa: E402
from matryoshka.io import read_run, read_topics  # noqa: E402
from matryoshka.io.beir import load_corpus  # noqa: E402


def capture(model: Path, run_path: Path, topics_path: Path, corpus_path: Path, queries: int,
            threads: int) -> dict[str, list[dict[str, np.ndarray]]]:
    from matryoshka.plugin import session as stage_session
    from matryoshka.plugin.cascade import Cascade
    from matryoshka.plugin.policies import make_policy

    corpus, topics = load_corpus(corpus_path), read_topics(topics_path)
    chosen = list(read_run(run_path).queries.items())[:queries]
    run = {qid: [entry.docid for entry in entries] for qid, entries in chosen}
    missing_query = next((qid for qid in run if qid not in topics), None)
    if missing_query is not None:
        raise OptionError("--topics", str(topics_path), f"a topic for every run query (no {missing_query!r})")
    missing_doc = next((d for docs in run.values() for d in docs if d not in corpus), None)
    if missing_doc is not None:
        raise OptionError("--corpus", str(corpus_path), f"every docid of the run (no {missing_doc!r})")
    captured: dict[str, list[dict[str, np.ndarray]]] = {}
    original = stage_session.StageSession.run

    def recording(self, feeds, fetch=None):
        captured.setdefault(self.path.name, []).append({k: np.array(v) for k, v in feeds.items()})
        return original(self, feeds, fetch)

    cascade = Cascade(model, precision="fp32", threads=threads)
    policy = make_policy("fixed", None, cascade.exits, 0.9, exit_layer=cascade.exits[-1])
    stage_session.StageSession.run = recording
    try:
        for qid, docs in run.items():
            cascade.run([topics[qid]] * len(docs), [corpus[d].contents for d in docs], policy,
                        np.zeros(len(docs), int))
    finally:
        stage_session.StageSession.run = original
    return captured


@cli_main
def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "plugin" / "default_model")
    p.add_argument("--run", type=Path, required=True, help="BM25 run (TREC) of the queries")
    p.add_argument("--topics", type=Path, required=True, help="topics TSV (qid<TAB>text)")
    p.add_argument("--corpus", type=Path, required=True, help="BEIR corpus.jsonl of the run's docids")
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--calibration", type=int, default=40, help="stage calls used for calibration")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    for name in ("queries", "calibration"):
        if getattr(args, name) < 1:
            raise OptionError(f"--{name}", getattr(args, name), "an integer >= 1")
    captured = capture(args.model, args.run, args.topics, args.corpus, args.queries, args.threads)

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    lines = [f"Command: `python benchmarks/static_int8.py {shlex.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"Feeds captured from the cascade at full depth, {args.queries} queries x their run's candidates; "
             f"{args.calibration} calls per stage calibrate, the rest are timed (one pass, {args.threads} threads) "
             "and compared with fp32 on the stage's `score`.", "",
             "| stage | precision | calls timed | rows/s | max abs diff | std(diff) / std(score) |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for stage in sorted(captured):
            fp32 = args.model / "fp32" / stage
            names = [i.name for i in ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
                     .get_inputs()]
            feeds = [{n: f[n] for n in names} for f in captured[stage]]
            calibration, timed = feeds[:args.calibration], feeds[args.calibration:]
            if not timed:
                raise OptionError("--calibration", args.calibration, f"fewer than the {len(feeds)} calls of {stage} "
                                  "(the rest are timed): lower it or raise --queries")
            static = Path(tmp) / stage
            quantize_static(str(fp32), str(static), Reader(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            op_types_to_quantize=["MatMul"], calibrate_method=CalibrationMethod.MinMax)
            reference = None
            for name, path in (("fp32", fp32), ("dynamic int8 (shipped)", args.model / "int8" / stage),
                               ("static int8 (QDQ)", static)):
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                session.run(["score"], timed[0])
                start = time.perf_counter()
                scores = [session.run(["score"], f)[0].ravel() for f in timed]
                seconds = time.perf_counter() - start
                scores = np.concatenate(scores)
                reference = scores if reference is None else reference
                diff = scores - reference
                rows = sum(f[names[0]].shape[0] for f in timed)
                lines.append(f"| {stage} | {name} | {len(timed)} | {rows / seconds:.1f} | {np.abs(diff).max():.3f} | "
                             f"{diff.std() / reference.std():.3f} |")
    from benchmarks.bench_worker import publish

    return publish(args.output, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
