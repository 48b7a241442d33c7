"""The bi-encoder trainer CLI on a tiny model: resume replays an uninterrupted run exactly, distillation and custom
mode, a saved model that loads, and bad input (one-line errors, exit status 2, no partial output)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.training.dense.testing import make_tiny_beir, make_tiny_dense_base, make_tiny_training_set


def train(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matryoshka.training.dense", *map(str, args)], check=check,
                          capture_output=True, text=True)


def encode(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matryoshka.training.dense.encode", *map(str, args)], check=False,
                          capture_output=True, text=True)


def last_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {"base": make_tiny_dense_base(root / "base", "bert"), "root": root,
            "train": make_tiny_training_set(root / "train", teacher_file=root / "teacher.tsv"),
            "teacher": root / "teacher.tsv", "beir": make_tiny_beir(root / "beir")}


def test_resume_replays_the_uninterrupted_run(tiny: dict[str, Path], tmp_path: Path) -> None:
    common = ["--base_model", tiny["base"], "--normalize", "--train_sets", tiny["train"], "--group_size", 3,
              "--per_device_batch_size", 4, "--max_steps", 3, "--logging_steps", 1, "--passage_max_length", 16]
    train(*common, "--output_dir", tmp_path / "full")
    stopped = train(*common, "--output_dir", tmp_path / "resumed", "--stop_after_steps", 2, "--save_steps", 1)
    assert "stopped after step 2 of 3" in stopped.stdout
    assert not (tmp_path / "resumed" / "model").exists()
    train(*common, "--output_dir", tmp_path / "resumed", "--resume", "--save_steps", 1)
    full, resumed = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("full", "resumed"))
    assert full["weight_digests"] == resumed["weight_digests"]
    logs = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]
    saved = json.loads((tmp_path / "full" / "model" / "dense_config.json").read_text())
    assert saved["pooling"] == "mean" and saved["normalize"] and saved["passage_max_length"] == 16


def test_distillation_and_custom_mode(tiny: dict[str, Path], tmp_path: Path) -> None:
    proc = train("--base_model", tiny["base"], "--train_sets", tiny["train"], "--teacher_files", tiny["teacher"],
                 "--teacher_weight", 0.5, "--mode", "custom", "--pooling", "cls", "--group_size", 4,
                 "--per_device_batch_size", 4, "--max_steps", 2, "--logging_steps", 1, "--sub_batch_size", 5,
                 "--query_prefix", "query:", "--output_dir", tmp_path / "kd")
    assert "kl/teacher" in proc.stdout
    record = json.loads((tmp_path / "kd" / "log.jsonl").read_text().splitlines()[-1])
    assert record["terms"]["kl/teacher"] > 0 and record["terms"]["ce/contrastive"] > 0
    assert record["loss"] == pytest.approx(record["terms"]["ce/contrastive"] + 0.5 * record["terms"]["kl/teacher"],
                                           rel=1e-5)
    saved = json.loads((tmp_path / "kd" / "model" / "dense_config.json").read_text())
    assert (saved["mode"], saved["pooling"], saved["query_prefix"]) == ("custom", "cls", "query:")


def test_trainer_bad_input(tiny: dict[str, Path], tmp_path: Path) -> None:
    common = ["--train_sets", tiny["train"], "--output_dir", tmp_path / "out"]
    assert "base_model=''" in last_error(train(*common, check=False))
    assert "base model config not found" in last_error(train("--base_model", tmp_path / "none", *common, check=False))
    line = last_error(train("--base_model", tiny["base"], "--mode", "custom", "--negatives_cross_device", *common,
                            check=False))
    assert "negatives_cross_device=True is invalid" in line
    bad_teacher = tmp_path / "teacher.tsv"
    bad_teacher.write_text("q0\td0\t1.0\n")
    line = last_error(train("--base_model", tiny["base"], "--teacher_files", bad_teacher, *common, check=False))
    assert "has no teacher score for documents" in line and str(bad_teacher) in line
    assert not (tmp_path / "out" / "model").exists()


def test_encoder_cli_bad_input_leaves_no_output(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "faiss"
    line = last_error(encode("--model", tiny["base"], "--corpus", tiny["beir"], "--output", out))
    assert "pooling=None is invalid" in line and "dense_config.json" in line
    trap = tmp_path / "sentence-model"  # Pyserini would force mean pooling + L2 for this path
    shutil.copytree(tiny["base"], trap)
    line = last_error(encode("--model", trap, "--pooling", "cls", "--corpus", tiny["beir"], "--output", out))
    assert "without the word 'sentence'" in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"_id": "d 1", "title": "", "text": "cat"}) + "\n")
    line = last_error(encode("--model", tiny["base"], "--pooling", "mean", "--corpus", bad, "--output", out))
    assert "document id 'd 1'" in line
    line = last_error(encode("--model", tiny["base"], "--pooling", "mean", "--corpus", tmp_path / "nothing",
                             "--output", out))
    assert "corpus file not found" in line
    assert not out.exists() and not list(tmp_path.glob(".faiss*"))
