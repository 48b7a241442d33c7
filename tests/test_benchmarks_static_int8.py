"""benchmarks/static_int8.py on a tiny exported segment model: it captures every stage's feeds from the cascade,
quantizes statically, and reports fp32 (zero difference), the shipped dynamic int8 and static int8 per stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import static_int8
from matryoshka.export.pipeline import ExportOptions, export_checkpoint
from matryoshka.export.validate import Criteria
from matryoshka.training.modeling import LayerwiseReranker
from tests.fixtures.tiny_models import make_tiny_base


def test_static_int8_report_on_a_tiny_model(tmp_path: Path) -> None:
    base = make_tiny_base(tmp_path / "base", "bert", num_layers=2, hidden=32, heads=4)
    model = LayerwiseReranker.build(base, exits=(1, 2), max_length=32, query_length=8, readout="cosine",
                                    attention="segments").eval()
    folder = export_checkpoint(model.save(tmp_path / "checkpoint"), tmp_path / "model",
                               ExportOptions(encoding="segments", int8=True, criteria={"int8": Criteria()})).folder
    words = "the cat sat on a mat gene protein cell study shows result".split()
    docs = {f"d{i}": " ".join(words[i % 5:i % 5 + 4 + i % 7]) for i in range(12)}
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n"
                                                   for d, t in docs.items()))
    (tmp_path / "topics.tsv").write_text("q1\tcat on a mat\nq2\tgene study\n")
    (tmp_path / "run.txt").write_text("".join(f"{q} Q0 {d} {r + 1} {10 - r} bm25\n" for q in ("q1", "q2")
                                              for r, d in enumerate(list(docs)[:6])))
    out = tmp_path / "report.md"
    assert static_int8.main(["--model", str(folder), "--run", str(tmp_path / "run.txt"), "--topics",
                             str(tmp_path / "topics.tsv"), "--corpus", str(tmp_path / "corpus.jsonl"),
                             "--queries", "2", "--calibration", "2", "--threads", "1", "--output", str(out)]) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| stage_")]
    assert [(r[0], r[1]) for r in rows] == [(f"| stage_{s}.onnx", p) for s in (1, 2) for p in
                                            ("fp32", "dynamic int8 (shipped)", "static int8 (QDQ)")]
    for row in rows:
        assert int(row[2]) >= 1 and float(row[3]) > 0
        if row[1] == "fp32":
            assert float(row[4]) == 0.0 and float(row[5].rstrip(" |")) == 0.0     # the reference itself
    assert out.read_text().startswith("Command: `python benchmarks/static_int8.py --model")

