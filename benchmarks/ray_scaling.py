"""The ``ray`` engine against the local one (issue 20): pairs/s and the overhead per query, on this machine.

    python benchmarks/ray_scaling.py [--queries 30] [--hits 20] [--depth 0] [--output FILE.md]

The first ``--queries`` judged test queries of scifact-mini, each with a word-overlap first stage (its top
``--hits`` of the whole corpus), reranked by the bundled default model (its tuned policy, rerank depth ``--depth``,
0 = every candidate) in four configurations, each in a fresh process through
``MatryoshkaReranker.rerank_run``: the local engine with 1 and 2 onnxruntime threads, the ray engine (a local Ray
instance) with 1 and 2 workers of 1 thread each. Per configuration:

- **pairs/s**: reranked pairs over the wall time of ``rerank_run`` (ray: from the call, so Ray's start, the workers'
  start and their model loading count);
- **steady pairs/s**: (ray) the pairs of the results after the first one over the time from the first result to the
  last: the rate once the workers run;
- **start s**: (ray) from the call to the first result, less one query's compute;
- **overhead ms/query**: the wall time per query outside the cascade's compute (stats ``query_seconds``): local
  engine: (wall - compute) / queries (reading texts, fusion); ray with 1 worker: the mean gap between two results
  less the later query's compute, the queries running back to back on the actor (task dispatch, shipping the texts
  and the scores, fusion).

Also checks that every configuration wrote the same run as ``local-1t`` (1 thread, as each ray worker). Writes a
markdown table (with the command and the load average) to stdout and ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "scifact-mini"
CONFIGS = {"local-1t": ("local", 1, None), "local-2t": ("local", 2, None), "ray-1w": ("ray", 1, 1),
           "ray-2w": ("ray", 1, 2)}


def first_stage(queries: int, hits: int) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """(topics, run): the judged test queries' word-overlap top ``hits`` (score = overlap + a rank tie-break)."""
    judged = [line.split("\t")[0] for line in (DATA / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    qids = list(dict.fromkeys(judged))[:queries]
    texts = {q["_id"]: q["text"] for q in map(json.loads, (DATA / "queries.jsonl").read_text().splitlines())}
    docs = [(d["_id"], set(re.findall(r"\w+", f"{d['title']} {d['text']}".lower())))
            for d in map(json.loads, (DATA / "corpus.jsonl").read_text().splitlines())]
    run = {}
    for qid in qids:
        words = set(re.findall(r"\w+", texts[qid].lower()))
        top = sorted(((len(words & w), d) for d, w in docs), key=lambda x: (-x[0], x[1]))[:hits]
        run[qid] = {d: s + 1.0 / (r + 2) for r, (s, d) in enumerate(top)}
    return {q: texts[q] for q in qids}, run


def worker(name: str, queries: int, hits: int, depth: int) -> dict[str, object]:
    """One configuration, in this (fresh) process."""
    from matryoshka.plugin.api import MatryoshkaReranker
    from matryoshka.plugin.docs import CorpusDocs

    engine, threads, workers = CONFIGS[name]
    topics, run = first_stage(queries, hits)
    reranker = MatryoshkaReranker(threads=threads, depth=depth)
    docs = CorpusDocs(DATA / "corpus.jsonl")
    arrivals: list[float] = []
    options = {} if engine == "local" else {"workers": workers, "on_result": lambda done, _w: arrivals.append(
        time.perf_counter())}
    start = time.perf_counter()
    reranked = reranker.rerank_run(run, topics, docs, engine=engine, **options)
    wall = time.perf_counter() - start
    stats = reranker.stats.to_dict()
    pairs, n, compute = stats["reranked_candidates"], stats["queries"], stats["seconds_total"]
    row: dict[str, object] = {"config": name, "engine": engine, "threads": threads, "workers": workers or "",
                              "queries": n, "pairs": pairs, "wall_s": wall, "pairs_per_s": pairs / wall,
                              "compute_s": compute, "run": json.dumps(reranked, sort_keys=True)}
    seconds = reranker.stats.query_seconds  # per query, in the run's order (merged so by the ray engine)
    if engine == "ray" and len(arrivals) > 1:
        steady = arrivals[-1] - arrivals[0]
        row.update(steady_pairs_per_s=pairs * (n - 1) / n / steady, start_s=arrivals[0] - start - seconds[0])
        if workers == 1:  # one actor runs the queries in the run's order, back to back (the next one is queued)
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
            row["overhead_ms"] = 1000 * sum(g - s for g, s in zip(gaps, seconds[1:], strict=True)) / len(gaps)
    else:
        row.update(steady_pairs_per_s=pairs / wall, start_s=0.0, overhead_ms=1000 * (wall - compute) / n)
    return row


def fmt(value: object) -> str:
    return "" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        print(json.dumps(worker(argv[1], int(argv[2]), int(argv[3]), int(argv[4]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--hits", type=int, default=20)
    parser.add_argument("--depth", type=int, default=0, help="rerank depth (0 = every candidate)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    rows, load = [], os.getloadavg()[0]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    for name in args.configs:
        proc = subprocess.run([sys.executable, __file__, "_worker", name, str(args.queries), str(args.hits),
                               str(args.depth)], check=True, capture_output=True, text=True, env=env)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['pairs_per_s']:.1f} pairs/s", file=sys.stderr)
    base = next((r for r in rows if r["config"] == "local-2t"), rows[0])
    same = next((r for r in rows if r["config"] == "local-1t"), rows[0])
    command = "python benchmarks/ray_scaling.py " + shlex.join(argv)
    lines = [f"Command: `{command.strip()}` (load average before: {load:.2f}, {os.cpu_count()} CPUs)",
             "", "| config | engine | threads/worker | workers | queries | pairs | wall s | pairs/s | x local-2t "
             "| steady pairs/s | start s | overhead ms/query | run = local-1t |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['engine']} | {r['threads']} | {r['workers']} | {r['queries']} | "
                     f"{r['pairs']} | {r['wall_s']:.1f} | {r['pairs_per_s']:.1f} | "
                     f"{r['pairs_per_s'] / base['pairs_per_s']:.2f} | {r['steady_pairs_per_s']:.1f} | "
                     f"{r['start_s']:.1f} | {fmt(r.get('overhead_ms'))} | "
                     f"{'yes' if r['run'] == same['run'] else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
