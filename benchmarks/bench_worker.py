"""The worker side of ``benchmarks/rerank_benchmark.py``: one timed configuration per fresh subprocess, data
lookup, and trec_eval of a run. Imported by the entry point and by :mod:`benchmarks.bench_report` (never the
reverse), so the benchmark modules form no import cycle."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
#: where datasets are looked up by name (``<root>/<name>`` or ``<root>/classic/<name>``) after ``data/``;
#: ``--data-root`` replaces the default
DATA_ROOTS: list[Path] = [REPO.parent / "shared" / "data"]
ENTRY_POINT = REPO / "benchmarks" / "rerank_benchmark.py"  # runs ``_worker`` in a fresh process
logger = logging.getLogger("benchmark")


def publish(path: str | Path, text: str) -> int:
    """Write a benchmark report atomically to ``path`` (its folder created) and print it; returns exit status 0."""
    from matryoshka.io import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(text)
    print(text)
    return 0


def add_data_root_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", type=Path, action="append", metavar="DIR",
                        help="folder holding datasets by name (<DIR>/<name> or <DIR>/classic/<name>), searched after "
                             "data/; repeatable (default: ../shared/data beside the repository)")


def set_data_roots(roots: list[Path] | None) -> None:
    """Use ``roots`` (``--data-root``) instead of the default; a root that is not a folder exits with one line."""
    for root in roots or []:
        if not root.is_dir():
            raise SystemExit(f"error: --data-root {root} is not a folder: pass the folder that holds the datasets "
                             "(e.g. .../shared/data)")
    if roots:
        DATA_ROOTS[:] = roots


def dataset_dir(name: str) -> Path | None:
    """The BEIR folder (with ``corpus.jsonl``) of ``name``: a path, ``data/<name>``, or under a data root."""
    roots = [c for root in DATA_ROOTS for c in (root / name, root / "classic" / name)]
    for candidate in (Path(name), REPO / "data" / name, *roots):
        if (candidate / "corpus.jsonl").is_file():
            return candidate
    return None


def require_dataset(name: str) -> Path:
    """:func:`dataset_dir` or one ``error:`` line saying where it looked and how to point at the data."""
    found = dataset_dir(name)
    if found is None:
        raise SystemExit(f"error: dataset {name!r} not found (no corpus.jsonl in {name}, data/{name} or under "
                         f"{', '.join(str(r) for r in DATA_ROOTS)}): pass --data-root DIR, the folder that holds it")
    return found


# ------------------------------------------------------------------------------------------------ worker side
def _worker(config: str, model: Path, checkpoint: Path | None, cache: Path, out: Path, threads: int,
            batch_size: int) -> None:
    """Score every query of ``cache`` with one configuration; write scores, exits and per-query seconds."""
    data = json.loads(cache.read_text())
    queries, results = data["queries"], {}
    seconds: list[float] = []
    layers: list[float] = []
    if config == "torch-fp32":
        import torch
        from tokenizers import Tokenizer

        from matryoshka.layout import prepare_tokenizer
        from matryoshka.training.modeling import LayerwiseReranker

        torch.set_num_threads(threads)
        net = LayerwiseReranker.load(checkpoint).eval()
        tok = prepare_tokenizer(Tokenizer.from_file(str(checkpoint / "tokenizer.json")))
        last = net.config.exits[-1]

        def score(q: str, texts: list[str], *_: object) -> tuple[np.ndarray, np.ndarray]:
            outs = []
            with torch.inference_mode():
                for i in range(0, len(texts), batch_size):
                    chunk = texts[i: i + batch_size]
                    feeds = net.layout.encode(tok, [q] * len(chunk), chunk)
                    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
                    scores = net(**tensors, compression=net.config.inference_compression)
                    outs.append(scores.calibrated_at(last).float().numpy())
            return np.concatenate(outs), np.full(len(texts), last)
    elif config.startswith("onnx-full-"):
        import onnxruntime as ort

        from matryoshka.plugin.cascade import Cascade

        precision = config.removeprefix("onnx-full-")
        chain = Cascade(model, precision=precision, threads=threads, batch_size=batch_size)
        spec = chain.manifest.full_graph
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(model / spec.files[precision].path), options,
                                       providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        last = chain.exits[-1]

        def score(q: str, texts: list[str], *_: object) -> tuple[np.ndarray, np.ndarray]:
            q_ids, p_ids = chain.tokenize([q] * len(texts), texts)
            order = np.argsort([-len(p) for p in p_ids], kind="stable")
            result = np.empty(len(texts))
            for i in range(0, len(texts), batch_size):
                rows = order[i: i + batch_size]
                feeds = chain._first_feeds(rows, q_ids, p_ids)
                out = session.run(["score"], {k: v for k, v in feeds.items() if k in names})[0]
                result[rows] = np.asarray(out, dtype=np.float64).reshape(-1)
            return result, np.full(len(texts), last)
    elif config == "default":  # exactly what the plugin runs: tuned policy, depth and first-stage fusion
        from matryoshka.plugin.api import MatryoshkaReranker

        reranker = MatryoshkaReranker(model, precision="int8" if "int8" in chain_precisions(model) else None,
                                      threads=threads, batch_size=batch_size)

        def score(q: str, texts: list[str], docids: list[str], first: list[float]) -> tuple[np.ndarray, np.ndarray]:
            out = reranker.rerank_query(q, docids, texts, first_stage_scores=first)
            scored = reranker.last_result.exit_layer if reranker.last_result is not None else []
            layers = np.zeros(len(docids))  # candidates below the rerank depth: never scored
            layers[: len(scored)] = scored
            return np.array([out[d] for d in docids]), layers
    else:
        from matryoshka.plugin.cascade import Cascade
        from matryoshka.plugin.policies import make_policy

        kind, _, value = config.partition(":")
        chain = Cascade(model, precision="int8" if "int8" in chain_precisions(model) else None, threads=threads,
                        batch_size=batch_size)
        default = chain.manifest.policy
        if kind == "fixed":
            policy = make_policy("fixed", None, chain.exits, default.threshold, exit_layer=int(value))
        else:
            policy = make_policy(kind, float(value), chain.exits, default.threshold)

        def score(q: str, texts: list[str], *_: object) -> tuple[np.ndarray, np.ndarray]:
            res = chain.run([q] * len(texts), texts, policy)
            return res.scores, res.exit_layer

    for qid, entry in queries.items():
        start = time.perf_counter()
        scores, exit_layers = score(entry["text"], entry["passages"], entry["docids"], entry["first_stage"])
        seconds.append(time.perf_counter() - start)
        layers.extend(np.asarray(exit_layers, dtype=float).tolist())
        results[qid] = dict(zip(entry["docids"], map(float, scores), strict=True))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps({"run": results, "seconds": seconds, "layers": layers, "peak_mib": peak_mib}))


def chain_precisions(model: Path) -> list[str]:
    from matryoshka.plugin.manifest import load_manifest

    return list(load_manifest(model, verify=False).precisions)


# ------------------------------------------------------------------------------------------------ parent side
def run_config(config: str, args: argparse.Namespace, cache: Path, tmp: Path) -> dict:
    out = tmp / f"{config.replace(':', '_')}.json"
    model = (args.full_graph_model or args.model) if config.startswith("onnx-full-") else args.model
    cmd = [sys.executable, str(ENTRY_POINT), "_worker", config, str(model), str(args.checkpoint or ""), str(cache),
           str(out), str(args.threads), str(args.batch_size)]
    logger.info("timing %s", config)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def evaluate_run(run: dict[str, dict[str, float]], qrels_path: Path, tmp: Path, name: str) -> dict[str, float]:
    from matryoshka.io import write_run
    from matryoshka.pipeline import trec_eval

    path = tmp / f"{name}.run"
    write_run(path, run, tag=name.replace(" ", "_")[:40] or "run")
    return trec_eval(qrels_path, path)
