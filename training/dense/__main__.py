"""``python -m matryoshka.training.dense``: train a bi-encoder (dense retriever) on training-set folders.

Flags or one JSON file with the same keys::

    python -m matryoshka.training.dense --base_model <all-MiniLM-L6-v2 dir> --normalize \
        --similarity_temperature 0.05 --train_sets runs/train/scifact-train runs/train/nfcorpus-train \
        --group_size 4 --per_device_batch_size 16 --passage_max_length 128 --bf16 --output_dir runs/dense-train

Distillation: ``--teacher_files`` (one TSV per training set; ``--teacher_weight``, ``--temperature``).
Multi-process: ``torchrun --nproc_per_node N -m matryoshka.training.dense ... --negatives_cross_device``.
The model is saved to ``<output_dir>/model`` (or ``--final_model_dir``); encode a corpus with
``python -m matryoshka.training.dense.encode``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from matryoshka.errors import cli_main


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from matryoshka.training.arguments import DataArguments, TrainArguments, parse_arguments
    from matryoshka.training.dense.arguments import DenseArguments
    from matryoshka.training.dense.trainer import DenseTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        dense_args, data_args, train_args = parse_arguments(
            (DenseArguments, DataArguments, TrainArguments), argv, prog="python -m matryoshka.training.dense")
        trainer = DenseTrainer(dense_args, data_args, train_args)
        result = trainer.train()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if trainer.rank == 0:
        if result.stopped_early:
            print(f"stopped after step {result.step} of {result.total_steps} (continue with --resume)")
        else:
            print(f"trained {result.step} steps; dense model saved to {result.model_dir}")
            if result.last_log:
                parts = ", ".join(f"{k}: {v:.4f}" for k, v in result.last_log["terms"].items())
                print(f"last loss {result.last_log['loss']:.4f} ({parts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
