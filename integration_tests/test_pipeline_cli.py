"""The README's main job, ``python -m matryoshka pipeline``, end to end on scifact-mini with the bundled default
model: Pyserini indexes, searches with ``--reranker matryoshka`` and evaluates; the table, the run file, the
statistics and the plot come out, and the cascade run file is the one Pyserini wrote (every query, hits, ranks)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from matryoshka.io import read_run
from matryoshka.plugin.manifest import load_manifest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "plugin" / "default_model"


def _pipeline(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "matryoshka", "pipeline", "--data", str(REPO / "data" / "scifact-mini"),
           "--work", str(tmp_path / "work"), "--output-dir", str(tmp_path / "out"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.skipif(not (DEFAULT_MODEL / "manifest.json").is_file(), reason="no bundled default model")
def test_main_job_prints_the_table_and_writes_run_stats_and_plot(tmp_path: Path) -> None:
    proc = _pipeline(tmp_path, "--hits", "10")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^\| ([^|]+) \| ([0-9.]+) \|",
                                                                          proc.stdout, re.M)}
    assert table["BM25 (Pyserini)"] == pytest.approx(0.7682, abs=1e-4)  # = the published-setting BM25 pin
    cascade = next(v for k, v in table.items() if k.startswith("BM25 + matryoshka cascade"))
    exits = load_manifest(DEFAULT_MODEL).exits
    full = next(v for k, v in table.items() if k.startswith(f"full depth (fixed exit {exits[-1]})"))
    assert 0.3 < cascade <= 1.0 and 0.3 < full <= 1.0
    # the headline table (BM25, cascade) is printed before the slow full-depth comparison pass starts
    assert proc.stdout.index("(the comparison follows)") < proc.stdout.index("| full depth (fixed exit")
    out = tmp_path / "out"
    run = read_run(out / "scifact-mini-test.matryoshka.txt")
    assert len(run.queries) == 30 and all(len(hits) == 10 for hits in run.queries.values())
    stats = json.loads((out / "scifact-mini-test.matryoshka.stats.json").read_text())
    assert stats["candidates"] == 300 and exits[0] <= stats["mean_layers_per_candidate"] <= exits[-1]
    assert (out / "ndcg_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["first_stage_weight"] == load_manifest(DEFAULT_MODEL).policy.first_stage_weight
    assert {p["policy"] for p in sweep["points"]} >= {"fixed", "candidate", "query", "topk"}


def test_bad_option_is_one_line_and_no_output(tmp_path: Path) -> None:
    proc = _pipeline(tmp_path, "--hits", "0", "--no-compare")
    assert proc.returncode == 2
    assert "--hits" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
