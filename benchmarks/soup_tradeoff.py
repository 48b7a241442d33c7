"""In-domain gain against out-of-domain loss of a query-side fine-tuned dense model, along its weight-space soups
with the base model (``base + L * (tuned - base)``, L = 0 is the base model, L = 1 the fine-tuned one).

    python benchmarks/soup_tradeoff.py --base <all-MiniLM-L6-v2 dir> --model runs/dense-bench/minilm-dense-query/model \
        --sets nfcorpus:dev:/work/shared/data/nfcorpus:runs/dense-bench/faiss/nfcorpus-off-the-shelf \
               scifact:test:/work/shared/data/scifact:runs/dense-bench/faiss/scifact-off-the-shelf ... \
        --output benchmarks/results/soups.md

Each ``--sets`` entry is ``NAME:SPLIT:BEIR_FOLDER:BASE_INDEX``: the base model's Faiss index of that corpus (as
``python -m matryoshka.training.dense.encode`` writes it). A query-side fine-tuned model keeps the base model's
passage encoder, so every soup searches the same document vectors and only the queries are encoded again: exact
(brute-force) search, nDCG@10 and R@100 as ``python -m matryoshka.training.dense.select`` computes them.

A diagnostic over test splits, not a selection: pick a soup with ``select --soups`` on a dev split.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from matryoshka.errors import OptionError, cli_main  # noqa: E402
from matryoshka.io import atomic_write  # noqa: E402

logger = logging.getLogger("soup_tradeoff")


@dataclass(frozen=True)
class EvalSet:
    name: str
    split: str
    data: Path
    index: Path

    @classmethod
    def parse(cls, text: str) -> EvalSet:
        parts = text.split(":")
        if len(parts) != 4 or not all(parts):
            raise OptionError("--sets", text, "NAME:SPLIT:BEIR_FOLDER:BASE_INDEX, e.g. "
                              "scifact:test:data/scifact:runs/faiss/scifact-base")
        return cls(parts[0], parts[1], Path(parts[2]), Path(parts[3]))


def render(weights: Sequence[float], results: dict[str, list[dict[str, float]]], command: str) -> str:
    """Markdown: one row per set, nDCG@10 per soup weight, the row's best in bold."""
    out = ["# Soups of the query-side fine-tuned dense model with its base", "",
           "nDCG@10 of exact search, `base + L * (tuned - base)`; L = 0 is the base model, L = 1 the fine-tuned one.",
           "A diagnostic over test splits, not a selection (`select --soups` selects on dev).", "",
           f"`{command}`", "",
           "| set | " + " | ".join(f"L = {w:g}" for w in weights) + " |",
           "|---|" + "---:|" * len(weights)]
    for name, row in results.items():
        best = max(r["nDCG@10"] for r in row)
        cells = [f"**{r['nDCG@10']:.4f}**" if r["nDCG@10"] == best else f"{r['nDCG@10']:.4f}" for r in row]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="the model the fine-tune started from (HF folder)")
    p.add_argument("--model", type=Path, required=True, help="query-side fine-tuned dense model folder")
    p.add_argument("--sets", nargs="+", required=True, help="NAME:SPLIT:BEIR_FOLDER:BASE_INDEX entries")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--output", type=Path, required=True, help="markdown report (written atomically)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = tradeoff(args)
    command = shlex.join(["python", "benchmarks/soup_tradeoff.py", *(argv if argv is not None else sys.argv[1:])])
    report = render(args.weights, results, command)
    with atomic_write(args.output) as handle:
        handle.write(report)
    print(report)
    return 0


def tradeoff(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    import torch

    from matryoshka.errors import MissingInputError
    from matryoshka.io.beir import load_beir
    from matryoshka.training.dense.config import DenseConfig
    from matryoshka.training.dense.corpus import read_faiss_vectors
    from matryoshka.training.dense.modeling import BiEncoder
    from matryoshka.training.dense.select import base_encoder, evaluate, frozen_base, soup

    sets = [EvalSet.parse(text) for text in args.sets]
    bad = [w for w in args.weights if not 0.0 <= w <= 1.0]
    if bad:
        raise OptionError("--weights", bad[0], "soup weights in [0, 1] (0 = the base model, 1 = the fine-tuned one)")
    if not DenseConfig.exists(args.model):
        raise MissingInputError(args.model / "dense_config.json", "dense model folder",
                                "pass a folder saved by python -m matryoshka.training.dense")
    torch.set_num_threads(args.threads)
    tuned = BiEncoder.load(args.model)
    base = base_encoder(args.base, tuned.config, tuned.config.passage_max_length)
    if not frozen_base(tuned, base):
        raise OptionError("--model", str(args.model), "a query-side fine-tuned model (--mode corpus) whose passage "
                          "encoder is --base: its soups then share the base index's document vectors")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    tuned_state = {k: v.clone() for k, v in tuned.state_dict().items()}
    results: dict[str, list[dict[str, float]]] = {}
    for s in sets:
        data = load_beir(s.data, s.split)
        ids, vectors = read_faiss_vectors(s.index)
        # encode --skip_empty leaves out documents without text: those may be missing, nothing else
        indexed = set(ids)
        missing = [d for d, doc in data.corpus.items() if d not in indexed and doc.contents.strip()]
        stray = indexed - set(data.corpus)
        if missing or stray:
            what = f"document {missing[0]!r} is missing" if missing else f"{sorted(stray)[0]!r} is not in the corpus"
            raise OptionError("--sets", f"{s.name}:{s.index}", f"an index of {s.data}'s corpus ({what})")
        docs = torch.as_tensor(vectors)
        row = []
        for w in args.weights:
            # the ends exactly (base + 1 * (tuned - base) differs from tuned by rounding)
            state = base_state if w == 0.0 else tuned_state if w == 1.0 else soup(base_state, tuned_state, w)
            tuned.load_state_dict(state)
            row.append(evaluate(tuned, list(ids), [], data.split_queries, data.qrels, args.batch_size, docs=docs))
        results[f"{s.name} {s.split}"] = row
        logger.info("%s %s: %s", s.name, s.split, [r["nDCG@10"] for r in row])
    return results


if __name__ == "__main__":
    sys.exit(main())
