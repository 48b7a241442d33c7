"""benchmarks/static_int8.py on a tiny exported segment model: it captures every stage's feeds from the cascade,
quantizes statically, and reports fp32 (zero difference), the shipped dynamic int8 and static int8 per stage; bad
input is one error line and no report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import static_int8
from matryoshka.export.pipeline import ExportOptions, export_checkpoint
from matryoshka.export.validate import Criteria
from matryoshka.training.modeling import LayerwiseReranker
from tests.fixtures.tiny_models import make_tiny_base


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("static-int8")
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
    return {"model": folder, "run": tmp_path / "run.txt", "topics": tmp_path / "topics.tsv",
            "corpus": tmp_path / "corpus.jsonl"}


def argv(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--model", str(inputs["model"]), "--run", str(inputs["run"]), "--topics", str(inputs["topics"]),
            "--corpus", str(inputs["corpus"]), "--queries", "2", "--threads", "1", "--output", str(out), *extra]


def test_static_int8_report_on_a_tiny_model(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    assert static_int8.main(argv(inputs, out, "--calibration", "2")) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| stage_")]
    assert [(r[0], r[1]) for r in rows] == [(f"| stage_{s}.onnx", p) for s in (1, 2) for p in
                                            ("fp32", "dynamic int8 (shipped)", "static int8 (QDQ)")]
    for row in rows:
        assert int(row[2]) >= 1 and float(row[3]) > 0
        if row[1] == "fp32":
            assert float(row[4]) == 0.0 and float(row[5].rstrip(" |")) == 0.0     # the reference itself
    assert out.read_text().startswith("Command: `python benchmarks/static_int8.py --model")


def test_bad_input_is_one_line_and_no_report(inputs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report.md"
    topics = tmp_path / "topics.tsv"
    topics.write_text("q1\tcat on a mat\n")                                   # no q2
    cases = [(argv({**inputs, "topics": topics}, out), "no 'q2'"),
             (argv(inputs, out, "--calibration", "1000"), "--calibration=1000"),
             (argv(inputs, out, "--queries", "0"), "--queries=0")]
    for args, named in cases:
        capsys.readouterr()
        assert static_int8.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and named in err[0]
        assert not out.exists()
