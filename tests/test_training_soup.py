"""Weight-space soups of two segment-head runs: L = 0 / 1 reproduce the inputs, L = 0.5 is the midpoint of every
float tensor, residuals are re-measured, inputs stay untouched, bad input exits 2 with one line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.errors import OptionError
from matryoshka.training.modeling import LayerwiseReranker
from matryoshka.training.segment_heads import main as train_main
from matryoshka.training.soup import interpolate_states, main
from tests.fixtures.tiny_models import make_tiny_base
from tests.test_training_loop import make_training_data
from tests.test_training_segments import run_args, weights


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soup")
    data, _teacher = make_training_data(root)
    setup = {"base": make_tiny_base(root / "base", "bert", num_layers=4, hidden=32, heads=4), "data": data}
    assert train_main(run_args(setup, root / "frozen", "--max_steps", "4", "--save_steps", "0")) == 0
    assert train_main(run_args(setup, root / "final", "--max_steps", "4", "--save_steps", "0",
                               "--final_label_weight", "1.0")) == 0
    return {"root": root, "data": data, "frozen": root / "frozen" / "model", "final": root / "final" / "model",
            "setup_base": setup["base"]}


def soup_args(runs: dict[str, Path], out: Path, *weights_: str, base: Path | None = None) -> list[str]:
    return ["--base", str(base or runs["frozen"]), "--tuned", str(runs["final"]), "--weights", *weights_,
            "--residual_set", str(runs["data"]), "--output_dir", str(out), "--group_size", "4"]


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


def test_interpolate_states_mixes_float_tensors_and_refuses_mismatches() -> None:
    base = {"w": torch.zeros(2), "n": torch.tensor([1])}
    tuned = {"w": torch.tensor([2.0, 4.0]), "n": torch.tensor([7])}
    mixed = interpolate_states(base, tuned, 0.25)
    torch.testing.assert_close(mixed["w"], torch.tensor([0.5, 1.0]))
    assert mixed["n"].tolist() == [7]
    with pytest.raises(OptionError, match="same parameters"):
        interpolate_states(base, {"w": tuned["w"]}, 0.5)
    with pytest.raises(OptionError, match=r"shapes \(w: \(2,\) vs \(3,\)\)"):
        interpolate_states(base, {"w": torch.zeros(3), "n": tuned["n"]}, 0.5)


def test_soups_interpolate_and_remeasure_residuals(runs: dict[str, Path], tmp_path: Path) -> None:
    before = {k: digest(runs[k]) for k in ("frozen", "final")}
    out = tmp_path / "soups"
    assert main(soup_args(runs, out, "0", "0.5", "1")) == 0
    assert {k: digest(runs[k]) for k in ("frozen", "final")} == before          # inputs untouched
    frozen, final = weights(runs["frozen"]), weights(runs["final"])
    assert not torch.equal(frozen["projections.4.weight"], final["projections.4.weight"])
    for name, expected in (("soup-0", frozen), ("soup-1", final)):
        got = weights(out / name)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=f"{name} {key}")
    middle = weights(out / "soup-0.5")
    for key, value in frozen.items():
        torch.testing.assert_close(middle[key], (value + final[key]) / 2, atol=1e-6, rtol=1e-6, msg=key)
    per_exit = {name: LayerwiseReranker.load(out / name).config.compensation["per_exit"]
                for name in ("soup-0", "soup-0.5", "soup-1")}
    source = {"soup-0": runs["frozen"], "soup-1": runs["final"]}
    for name, folder in source.items():    # L = 0 / 1 measure what the training runs measured on the same set
        recorded = LayerwiseReranker.load(folder).config.compensation["per_exit"]
        for exit_layer in ("1", "2", "4"):
            assert per_exit[name][exit_layer]["residual_std"] == pytest.approx(
                recorded[exit_layer]["residual_std"], rel=1e-5)
    assert per_exit["soup-0.5"]["1"]["residual_std"] > 0
    assert per_exit["soup-0.5"]["1"]["residual_std"] not in {per_exit[n]["1"]["residual_std"] for n in source}
    record = json.loads((out / "soups.json").read_text())
    assert record["soups"] == {"soup-0": 0.0, "soup-0.5": 0.5, "soup-1": 1.0}
    assert record["formula"] == "base + L * (tuned - base)"


def test_existing_soup_is_refused_and_kept(runs: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "soups"
    assert main(soup_args(runs, out, "0.5")) == 0
    kept = digest(out / "soup-0.5")
    capsys.readouterr()
    assert main(soup_args(runs, out, "0.25", "0.5")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "soup-0.5 exists" in err[0] and "--overwrite" in err[0]
    assert digest(out / "soup-0.5") == kept and not (out / "soup-0.25").exists()
    assert main([*soup_args(runs, out, "0.5"), "--overwrite"]) == 0


@pytest.mark.parametrize(("extra", "named"), [
    (["--weights", "1.5"], "weights"), (["--weights", "0.5", "0.5"], "distinct"),
    (["--group_size", "1"], "group_size")])
def test_bad_options_exit_2_with_one_line(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                          extra: list[str], named: str) -> None:
    args = soup_args(runs, tmp_path / "bad", "0.5")
    args[args.index("--weights"):args.index("--weights") + 2] = []
    assert main([*args, *(extra if extra[0] == "--weights" else ["--weights", "0.5", *extra])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0]
    assert not (tmp_path / "bad").exists()


def test_models_of_different_shape_are_refused(runs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    setup = {"base": runs["setup_base"], "data": runs["data"]}
    other = tmp_path / "other"
    args = run_args(setup, other, "--max_steps", "2", "--save_steps", "0")
    args[args.index("--exits") + 1:args.index("--exits") + 4] = ["1", "4"]
    assert train_main(args) == 0
    capsys.readouterr()
    assert main(soup_args(runs, tmp_path / "bad", "0.5", base=other / "model")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differ in 'exits'" in err[0]
    assert not (tmp_path / "bad").exists()
    assert main(soup_args(runs, runs["final"], "0.5", base=runs["final"])) == 2
    assert "a folder other than --base" in capsys.readouterr().err
