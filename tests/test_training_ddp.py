"""Two-process DDP on CPU (gloo) through torchrun: both ranks train on their own groups and end with one model."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests._torchrun import torchrun
from tests.fixtures.tiny_models import make_tiny_base
from tests.test_training_loop import make_training_data


def test_two_process_gloo_ddp_ends_with_identical_weights(tmp_path: Path) -> None:
    data, teacher = make_training_data(tmp_path, n_queries=8)
    base = make_tiny_base(tmp_path / "base", "bert", num_layers=4, hidden=32, heads=4)
    out = tmp_path / "ddp"
    proc = torchrun("-m", "matryoshka.training", "--base_model", base, "--exits", "2", "4", "--max_length", "32",
                    "--query_length", "8", "--train_sets", data, "--teacher_files", teacher, "--group_size", "4",
                    "--per_device_batch_size", "2", "--num_epochs", "2", "--phase", "self_distill", "--learning_rate",
                    "1e-3", "--device", "cpu", "--logging_steps", "1", "--output_dir", out)
    assert "trained 4 steps" in proc.stdout                  # 8 groups per epoch / (2 ranks x 2 groups) x 2 epochs
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    arguments = json.loads((out / "arguments.json").read_text())
    assert arguments["world_size"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
