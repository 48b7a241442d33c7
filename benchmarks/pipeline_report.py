"""The markdown report of ``benchmarks/dense_pipeline.py``: the results table, the machine line, the file."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path


def format_table(results: dict[str, list[dict]]) -> str:
    names = list(results)
    header = ("| pipeline | " + " | ".join(f"{n} nDCG@10 | {n} R@100" for n in names) + " | mean layers ("
              + " / ".join(names) + ") | relative layer cost (" + " / ".join(names) + ") |")
    lines = [header, "|---|" + "---:|---:|" * len(names) + "---:|---:|"]
    for i, row in enumerate(results[names[0]]):
        cells = [f"{results[n][i]['nDCG@10']:.4f} | {results[n][i]['R@100']:.4f}" for n in names]
        if "mean_layers" in row:
            layers = " / ".join(f"{results[n][i]['mean_layers']:.2f}" for n in names) + f" of {row['layers']}"
            cost = " / ".join(f"{results[n][i]['relative_layer_cost']:.3f}" for n in names)
        else:
            layers = cost = "-"
        lines.append(f"| {row['pipeline']} | " + " | ".join(cells) + f" | {layers} | {cost} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, Python " \
           f"{platform.python_version()}"


def write_report(args: argparse.Namespace, results: dict[str, list[dict]], notes: list[str], command: str) -> str:
    from matryoshka.io import atomic_write

    table = format_table(results)
    text = "\n".join([
        "# BM25 / dense / hybrid first stages, each followed by the matryoshka cascade", "",
        f"Generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC} by "
        "`benchmarks/dense_pipeline.py`; every step is a Pyserini CLI (`pyserini.search.lucene` / `.faiss` / "
        "`.hybrid`, the cascade as `--reranker matryoshka` on the same command, `pyserini.eval.trec_eval`). "
        "Test splits: " + ", ".join(f"{name} {rows[0]['queries']} judged queries" for name, rows in results.items())
        + ".", "",
        table, "", *[f"- {n}" for n in notes], "",
        "Command:", "", "```", command, "```", "",
        f"Machine: {machine()}; {args.threads} threads for every step (torch, onnxruntime, Lucene/Faiss search).", ""])
    with atomic_write(args.report) as handle:
        handle.write(text)
    return table
