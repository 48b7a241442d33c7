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

import sys
from collections.abc import Sequence

from matryoshka.errors import cli_main


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from matryoshka.training.arguments import ModelArguments
    from matryoshka.training.cli import run_training
    from matryoshka.training.trainer import Trainer

    return run_training(argv, ModelArguments, Trainer, "python -m matryoshka.training")


if __name__ == "__main__":
    sys.exit(main())
