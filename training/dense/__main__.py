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

import sys
from collections.abc import Sequence

from matryoshka.errors import cli_main


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from matryoshka.training.cli import run_training
    from matryoshka.training.dense.arguments import DenseArguments
    from matryoshka.training.dense.trainer import DenseTrainer

    return run_training(argv, DenseArguments, DenseTrainer, "python -m matryoshka.training.dense",
                        model_name="dense model", term_separator=": ")


if __name__ == "__main__":
    sys.exit(main())
