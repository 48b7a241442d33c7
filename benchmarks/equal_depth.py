"""Early exit at equal rerank depth (issue 18): every configuration scores the SAME BM25 top-``hits`` candidates.

    python benchmarks/equal_depth.py --model MODEL --pair-model PAIR_MODEL --base BASE_DIR [--output FILE.md]

Quality (every test query; nDCG@10 by Pyserini's trec_eval, fused with BM25 as the manifest says): the exit scores of
``--model`` are recorded once per collection (one cascade call per query, ``--precision``), then full depth, every
fixed exit and the ``topk`` frontier are replayed exactly (``matryoshka.plugin.tuning``), all at depth ``hits``.

Timing (the first ``--timing-queries`` judged test queries of each collection; each configuration in a fresh
subprocess, per query as the CLI runs, one warm-up query, the median of ``--passes`` passes):

- ``hf-torch-fp32``: PyTorch ``BertForSequenceClassification`` on the base backbone (what a sentence-transformers
  ``CrossEncoder`` user runs), length-sorted batches of ``--batch-size`` with dynamic padding;
- ``hf-ort-*``: the same model exported plainly (``torch.onnx.export``), onnxruntime fp32 and dynamic int8, at batch
  ``--batch-size`` and at batch 1 (a sentence-transformers ONNX / FlashRank user); its head is untrained, so it has
  no nDCG, only speed;
- ``pair:...``: ``--pair-model``, the same checkpoint exported with the pair encoding (query padded, per pair);
- ``seg:PRECISION:POLICY``: ``--model`` with the segment encoding: fixed exits, the cascade at equal depth
  (``--cascade`` policies) and the shipped default (its own rerank depth: the depth cut shown apart).

Per configuration: nDCG@10 on the timed queries, pairs/s, ms/query p50/p95, peak RSS, useful GOP/s (layer FLOPs of
the unpadded tokens actually run, :func:`matryoshka.export.cost.layer_flops`) against this machine's GEMM peak
measured here (onnxruntime MatMul fp32 and MatMulInteger u8s8, 2048^2), and the share of wall time spent outside
the stage graphs (tokenizing, assembling, hand-off between stages), of which the stage hand-off alone (re-batching
the survivors' states, giving each batch its query's embedding). Writes a markdown report with the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
logger = logging.getLogger("equal_depth")


# ------------------------------------------------------------------------------------------------ plain baseline
def plain_export(base: Path, folder: Path) -> Path:
    """``BertForSequenceClassification(num_labels=1)`` on ``base`` (head seeded, untrained) as ONNX fp32 + dynamic
    int8 in ``folder`` (reused when present)."""
    if (folder / "int8.onnx").is_file():
        return folder
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1).eval()
    folder.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 16, dtype=torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(model, (ids, ids, torch.zeros_like(ids)), str(folder / "fp32.onnx"), dynamo=False,
                          opset_version=17, input_names=names, output_names=["logits"], dynamic_axes=axes)
    quantize_dynamic(str(folder / "fp32.onnx"), str(folder / "int8.onnx"), weight_type=QuantType.QInt8)
    return folder


def plain_batches(tokenizer, layout, query: str, texts: list[str], batch: int):
    """[CLS] q [SEP] p [SEP] with the query and passage cut as the matryoshka layout cuts them; length-sorted
    batches with dynamic padding. Yields (rows, input_ids, attention_mask, token_type_ids)."""
    q = tokenizer.encode(query, add_special_tokens=False).ids[: layout.query_budget]
    ps = [e.ids[: layout.passage_budget] for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    cls, sep = layout.prefix_ids[0], layout.query_suffix_ids[0]
    seqs = [[cls, *q, sep, *p, sep] for p in ps]
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    for i in range(0, len(order), batch):
        rows = order[i: i + batch]
        width = max(len(seqs[r]) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, : len(seqs[r])] = seqs[r]
            mask[j, : len(seqs[r])] = 1
            types[j, len(q) + 2: len(seqs[r])] = 1
        yield rows, ids, mask, types


# ------------------------------------------------------------------------------------------------ worker
def worker(config: str, args: argparse.Namespace, cache: Path, out: Path) -> None:
    """Time one configuration over the cached queries; write per-pass seconds, scores, layers, FLOPs, RSS."""
    from tokenizers import Tokenizer

    from matryoshka.export.cost import ModelDims, layer_flops
    from matryoshka.layout import PairLayout, prepare_tokenizer
    from matryoshka.plugin.manifest import load_manifest
    from matryoshka.plugin.session import StageSession

    data = json.loads(cache.read_text())
    manifest = load_manifest(args.model, verify=False)
    layout = PairLayout.from_dict(manifest.layout)
    tokenizer = prepare_tokenizer(Tokenizer.from_file(str(args.model / "tokenizer.json")))
    dims = ModelDims.from_hf_config(type("C", (), json.loads((args.base / "config.json").read_text()))())
    layers = manifest.model.num_layers
    inside, handoff = [0.0], [0.0]
    kind, _, rest = config.partition(":")
    if kind.startswith("hf-"):
        score = _plain_scorer(kind, args, layout, tokenizer)

        def flops(q: str, texts: list[str], _exits: np.ndarray) -> float:
            n_q = min(len(tokenizer.encode(q, add_special_tokens=False).ids), layout.query_budget)
            return sum(layers * layer_flops(n_q + min(len(e.ids), layout.passage_budget) + 3, dims)
                       for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    else:
        score = _matryoshka_scorer(kind, rest, args)
        StageSession.run = _timed(StageSession.run, inside)  # inside the stage graphs: the share outside them
        for owner, method in handoff_methods():
            setattr(owner, method, _timed(getattr(owner, method), handoff))

        def flops(q: str, texts: list[str], exit_layers: np.ndarray) -> float:
            n_q = min(len(tokenizer.encode(q, add_special_tokens=False).ids), layout.query_budget) + 2
            lens = [min(len(e.ids), layout.passage_budget) + 2 for e in
                    tokenizer.encode_batch(texts, add_special_tokens=False)]
            if kind == "pair":  # the pair encoding runs the padded query segment with every pair
                n_q, query_runs = layout.query_length, 0
            else:
                query_runs = int(exit_layers.max()) if len(exit_layers) else 0
            per_pair = sum(int(e) * layer_flops(n_q + length if kind == "pair" else length, dims)
                           for e, length in zip(exit_layers, lens, strict=False) if e > 0)
            return per_pair + query_runs * layer_flops(n_q, dims)  # segments: each query once per layer run

    queries = data["queries"]
    first = next(iter(queries.values()))
    score(first["text"], first["passages"][:8], first["docids"][:8], first["first_stage"][:8])  # warm-up
    passes, results, exit_layers, total_flops = [], {}, [], 0.0
    for p in range(args.passes):
        inside[0], handoff[0], seconds = 0.0, 0.0, []
        for qid, entry in queries.items():
            start = time.perf_counter()
            scores, layers_used = score(entry["text"], entry["passages"], entry["docids"], entry["first_stage"])
            seconds.append(time.perf_counter() - start)
            if p == 0:
                results[qid] = dict(zip(entry["docids"], map(float, scores), strict=True))
                exit_layers.extend(np.asarray(layers_used, float).tolist())
                total_flops += flops(entry["text"], entry["passages"], np.asarray(layers_used))
        passes.append({"seconds": seconds, "inside": inside[0], "handoff": handoff[0]})
    peak = _peak_rss_mib()
    out.write_text(json.dumps({"run": results, "passes": passes, "layers": exit_layers, "flops": total_flops,
                               "peak_mib": peak}))


def handoff_methods() -> tuple[tuple[type, str], ...]:
    """The runtime's stage hand-off, as (class, method) pairs the timing worker wraps."""
    from matryoshka.plugin.cascade import Cascade, _QueryStates

    return (Cascade, "_survivors"), (_QueryStates, "embeddings")


