"""``python -m matryoshka.training`` (or ``python -m matryoshka train``): train a layer-wise reranker.

Flags or one JSON file with the same keys (see :mod:`matryoshka.training.arguments`)::

    python -m matryoshka.training --base_model <minilm dir> --exits 2 3 4 6 \
        --train_sets runs/train/scifact-train runs/train/nfcorpus-train \
        --teacher_files runs/train/scifact-train.teacher.tsv runs/train/nfcorpus-train.teacher.tsv \
        --phase self_distill --num_epochs 3 --bf16 --output_dir runs/minilm-distill-train

Multi-GPU / multi-process: ``torchrun --nproc_per_node N -m matryoshka.training ...`` (gloo on CPU).
Resume after a kill: the same command with ``--resume``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from matryoshka.errors import cli_main


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from matryoshka.training.arguments import DataArguments, ModelArguments, TrainArguments, parse_arguments
    from matryoshka.training.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_args, data_args, train_args = parse_arguments(
            (ModelArguments, DataArguments, TrainArguments), argv, prog="python -m matryoshka.training")
        trainer = Trainer(model_args, data_args, train_args)
        result = trainer.train()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if trainer.rank == 0:
        if result.stopped_early:
            print(f"stopped after step {result.step} of {result.total_steps} (continue with --resume)")
        else:
            print(f"trained {result.step} steps; model saved to {result.model_dir}")
            if result.last_log:
                terms = ", ".join(f"{k} {v:.4f}" for k, v in result.last_log["terms"].items())
                print(f"last loss {result.last_log['loss']:.4f} ({terms})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
