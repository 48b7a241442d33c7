"""benchmarks/segment_eval.py: extra cascade points replayed on per-exit scores, parsed strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import segment_eval
from benchmarks.segment_eval import cascade_rows, parse_cascade
from matryoshka.errors import OptionError
from tests.fixtures.synthetic_model import build_synthetic_model


@pytest.mark.parametrize(("text", "expected"), [("topk@0.8", ("topk", 0.8, None)),
                                                ("topk@0.9:20", ("topk", 0.9, 20)),
                                                ("candidate@0.95:all", ("candidate", 0.95, None))])
def test_parse_cascade(text: str, expected: tuple) -> None:
    assert parse_cascade(text) == expected


@pytest.mark.parametrize("text", ["topk", "topk@x", "nope@0.5", "topk@0.9:0", "topk@0.9:ten"])
def test_parse_cascade_refuses_bad_points(text: str) -> None:
    with pytest.raises(OptionError, match="cascades"):
        parse_cascade(text)


def test_cascades_need_a_manifest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = segment_eval.main(["--encoder", "x", "--datasets", "adi", "--output", str(tmp_path / "t.md"),
                              "--cascades", "topk@0.8"])
    assert code == 2 and "--manifest" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()


def test_cascade_rows_full_depth_and_cost(tmp_path: Path) -> None:
    # exits (3, 6): exit 3 agrees with exit 6 on d1 > d2 > d3; d1 relevant
    model = build_synthetic_model(tmp_path / "model", ["a b c", "d e f"], exits=(3, 6))
    hits = {"q": {"d1": 3.0, "d2": 2.0, "d3": 1.0}}
    per_exit = {3: {"q": {"d1": 3.0, "d2": 0.0, "d3": -3.0}}, 6: {"q": {"d1": 2.0, "d2": 1.0, "d3": 0.0}}}
    rows = dict(cascade_rows(str(model), per_exit, hits, {"q": {"d1": 1}}, ["topk@0.5", "topk@0.9:2"]))
    full = next(v for k, v in rows.items() if "full depth" in k)
    assert full == pytest.approx(1.0)
    flops = {k: v for k, v in rows.items() if k.endswith("layer-FLOPs")}
    assert len(flops) == 3            # the manifest's tuned point + the two extra points
    # three candidates and fewer than k = 10: topk keeps every one to the last exit (full cost); depth 2 scores 2 of 3
    assert flops["cascade topk@0.9:2 (topk@0.9, depth 2): layer-FLOPs"] == pytest.approx(2 / 3)
