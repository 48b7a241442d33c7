"""``python -m matryoshka.training.dense.select``: pick a dense checkpoint on a *dev* split (never on test).

Each candidate (a saved dense model folder, e.g. ``<output_dir>/checkpoint-N/model``) and the base model are scored
by exact (brute-force) dense retrieval over the whole corpus of a BEIR folder, on the queries of ``--split``:
nDCG@10 (graded gains, trec_eval's formula) and R@100. With ``--soups L ...`` every candidate is also tried as a
weight-space interpolation with the base model, ``base + L * (candidate - base)`` (WiSE-FT / model soup: keeps the
base model's general ranking while taking part of what fine-tuning learned). Documents are encoded as
``pyserini.encode`` does (``title text``, passage prefix, ``--max_length`` tokens), queries untruncated up to the
model's own limit, as ``pyserini.search.faiss`` encodes them. A candidate trained in ``corpus`` mode (query-side
fine-tuning) encodes documents with its frozen passage encoder; when that is the base model, the base model's
document vectors are reused.

The scores go to ``--output`` (JSON) and the best candidate that is not the base model to ``--save_best`` as a
dense model folder (written atomically; the JSON says whether it beats the base model, and a copy goes into that
folder as ``selection.json``)::

    python -m matryoshka.training.dense.select --data /work/shared/data/nfcorpus --split dev \
        --base <all-MiniLM-L6-v2 dir> --candidates runs/dense/checkpoint-21/model runs/dense/model \
        --soups 0.5 --output runs/dense/select.json --save_best runs/dense/selected
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from matryoshka.errors import MissingInputError, OptionError, cli_main
from matryoshka.io import atomic_write
from matryoshka.metrics import ndcg_of_ranking

if TYPE_CHECKING:  # torch-heavy: imported where used
    from matryoshka.training.dense.config import DenseConfig
    from matryoshka.training.dense.modeling import BiEncoder

logger = logging.getLogger(__name__)
#: the selection summary, also written into the ``--save_best`` folder
SELECTION_FILE = "selection.json"


#: trec_eval's ``ndcg_cut.k`` of one ranking, shared with the rest of the project
ndcg_at = ndcg_of_ranking


def recall_at(ranked: Sequence[str], judged: dict[str, int], k: int = 100) -> float:
    relevant = {d for d, g in judged.items() if g > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def soup(base_state: dict, tuned_state: dict, weight: float) -> dict:
    """``base + weight * (tuned - base)`` for floating-point tensors (others are taken from ``tuned``)."""
    from matryoshka.training.soup import interpolate_states

    return interpolate_states(base_state, tuned_state, weight, option="--soups")


def same_weights(a, b) -> bool:
    """Whether two bi-encoders hold identical backbone weights (then their document vectors are the same)."""
    from matryoshka.training.dense.modeling import equal_state_dicts

    return equal_state_dicts(a.backbone.state_dict(), b.backbone.state_dict())


def base_encoder(base: Path, settings: DenseConfig, passage_max_length: int) -> BiEncoder:
    """The base model as a bi-encoder with a tuned model's settings (pooling, normalisation, prefixes, lengths):
    the starting point of its soups and the encoder of the base index."""
    from matryoshka.training.dense.modeling import BiEncoder

    return BiEncoder.build(base, pooling=settings.pooling, normalize=settings.normalize,
                           query_prefix=settings.query_prefix, passage_prefix=settings.passage_prefix,
                           query_max_length=settings.query_max_length, passage_max_length=passage_max_length)


def frozen_base(tuned: BiEncoder, base: BiEncoder) -> bool:
    """Whether ``tuned`` is a query-side fine-tune whose frozen passage encoder is ``base`` (then it, and every soup
    of it with ``base``, encodes documents as ``base`` does)."""
    return tuned.passage_source is not None and same_weights(tuned.passage_model(), base)


def evaluate(model, doc_ids: list[str], doc_texts: list[str], queries: dict[str, str],
             qrels: dict[str, dict[str, int]], batch_size: int, depth: int = 100, docs=None) -> dict[str, float]:
    import torch

    model.eval()
    start = time.time()
    if docs is None:
        docs = model.encode_texts(doc_texts, "passage", batch_size=batch_size)
    qids = list(queries)
    q = model.encode_texts([queries[i] for i in qids], "query", batch_size=batch_size)
    top = torch.topk(q @ docs.T, k=min(depth, len(doc_ids)), dim=1).indices.tolist()
    runs = {qid: [doc_ids[j] for j in row] for qid, row in zip(qids, top, strict=True)}
    ndcg = sum(ndcg_at(runs[qid], qrels[qid]) for qid in qids) / len(qids)
    recall = sum(recall_at(runs[qid], qrels[qid], depth) for qid in qids) / len(qids)
    return {"nDCG@10": round(ndcg, 4), f"R@{depth}": round(recall, 4), "seconds": round(time.time() - start, 1)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m matryoshka.training.dense.select",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default="dev", help="qrels split to select on (never test)")
    p.add_argument("--base", type=Path, required=True, help="the model fine-tuning started from (plain HF folder "
                   "or dense model); scored as 'base'")
    p.add_argument("--base_index", type=Path, default=None,
                   help="Faiss index of the corpus made with the base model: scores 'base' without re-encoding")
    p.add_argument("--candidates", type=Path, nargs="+", required=True, help="saved dense model folders")
    p.add_argument("--soups", type=float, nargs="*", default=[],
                   help="also try base + L * (candidate - base) for each L in (0, 1)")
    p.add_argument("--max_length", type=int, default=256, help="passage tokens when encoding the corpus")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--output", type=Path, required=True, help="JSON with every candidate's scores")
    p.add_argument("--save_best", type=Path, default=None, help="write the best non-base candidate here")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return select(args)


def select(args: argparse.Namespace) -> int:
    import torch

    from matryoshka.io.beir import load_beir
    from matryoshka.training.dense.config import DenseConfig
    from matryoshka.training.dense.corpus import read_faiss_vectors
    from matryoshka.training.dense.modeling import BiEncoder

    if args.split == "test":
        raise OptionError("--split", args.split, "a dev or held-out split: selecting on test leaks into the results")
    if any(not 0.0 < w < 1.0 for w in args.soups):
        raise OptionError("--soups", args.soups, "weights strictly between 0 and 1")
    for folder in args.candidates:
        if not DenseConfig.exists(folder):
            raise MissingInputError(folder / "dense_config.json", "dense model folder",
                                    "pass folders saved by python -m matryoshka.training.dense")
    torch.set_num_threads(args.threads)
    data = load_beir(args.data, args.split)
    queries = data.split_queries
    # longest documents first in similar-length batches: less padding, same vectors
    docs = sorted(data.corpus.values(), key=lambda d: -len(d.contents))
    doc_ids, doc_texts = [d.docid for d in docs], [d.contents for d in docs]

    first = BiEncoder.load(args.candidates[0])
    settings = first.config
    base = base_encoder(args.base, settings, args.max_length)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    results: dict[str, dict[str, float]] = {}
    logger.info("%d documents, %d %s queries", len(doc_ids), len(queries), args.split)
    base_docs = None
    if args.base_index is not None:
        index_ids, vectors = read_faiss_vectors(args.base_index)
        if set(index_ids) != set(doc_ids):
            raise OptionError("--base_index", str(args.base_index), f"an index of {args.data}'s corpus")
        row = {d: i for i, d in enumerate(index_ids)}
        base_docs = vectors[[row[d] for d in doc_ids]]
    if base_docs is None:
        base_docs = base.encode_texts(doc_texts, "passage", batch_size=args.batch_size)
    results["base"] = evaluate(base, doc_ids, doc_texts, queries, data.qrels, args.batch_size, docs=base_docs)
    logger.info("base: %s", results["base"])
    best: tuple[float, str, dict | None] = (-1.0, "", None)
    for folder in args.candidates:
        tuned = BiEncoder.load(folder)
        tuned.config.passage_max_length = args.max_length
        tuned_state = {k: v.clone() for k, v in tuned.state_dict().items()}
        # soups change the query side only: a frozen passage encoder equal to the base keeps the base's vectors
        shares_base_docs = frozen_base(tuned, base)
        for weight in [1.0, *args.soups]:
            name = str(folder) if weight == 1.0 else f"{folder} @ soup {weight:g}"
            state = tuned_state if weight == 1.0 else soup(base_state, tuned_state, weight)
            tuned.load_state_dict(state)
            results[name] = evaluate(tuned, doc_ids, doc_texts, queries, data.qrels, args.batch_size,
                                     docs=base_docs if shares_base_docs else None)
            logger.info("%s: %s", name, results[name])
            if results[name]["nDCG@10"] > best[0]:
                best = (results[name]["nDCG@10"], name, state)
    summary = {"data": str(args.data), "split": args.split, "max_length": args.max_length, "results": results,
               "best": best[1], "best_beats_base": best[0] > results["base"]["nDCG@10"]}
    if args.save_best is not None and best[2] is not None:
        folder = Path(best[1].split(" @ soup ")[0])
        chosen = BiEncoder.load(folder)
        chosen.load_state_dict(best[2])
        chosen.config.passage_max_length = settings.passage_max_length
        chosen.save(args.save_best, overwrite=True)
        summary["saved"] = str(args.save_best)
    # the saved model carries how it was chosen (what benchmarks/dense_pipeline.py --fine-tuned reports)
    for path in [args.output] + ([args.save_best / SELECTION_FILE] if "saved" in summary else []):
        with atomic_write(path) as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
