"""evaluate.py: one run per exit, scored with Pyserini's trec_eval; runs written on one machine, scored on another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.io import Document, read_run
from matryoshka.training.modeling import LayerwiseReranker
from tests.fixtures.tiny_models import make_tiny_base
from tests.test_training_data import write_beir


def evaluate(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matryoshka.training.evaluate", *args], capture_output=True,
                          text=True, check=check)


def test_per_exit_runs_and_trec_eval(tmp_path: Path) -> None:
    words = ["the", "cat", "sat", "on", "mat", "dog", "fish", "ocean", "blue", "red", "gene", "cell"]
    corpus = {f"d{i}": Document(f"d{i}", "", " ".join(words[(i + k) % 12] for k in range(5))) for i in range(12)}
    data = write_beir(tmp_path / "beir", [("q1", "d0", 1), ("q2", "d5", 2), ("q2", "d6", 1)], corpus)
    run = tmp_path / "bm25.trec"
    run.write_text("".join(f"{q} Q0 d{i} {r + 1} {10 - r} bm25\n" for q in ("q1", "q2")
                           for r, i in enumerate([3, 0, 5, 6, 1, 2, 4])))
    model_dir = tmp_path / "tiny-model"
    LayerwiseReranker.build(make_tiny_base(tmp_path / "base", "bert"), exits=[2, 4], max_length=32,
                            query_length=8).save(model_dir)
    out = tmp_path / "eval"
    common = ["--data_dir", str(data), "--split", "train", "--output_dir", str(out), "--name", "tiny"]
    proc = evaluate(*common, "--model_dirs", str(model_dir), "--run", str(run), "--depth", "5", "--device", "cpu",
                    "--no_trec_eval")
    assert "runs written" in proc.stdout and not (out / "tiny-results.json").exists()
    for exit_layer in (2, 4):
        reranked = read_run(out / f"tiny-tiny-model-exit{exit_layer}.trec")
        assert {q: {e.docid for e in hits} for q, hits in reranked.queries.items()} == \
            {q: {"d3", "d0", "d5", "d6", "d1"} for q in ("q1", "q2")}          # the top 5, reordered
    proc = evaluate(*common, "--runs_only_from", str(out))
    results = json.loads((out / "tiny-results.json").read_text())
    assert set(results) == {"BM25", "tiny-model exit 2", "tiny-model exit 4"}
    # BM25 order: q1 has its positive at rank 2 (nDCG 1/log2(3) = 0.6309); q2 ranks d5 (grade 2) and d6 (1) at 3
    # and 4: (2/log2(4) + 1/log2(5)) / (2 + 1/log2(3)) = 0.5438
    assert abs(results["BM25"]["ndcg_cut_10"] - (0.6309 + 0.5438) / 2) < 1e-3
    assert "| tiny-model exit 4 |" in proc.stdout
    bad = tmp_path / "other.trec"
    bad.write_text("q1 Q0 nope 1 3.0 x\n")
    proc = evaluate(*common, "--model_dirs", str(model_dir), "--run", str(bad), "--device", "cpu", "--no_trec_eval",
                    check=False)
    assert proc.returncode == 2 and "'nope'" in proc.stderr.strip().splitlines()[-1]
