"""The training loop on a tiny model (CPU): per-exit logging, the three phases, resume after a stop = no stop."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.io import Document
from matryoshka.training.data import TrainingQuery, write_teacher_scores, write_training_set
from tests.fixtures.tiny_models import WORDS, make_tiny_base

CONTENT = [w for w in WORDS if w[0].islower() and w not in ("whether", "passage", "contains", "an", "answer", "to",
                                                            "query")]


def make_training_data(root: Path, n_queries: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """A tiny training set over the tiny tokenizer's words, with a teacher file (relevant docs share words)."""
    rng = random.Random(seed)
    corpus = {f"d{i}": Document(f"d{i}", "", " ".join(rng.choice(CONTENT) for _ in range(rng.randint(3, 12))))
              for i in range(40)}
    queries, teacher = [], {}
    for q in range(n_queries):
        positive = f"d{q}"
        text = " ".join(corpus[positive].text.split()[:3])
        candidates = tuple(f"d{i}" for i in rng.sample(range(n_queries, 40), 10))
        queries.append(TrainingQuery(f"q{q}", text, {positive: 1 + q % 2}, candidates, {positive: 5.0}))
        teacher[f"q{q}"] = {d: (1.0 if d == positive else rng.random() * 0.5) for d in (positive, *candidates)}
    folder = write_training_set(root / "set", queries, corpus, {"name": "tiny"})
    return folder, write_teacher_scores(root / "teacher.tsv", teacher)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loop")
    data, teacher = make_training_data(root)
    return {"root": root, "base": make_tiny_base(root / "base", "bert", num_layers=4, hidden=32, heads=4),
            "data": data, "teacher": teacher}


def train(setup: dict[str, Path], out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["--base_model", str(setup["base"]), "--exits", "2", "3", "4", "--max_length", "32", "--query_length",
            "8", "--train_sets", str(setup["data"]), "--teacher_files", str(setup["teacher"]), "--group_size", "4",
            "--per_device_batch_size", "2", "--learning_rate", "1e-3", "--device", "cpu", "--output_dir", str(out),
            *extra]
    return subprocess.run([sys.executable, "-m", "matryoshka.training", *args], capture_output=True, text=True,
                          check=check)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_after_stop_gives_the_same_weights(setup: dict[str, Path]) -> None:
    root = setup["root"]
    common = ("--phase", "self_distill", "--num_epochs", "2", "--save_steps", "3", "--logging_steps", "1")
    train(setup, root / "straight", *common)
    stopped = train(setup, root / "resumed", *common, "--stop_after_steps", "3")
    assert "stopped after step 3 of 8" in stopped.stdout
    assert (root / "resumed" / "checkpoint-3" / "trainer_state.pt").is_file()
    assert not (root / "resumed" / "model").exists()
    # a stop between checkpoints (save_steps 3) still leaves its own step to resume from
    between = train(setup, root / "between", *common, "--stop_after_steps", "5")
    assert "stopped after step 5 of 8" in between.stdout and (root / "between" / "checkpoint-5").is_dir()
    train(setup, root / "between", *common, "--resume")
    c = weights(root / "between" / "model")
    refused = train(setup, root / "resumed", *common, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    train(setup, root / "resumed", *common, "--resume")
    a, b = weights(root / "straight" / "model"), weights(root / "resumed" / "model")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
        assert (a[key] - c[key]).abs().max() <= 1e-6, key
    log = [json.loads(line) for line in (root / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))                 # replayed steps are not logged twice
    assert {"ce/2", "ce/3", "ce/4", "self_distill/2", "teacher/4"} <= set(log[0]["terms"])
    straight = [json.loads(line) for line in (root / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in straight] == pytest.approx([r["loss"] for r in log], abs=1e-5)
    summary = json.loads((root / "straight" / "summary.json").read_text())
    assert summary["step"] == 8 and len(summary["weight_digests"]) == 1


def test_phases_and_json_arguments(setup: dict[str, Path]) -> None:
    root = setup["root"]
    config = {"base_model": str(setup["base"]), "exits": [2, 4], "max_length": 32, "query_length": 8,
              "train_sets": [str(setup["data"])], "teacher_files": [str(setup["teacher"])], "group_size": 4,
              "per_device_batch_size": 4, "learning_rate": 1e-3, "device": "cpu", "num_epochs": 3,
              "phase": "layerwise_ce", "output_dir": str(root / "ce"), "freeze_word_embeddings": True,
              "bf16": True, "gradient_checkpointing": True, "readout": "mean", "positives_per_query": [2]}
    (root / "ce.json").write_text(json.dumps(config))
    subprocess.run([sys.executable, "-m", "matryoshka.training", str(root / "ce.json")], check=True,
                   capture_output=True, text=True)
    log = [json.loads(line) for line in (root / "ce" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and {"ce/2", "ce/4", "teacher/2"} <= set(log[-1]["terms"])
    saved = json.loads((root / "ce" / "model" / "matryoshka_config.json").read_text())
    assert saved["readout"] == "mean"
    base = weights(root / "ce" / "model")
    from matryoshka.training.modeling import LayerwiseReranker

    built = LayerwiseReranker.build(setup["base"], exits=[2, 4], max_length=32, query_length=8).state_dict()
    word = next(k for k in base if k.endswith("word_embeddings.weight"))
    assert (base[word] == built[word]).all()                              # frozen
    layer = next(k for k in base if "layer.0." in k and k.endswith("weight"))
    assert not (base[layer] == built[layer]).all()                        # trained
    pattern = r"^compensation\.\d+\.(adapter\.2\.weight|adapter\.2\.bias|scale|bias)$"
    identity = [k for k in base if re.match(pattern, k)]
    assert identity and all((base[k] == built[k]).all() for k in identity)  # identity until phase 3
    train(setup, root / "comp", "--phase", "compensation", "--init_checkpoint", str(root / "ce" / "model"),
          "--num_epochs", "2", "--residual_set", str(setup["data"]), "--residual_groups", "4")
    trained = weights(root / "comp" / "model")
    assert all((trained[k] == base[k]).all() for k in base if not k.startswith("compensation."))
    assert any(not (trained[k] == base[k]).all() for k in base if k.startswith("compensation.2."))
    summary = json.loads((root / "comp" / "summary.json").read_text())
    assert "residual_std" in summary["compensation"]["per_exit"]["2"]


def test_bad_training_inputs(setup: dict[str, Path], tmp_path: Path) -> None:
    proc = train(setup, tmp_path / "x", "--phase", "compensation", check=False)
    assert proc.returncode == 2 and "init_checkpoint" in proc.stderr and not (tmp_path / "x").exists()
    (tmp_path / "t.tsv").write_text("q0\td0\t1.0\n")
    proc = subprocess.run([sys.executable, "-m", "matryoshka.training", "--base_model", str(setup["base"]),
                           "--train_sets", str(setup["data"]), "--teacher_files", str(tmp_path / "t.tsv"),
                           "--device", "cpu", "--output_dir", str(tmp_path / "y")], capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and "t.tsv" in last and "no teacher score" in last
    assert not (tmp_path / "y").exists()
    proc = train(setup, tmp_path / "z", "--positives_per_query", "1", "2", check=False)
    assert proc.returncode == 2 and "positives_per_query=[1, 2]" in proc.stderr and not (tmp_path / "z").exists()