def _timed(function, total: list[float]):
    """``function`` adding its wall time to ``total[0]`` on every call (the stage graphs' time, the hand-off's)."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start
    return timed


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, which a fresh exec resets (ru_maxrss keeps the forking parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _plain_scorer(kind: str, args: argparse.Namespace, layout, tokenizer):
    if kind == "hf-torch-fp32":
        import torch
        from transformers import AutoModelForSequenceClassification

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(args.base), num_labels=1).eval()

        def run(ids, mask, types):
            with torch.inference_mode():
                return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             token_type_ids=torch.from_numpy(types)).logits.numpy()
        batch = args.batch_size
    else:  # hf-ort-PRECISION-bN
        import onnxruntime as ort

        _, _, precision, size = kind.split("-")
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(plain_export(args.base, args.work / "plain-export") / f"{precision}.onnx"),
                                       options, providers=["CPUExecutionProvider"])
        batch = int(size.removeprefix("b"))

        def run(ids, mask, types):
            return session.run(["logits"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]

    def score(q: str, texts: list[str], *_: object) -> tuple[np.ndarray, np.ndarray]:
        result = np.empty(len(texts))
        for rows, ids, mask, types in plain_batches(tokenizer, layout, q, texts, batch):
            result[rows] = np.asarray(run(ids, mask, types), np.float64).reshape(-1)
        return result, np.full(len(texts), 6)
    return score


def _matryoshka_scorer(kind: str, rest: str, args: argparse.Namespace):
    from matryoshka.plugin.api import MatryoshkaReranker

    folder = args.pair_model if kind == "pair" else args.model
    precision, _, policy = rest.partition(":")
    name, _, value = policy.partition("@")
    if name == "fixed":
        options: dict = {"policy": "fixed", "exit_layer": int(value)}
    elif name == "default":
        options = {}
    else:
        options = {"policy": name, "threshold": float(value)}
    depth = None if name == "default" else 0  # 0 = every candidate (equal depth); None = the manifest's depth
    reranker = MatryoshkaReranker(folder, precision=precision, threads=args.threads, batch_size=args.batch_size,
                                  **options)

    def score(q: str, texts: list[str], docids: list[str], first: list[float]) -> tuple[np.ndarray, np.ndarray]:
        out = reranker.rerank_query(q, docids, texts, depth=depth, first_stage_scores=first)
        scored = reranker.last_result.exit_layer if reranker.last_result is not None else []
        layers = np.zeros(len(docids))
        layers[: len(scored)] = scored
        return np.array([out[d] for d in docids]), layers
    return score


# ------------------------------------------------------------------------------------------------ parent
def gemm_peak(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GOP/s of onnxruntime MatMul (fp32) and MatMulInteger (u8 x s8) on ``size``^2 matrices, median of runs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    peaks = {}
    for name, op, ta, tb in (("fp32", "MatMul", TensorProto.FLOAT, TensorProto.FLOAT),
                             ("int8", "MatMulInteger", TensorProto.UINT8, TensorProto.INT8)):
        out_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
        graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], name,
                                  [helper.make_tensor_value_info("a", ta, [size, size]),
                                   helper.make_tensor_value_info("b", tb, [size, size])],
                                  [helper.make_tensor_value_info("c", out_type, [size, size])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        a = rng.random((size, size), np.float32) if name == "fp32" else rng.integers(0, 255, (size, size), np.uint8)
        b = rng.random((size, size), np.float32) if name == "fp32" else rng.integers(-127, 127, (size, size), np.int8)
        session.run(None, {"a": a, "b": b})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, {"a": a, "b": b})
            times.append(time.perf_counter() - start)
        peaks[name] = 2 * size ** 3 / statistics.median(times) / 1e9
    return peaks


def parse(argv: list[str]) -> argparse.Namespace:
    from benchmarks.bench_worker import add_data_root_argument

    p = argparse.ArgumentParser(description="early exit at equal rerank depth, side by side (issue 18)")
    p.add_argument("--model", type=Path, default=REPO / "plugin" / "default_model", help="segment-encoded model")
    p.add_argument("--pair-model", type=Path, default=None, help="the same checkpoint, pair-encoded (optional)")
    p.add_argument("--base", type=Path, required=True, help="the base backbone's HF folder (plain baseline)")
    p.add_argument("--datasets", nargs="+", default=["scifact", "nfcorpus"])
    p.add_argument("--timed-datasets", nargs="*", default=["scifact", "nfcorpus"],
                   help="the datasets also timed (the others: quality only)")
    p.add_argument("--hits", type=int, default=100)
    p.add_argument("--precision", default="int8", help="precision of the recorded quality pass")
    p.add_argument("--cascade", nargs="+", default=["topk@0.8", "topk@0.85", "topk@0.9"],
                   help="cascade points timed at equal depth (POLICY@THRESHOLD)")
    p.add_argument("--frontier", nargs="+", type=float,
                   default=[0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95], help="topk thresholds replayed")
    p.add_argument("--timing-queries", type=int, default=10)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip", nargs="*", default=[], help="timing configurations to leave out")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "work")
    add_data_root_argument(p)
    p.add_argument("--output", type=Path, default=None, help="write the markdown report here")
    return p.parse_args(argv)


def quality(name: str, args: argparse.Namespace) -> tuple[list[str], dict]:
    """Recorded exit scores of every test query; full depth, fixed exits, the topk frontier, all at depth hits."""
    from benchmarks.bench_worker import evaluate_run, require_dataset
    from matryoshka.io import read_run
    from matryoshka.pipeline import bm25_search, prepare_beir, trec_eval
    from matryoshka.plugin.cascade import Cascade
    from matryoshka.plugin.policies import make_policy
    from matryoshka.plugin.tuning import Recorded, record_run

    prepared = prepare_beir(require_dataset(name), "test", args.work)
    bm25_path = bm25_search(prepared.index_dir, prepared.topics, args.work / f"bm25-{name}-test-{args.hits}.txt",
                            hits=args.hits)
    bm25 = read_run(bm25_path)
    texts = {e.docid: prepared.dataset.corpus[e.docid].contents for es in bm25.queries.values() for e in es}
    cascade = Cascade(args.model, precision=args.precision, threads=args.threads, batch_size=args.batch_size)
    cache = args.work / f"equal-depth-{name}-{args.precision}.npz"
    key = f"{cascade.manifest.stages[-1].files[args.precision].sha256}-{bm25_path.stat().st_size}"
    recorded = Recorded.load(cache, key)
    if recorded is None:
        recorded = record_run(cascade, bm25.queries, prepared.dataset.queries, texts)
        recorded.save(cache, key)
    policy = cascade.manifest.policy
    w, exits, tmp = policy.first_stage_weight, cascade.exits, Path(tempfile.mkdtemp())
    ndcg = lambda final, tag: evaluate_run(recorded.to_run(final), prepared.qrels, tmp, tag)["ndcg_cut_10"]  # noqa: E731
    full = ndcg(recorded.replay(make_policy("fixed", None, exits, 1.0, exit_layer=exits[-1]), w)[0], "full")
    lines = [f"\n**{name}** test, {len(set(recorded.qids))} queries x BM25 top-{args.hits} ({len(recorded.docids)} "
             f"pairs), {args.precision} stages, fused w={w:g} {policy.fusion}; BM25 "
             f"{trec_eval(prepared.qrels, bm25_path)['ndcg_cut_10']:.4f}\n",
             "| configuration (all candidates) | nDCG@10 | share of full depth | mean layers | layer-FLOPs |",
             "|---|---|---|---|---|"]
    points = {}
    for label, chosen in ([(f"fixed exit {e}", make_policy("fixed", None, exits, 1.0, exit_layer=e)) for e in exits]
                          + [(f"topk@{t:g}", make_policy("topk", t, exits, t)) for t in args.frontier]):
        final, stage = recorded.replay(chosen, w)
        value = ndcg(final, label.replace(" ", "-").replace("@", "-"))
        layers, cost = recorded.layers_and_cost(stage)
        points[label] = value / full
        lines.append(f"| {label} | {value:.4f} | {value / full:.1%} | {layers:.2f} | {cost:.1%} |")
    final, stage = recorded.replay(make_policy(policy.name, policy.threshold, exits, policy.threshold), w,
                                   policy.depth)
    value = ndcg(final, "default")
    layers, cost = recorded.layers_and_cost(stage)
    lines.append(f"| shipped default {policy.name}@{policy.threshold:g}, depth {policy.depth or 'all'} (depth cut) "
                 f"| {value:.4f} | {value / full:.1%} | {layers:.2f} | {cost:.1%} |")
    qids = [q for q in recorded.qids if q in prepared.dataset.qrels]
    qids = list(dict.fromkeys(qids))[: args.timing_queries]
    first = {q: {e.docid: e.score for e in bm25.queries[q]} for q in qids}
    timing = {q: {"text": prepared.dataset.queries[q], "docids": [e.docid for e in bm25.queries[q]],
                  "passages": [texts[e.docid] for e in bm25.queries[q]],
                  "first_stage": [first[q][e.docid] for e in bm25.queries[q]]} for q in qids}
    return lines, {"queries": timing, "qrels": {q: prepared.dataset.qrels[q] for q in qids}, "points": points}


def timing_configs(args: argparse.Namespace) -> list[tuple[str, str]]:
    from matryoshka.plugin.manifest import load_manifest

    manifest = load_manifest(args.model, verify=False)
    configs = [("hf-torch-fp32", f"PyTorch fp32, plain HF cross-encoder, batch {args.batch_size}"),
               (f"hf-ort-fp32-b{args.batch_size}", f"plain HF export, ORT fp32, batch {args.batch_size}"),
               (f"hf-ort-int8-b{args.batch_size}", f"plain HF export, ORT dynamic int8, batch {args.batch_size}"),
               ("hf-ort-int8-b1", "plain HF export, ORT dynamic int8, batch 1")]
    if args.pair_model is not None:
        configs.append((f"pair:fp32:fixed@{manifest.exits[-1]}", "ours, pair encoding (previous runtime), fp32, "
                        "full depth"))
    for precision in [p for p in ("fp32", "int8") if p in manifest.precisions]:
        configs.append((f"seg:{precision}:fixed@{manifest.exits[-1]}", f"ours, segments, {precision}, full depth"))
    for e in manifest.exits[:-1]:
        configs.append((f"seg:{args.precision}:fixed@{e}", f"ours, segments, {args.precision}, fixed exit {e}"))
    for point in args.cascade:
        configs.append((f"seg:{args.precision}:{point}", f"ours, segments, {args.precision}, cascade {point}"))
    policy = manifest.policy
    configs.append((f"seg:{manifest.default_precision}:default", f"ours, shipped default ({policy.name}@"
                    f"{policy.threshold:g}, depth {policy.depth or 'all'}: depth cut)"))
    return [(c, label) for c, label in configs if c not in args.skip]


def timing(name: str, context: dict, args: argparse.Namespace, peaks: dict[str, float]) -> list[str]:
    from benchmarks.bench_worker import evaluate_run
    from matryoshka.io import write_trec_qrels

    tmp = Path(tempfile.mkdtemp())
    cache, qrels = tmp / "cache.json", tmp / "qrels.txt"
    cache.write_text(json.dumps({"queries": context["queries"]}))
    write_trec_qrels(qrels, context["qrels"])
    n_pairs = sum(len(e["docids"]) for e in context["queries"].values())
    results = {}
    for config, label in timing_configs(args):
        out = tmp / f"{config.replace(':', '_').replace('@', '_')}.json"
        logger.info("%s: timing %s", name, config)
        subprocess.run([sys.executable, __file__, "_worker", config, str(cache), str(out), *args.argv], check=True)
        results[config] = (label, json.loads(out.read_text()))
    wall = {c: statistics.median(sum(p["seconds"]) for p in r["passes"]) for c, (_, r) in results.items()}
    plain = [c for c in results if c.startswith("hf-ort-")]
    fastest = min(plain, key=lambda c: wall[c]) if plain else None
    lines = [f"\n**{name}**, first {len(context['queries'])} judged test queries x BM25 top-{args.hits} = {n_pairs} "
             f"pairs, every configuration on the same pairs (depth {args.hits}) except the shipped default; "
             f"{args.threads} threads; median of {args.passes} passes after a warm-up; x = pairs/s over the fastest "
             f"plain export ({results[fastest][0] if fastest else '-'})\n",
             "| configuration | nDCG@10 | mean layers | pairs/s | x plain | ms/query p50 | p95 | peak RSS MiB | "
             "GOP/s (% of peak) | outside graphs | hand-off |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for config, (label, res) in results.items():
        seconds = min(res["passes"], key=lambda p: abs(sum(p["seconds"]) - wall[config]))
        ms = np.asarray(seconds["seconds"]) * 1000
        ndcg = ("untrained head" if config.startswith("hf-")
                else f"{evaluate_run(res['run'], qrels, tmp, config.replace(':', '_'))['ndcg_cut_10']:.4f}")
        peak = peaks["int8" if "int8" in config else "fp32"]
        gops = res["flops"] / wall[config] / 1e9
        outside = "-" if config.startswith("hf-") else f"{1 - seconds['inside'] / sum(seconds['seconds']):.1%}"
        handoff = "-" if config.startswith("hf-") else f"{seconds['handoff'] / sum(seconds['seconds']):.1%}"
        speed = f"{wall[fastest] / wall[config]:.2f}" if fastest else "-"
        lines.append(f"| {label} | {ndcg} | {np.mean(res['layers']):.2f} | {n_pairs / wall[config]:.1f} | {speed} | "
                     f"{np.percentile(ms, 50):.0f} | {np.percentile(ms, 95):.0f} | {res['peak_mib']:.0f} | "
                     f"{gops:.0f} ({gops / peak:.0%}) | {outside} | {handoff} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        config, cache, out, *rest = argv[1:]
        worker(config, parse(rest), Path(cache), Path(out))
        return 0
    args = parse(argv)
    from benchmarks.bench_worker import set_data_roots

    set_data_roots(args.data_root)
    args.argv = argv
    args.work.mkdir(parents=True, exist_ok=True)
    peaks = gemm_peak(args.threads)
    lines = [f"onnxruntime GEMM peak here ({args.threads} threads, 2048^2, median of 5): fp32 {peaks['fp32']:.0f} "
             f"GFLOP/s, int8 (u8 x s8) {peaks['int8']:.0f} GOP/s; load average {os.getloadavg()[0]:.2f}"]
    for name in args.datasets:
        table, context = quality(name, args)
        lines += table
        if name in args.timed_datasets:
            lines += timing(name, context, args, peaks)
    command = "python benchmarks/equal_depth.py " + " ".join(shlex.quote(a) for a in argv)
    report = "\n".join([f"Command: `{command}`\n", *lines]) + "\n"
    print(report)
    if args.output is not None:
        from matryoshka.io.atomic import atomic_write

        with atomic_write(args.output) as handle:
            handle.write(report)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    sys.exit(main())
