"""Quality per exit of segment-attention rerankers from cached segment means (PyTorch fp32), for ablations.

For each collection: Pyserini BM25 top-``depth`` of the split's queries, then on the same candidates: BM25; the
bi-encoder's cosine alone (``--encoder``, 256 tokens per text, as the training-free baseline defines it); the
training-free fusion ``0.3 * minmax(BM25) + 0.7 * minmax(cosine)``; and for every ``--models`` folder (trained
reranker folders, or ``base`` = the untrained build of ``--encoder``) every exit alone and fused as the plugin fuses
(first-stage weight ``--weight``, normalisations ``--fusion``: z and/or minmax); with ``--manifest``, that exported
model's tuned cascade replayed on the last model's scores, and each ``--cascades`` point (``policy@threshold[:depth]``,
depth ``all`` by default) replayed with that manifest's exits, calibration and fusion. Scores come from
:class:`matryoshka.training.segment_cache.SegmentCache` (tested equal to the pair forward), nDCG@10 from
:mod:`matryoshka.metrics` (trec_eval conventions; the shipped model's figures also come from real plugin runs
through trec_eval, see BENCHMARKS.md).

    python benchmarks/segment_eval.py --encoder <all-MiniLM-L6-v2> --models base runs/recipe/heads/model \
        --datasets scifact nfcorpus adi cisi cranfield med --output benchmarks/results/segments.md
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_worker import add_data_root_argument, publish, require_dataset, set_data_roots  # noqa: E402
from matryoshka.errors import OptionError, cli_main  # noqa: E402

Scores = dict[str, dict[str, float]]
FUSION_BM25_WEIGHT = 0.3  # the training-free baseline of issue 15: 0.3 * minmax(BM25) + 0.7 * minmax(cosine)
# the untrained ('base') model: every layer an exit, 128-token query segment + 256-token passage segment (the recipe's)
BASE_EXITS, BASE_MAX_LENGTH, BASE_QUERY_LENGTH = (1, 2, 3, 4, 5, 6), 384, 128


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/segment_eval.py", description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="the bi-encoder folder (baselines; 'base' model)")
    parser.add_argument("--models", nargs="+", default=["base"], help="reranker folders, or 'base'")
    parser.add_argument("--datasets", nargs="+", required=True, help="names under data/, ../shared/data(/classic)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--weight", type=float, default=0.3, help="plugin fusion first-stage weight")
    parser.add_argument("--fusion", nargs="+", default=["z", "minmax"], help="plugin fusion normalisations")
    parser.add_argument("--work", default="runs/work", help="Pyserini index/topics/run folder")
    add_data_root_argument(parser)
    parser.add_argument("--cache", default="runs/work/segment-cache", help="segment-means cache folder")
    parser.add_argument("--output", required=True, help="markdown table to write")
    parser.add_argument("--manifest", default=None, help="an exported model folder: replay its tuned cascade (policy,"
                        " threshold, depth, first-stage weight, exits) on the LAST --models folder's scores")
    parser.add_argument("--cascades", nargs="*", default=[], metavar="POLICY@T[:DEPTH]",
                        help="more cascade points to replay with --manifest (e.g. topk@0.8 topk@0.9:20; depth "
                             "'all' when left out)")
    return parser


def parse_cascade(text: str) -> tuple[str, float, int | None]:
    """``policy@threshold[:depth]`` -> (policy, threshold, depth or None = every candidate)."""
    from matryoshka.plugin.policies import POLICIES

    point, _, depth = text.partition(":")
    name, _, threshold = point.partition("@")
    try:
        value = float(threshold)
        rerank_depth = None if depth in ("", "all") else int(depth)
    except ValueError:
        raise OptionError("cascades", text, "policy@threshold[:depth], e.g. topk@0.8 or topk@0.9:20") from None
    if name not in POLICIES or (rerank_depth is not None and rerank_depth < 1):
        raise OptionError("cascades", text, f"a policy among {', '.join(POLICIES)} and a depth >= 1 or 'all'")
    return name, value, rerank_depth


def bm25_hits(name: str, split: str, depth: int, work: Path):
    from matryoshka.io import read_run
    from matryoshka.pipeline import bm25_search, prepare_beir

    folder = require_dataset(name)
    prepared = prepare_beir(folder, split, work)
    run = work / "runs" / f"segment-eval-{name}-{split}-bm25-{depth}.txt"
    if not run.is_file():
        bm25_search(prepared.index_dir, prepared.topics, run, hits=depth)
    hits = {q: {e.docid: float(e.score) for e in entries[:depth]} for q, entries in read_run(run).queries.items()}
    return prepared.dataset, hits


def fuse_plugin(first: Scores, model: Scores, weight: float, fusion: str) -> Scores:
    """Per query ``(1 - weight) * n(model) + weight * n(first)``, as the plugin fuses (``fusion`` names ``n``)."""
    from matryoshka.plugin.fusion import fuse

    out = {}
    for qid, docs in first.items():
        ids = sorted(docs)
        fused = fuse([model[qid][d] for d in ids], [docs[d] for d in ids], weight, fusion=fusion)
        out[qid] = dict(zip(ids, fused.tolist(), strict=True))
    return out


def model_scores(model_ref: str, encoder: str, dataset, hits: Scores, cache_dir: Path) -> dict[int, Scores]:
    import torch

    from matryoshka.training.modeling import LayerwiseReranker
    from matryoshka.training.segment_cache import SegmentCache, exit_scores

    model = (LayerwiseReranker.build(encoder, exits=BASE_EXITS, max_length=BASE_MAX_LENGTH,
                                     query_length=BASE_QUERY_LENGTH, readout="cosine", attention="segments")
             if model_ref == "base" else LayerwiseReranker.load(model_ref)).eval()
    cache = SegmentCache(model, cache_dir)
    queries = cache.keyed({q: dataset.queries[q] for q in hits}, "query")
    docs = sorted({d for h in hits.values() for d in h})
    passages = cache.keyed({d: dataset.corpus[d].contents for d in docs}, "passage")
    out: dict[int, Scores] = {e: {} for e in model.config.exits}
    with torch.no_grad():
        for qid, cand in hits.items():
            ids = list(cand)
            scores = exit_scores(model, torch.from_numpy(queries[qid])[None],
                                 torch.from_numpy(np.stack([passages[d] for d in ids])))
            for index, exit_layer in enumerate(model.config.exits):
                out[exit_layer][qid] = dict(zip(ids, scores[index].tolist(), strict=True))
    return out


def cosine_baseline(encoder: str, dataset, hits: Scores, cache_dir: Path) -> Scores:
    """The bi-encoder's cosine, each text alone and truncated to 256 tokens with [CLS]/[SEP]. Queries are encoded
    with :class:`~matryoshka.training.teacher.BiEncoder`; passages are the cached final-layer means of the passage
    segment, which hold exactly those 254 text tokens (the segment is 256 long) and equal the bi-encoder's mean
    (``tests/test_training_segments.py``), so the test corpora are encoded once, not twice."""
    from matryoshka.training.modeling import LayerwiseReranker
    from matryoshka.training.segment_cache import SegmentCache
    from matryoshka.training.teacher import BiEncoder

    base = LayerwiseReranker.build(encoder, exits=BASE_EXITS, max_length=BASE_MAX_LENGTH,
                                   query_length=BASE_QUERY_LENGTH, readout="cosine", attention="segments").eval()
    cache = SegmentCache(base, cache_dir)
    docs = sorted({d for h in hits.values() for d in h})
    passages = cache.keyed({d: dataset.corpus[d].contents for d in docs}, "passage")
    query_vectors = BiEncoder(encoder, max_length=256, cache_dir=None).encode([dataset.queries[q] for q in hits])
    out = {}
    for vector, (qid, cand) in zip(query_vectors, hits.items(), strict=True):
        rows = np.stack([passages[d][-1] for d in cand])
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        out[qid] = dict(zip(cand, (rows @ vector).tolist(), strict=True))
    return out


def cascade_rows(folder: str, per_exit: Mapping[int, Scores], hits: Scores, qrels,
                 extra: Sequence[str] = ()) -> list[tuple[str, float]]:
    """The manifest's tuned cascade, then each ``extra`` point, replayed (:class:`matryoshka.plugin.tuning.Recorded`,
    tested equal to real cascade runs) on the given per-exit scores: nDCG@10, share of full depth, layer-FLOPs."""
    from matryoshka.plugin.manifest import load_manifest
    from matryoshka.plugin.policies import make_policy
    from matryoshka.plugin.tuning import Recorded

    manifest = load_manifest(folder, verify=False)
    exits, spec = tuple(manifest.exits), manifest.policy
    qids = [q for q in hits for _ in hits[q]]
    docids = [d for q in hits for d in hits[q]]
    groups = np.array([g for g, q in enumerate(hits) for _ in hits[q]], dtype=np.int64)
    scores = np.array([[per_exit[e][q][d] for e in exits] for q, d in zip(qids, docids, strict=True)])
    first = np.array([hits[q][d] for q, d in zip(qids, docids, strict=True)])
    cost = np.array([s.relative_cost for s in manifest.stages]).cumsum()
    residual = tuple(manifest.exit_calibration(e).residual_std for e in exits)
    recorded = Recorded(qids, docids, groups, scores, exits, residual, cost, first, fusion=spec.fusion)
    full = recorded.full_depth_ndcg(qrels, spec.first_stage_weight)
    fusion = f"{spec.fusion}, w={spec.first_stage_weight:g}"
    rows = [(f"exits {list(exits)} full depth + BM25 ({fusion})", full)]
    points = [("tuned cascade", spec.name, spec.threshold, spec.depth)]
    points += [(f"cascade {text}", *parse_cascade(text)) for text in extra]
    for title, name, threshold, depth in points:
        policy = make_policy(name, threshold, exits, threshold)
        point = recorded.evaluate(policy, qrels, 1.0, spec.first_stage_weight, depth)
        label = f"{name}@{threshold:g}, depth {depth or 'all'}"
        rows += [(f"{title} ({label}, {fusion})", point.ndcg10), (f"{title} ({label}): of full depth",
                                                                  point.ndcg10 / full),
                 (f"{title} ({label}): layer-FLOPs", point.relative_cost)]
    return rows


def rows_for(name: str, args: argparse.Namespace) -> list[tuple[str, float]]:
    from matryoshka.metrics import ndcg_at_k

    work = Path(args.work)
    dataset, hits = bm25_hits(name, args.split, args.depth, work)
    hits = {q: h for q, h in hits.items() if q in dataset.qrels}
    cosine = cosine_baseline(args.encoder, dataset, hits, Path(args.cache))
    rows = [("BM25", ndcg_at_k(hits, dataset.qrels)), ("cosine alone", ndcg_at_k(cosine, dataset.qrels)),
            ("training-free fusion (minmax 0.3/0.7)",
             ndcg_at_k(fuse_plugin(hits, cosine, FUSION_BM25_WEIGHT, "minmax"), dataset.qrels))]
    for ref in args.models:
        label = "untrained" if ref == "base" else Path(ref).name
        per_exit = model_scores(ref, args.encoder, dataset, hits, Path(args.cache))
        for exit_layer, scores in per_exit.items():
            rows.append((f"{label} exit {exit_layer} alone", ndcg_at_k(scores, dataset.qrels)))
            for fusion in args.fusion:
                rows.append((f"{label} exit {exit_layer} + BM25 ({fusion}, w={args.weight:g})",
                             ndcg_at_k(fuse_plugin(hits, scores, args.weight, fusion), dataset.qrels)))
    if args.manifest:
        rows += cascade_rows(args.manifest, per_exit, hits, dataset.qrels, args.cascades)
    return rows


def table(results: Mapping[str, Sequence[tuple[str, float]]], command: str) -> str:
    names = list(results)
    labels = [label for label, _ in results[names[0]]]
    lines = [f"Command: `{command}`", "", "nDCG@10, BM25 top-100 reranked (PyTorch fp32 from cached segment means)", "",
             "| run | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, label in enumerate(labels):
        lines.append(f"| {label} | " + " | ".join(f"{results[n][i][1]:.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    set_data_roots(args.data_root)
    if args.cascades and not args.manifest:
        raise OptionError("cascades", " ".join(args.cascades), "a --manifest too (its exits and fusion are used)")
    for text in args.cascades:
        parse_cascade(text)
    results = {name: rows_for(name, args) for name in args.datasets}
    command = "python benchmarks/segment_eval.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return publish(args.output, table(results, command))


if __name__ == "__main__":
    sys.exit(main())
