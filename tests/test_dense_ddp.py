"""Cross-device negatives under a real 2-process CPU gloo group (``torch.distributed.run``): the loss averaged over
ranks equals the single-process loss on the concatenated batch, the gradients add up to the single-process ones, and
the trainer's DDP run logs the same losses as a single-process run on the same groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.training.dense.config import TrainingMode
from matryoshka.training.dense.losses import contrastive_loss
from tests._torchrun import torchrun
from tests.fixtures.dense import make_tiny_dense_base, make_tiny_training_set

WORKER = '''
import json, sys
import torch
import torch.distributed as dist
from matryoshka.training.dense.config import TrainingMode
from matryoshka.training.dense.losses import contrastive_loss
dist.init_process_group("gloo")
rank = dist.get_rank()
generator = torch.Generator().manual_seed(0)
q, p = torch.randn(4, 8, generator=generator), torch.randn(12, 8, generator=generator)
keys, positives = torch.arange(1, 13), torch.tensor([[1, 10], [4, 0], [7, 2], [10, 0]])
ql = q[2 * rank:2 * rank + 2].clone().requires_grad_()
pl = p[6 * rank:6 * rank + 6].clone().requires_grad_()
loss = contrastive_loss(ql, pl, 3, 0.1, TrainingMode.NORMAL, cross_device=True,
                        passage_keys=keys[6 * rank:6 * rank + 6], positive_keys=positives[2 * rank:2 * rank + 2])
loss.backward()
mean = loss.detach().clone()
dist.all_reduce(mean)
json.dump({"loss": loss.item(), "mean": mean.item() / 2, "q_grad": ql.grad.tolist(), "p_grad": pl.grad.tolist()},
          open(f"{sys.argv[1]}/rank{rank}.json", "w"))
dist.destroy_process_group()
'''


def test_gathered_loss_and_gradients_equal_the_concatenated_batch(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun(script, tmp_path, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(4, 8, generator=generator).requires_grad_()
    p = torch.randn(12, 8, generator=generator).requires_grad_()
    full = contrastive_loss(q, p, 3, 0.1, TrainingMode.NORMAL, passage_keys=torch.arange(1, 13),
                            positive_keys=torch.tensor([[1, 10], [4, 0], [7, 2], [10, 0]]))
    full.backward()
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"], rel=1e-3)  # the ranks really hold different queries
    for r, result in enumerate(ranks):
        assert result["mean"] == pytest.approx(full.item(), rel=1e-5)
        # each rank's loss is a mean over half the queries: the ranks' gradients sum to 2x the full-batch gradient,
        # which DDP's averaging over the 2 ranks turns into exactly the full-batch gradient
        assert torch.allclose(torch.tensor(result["q_grad"]), 2 * q.grad[2 * r:2 * r + 2], atol=1e-5)
        assert torch.allclose(torch.tensor(result["p_grad"]), 2 * p.grad[6 * r:6 * r + 6], atol=1e-5)


def test_trainer_ddp_run_logs_the_single_process_losses(tmp_path: Path) -> None:
    base = make_tiny_dense_base(tmp_path / "base", "bert", dropout=0.0)
    data = make_tiny_training_set(tmp_path / "train")
    common = ["--base_model", base, "--normalize", "--train_sets", data, "--group_size", 3, "--max_steps", 2,
              "--logging_steps", 1, "--seed", 3]
    torchrun("-m", "matryoshka.training.dense", *common, "--per_device_batch_size", 2, "--negatives_cross_device",
             "--output_dir", tmp_path / "ddp", cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "matryoshka.training.dense", *map(str, common), "--per_device_batch_size",
                    "4", "--output_dir", str(tmp_path / "single")], check=True, capture_output=True, cwd=tmp_path)
    logs = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("ddp", "single")}
    assert [r["step"] for r in logs["ddp"]] == [1, 2]
    for ddp, single in zip(logs["ddp"], logs["single"], strict=True):
        assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-4)
        assert ddp["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-3)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert len(summary["weight_digests"]) == 2 and len(set(summary["weight_digests"])) == 1
