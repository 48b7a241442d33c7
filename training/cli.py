"""The one ``main`` of the training CLIs (``python -m matryoshka.training``, ``python -m matryoshka.training.dense``).

:func:`run_training` parses ``argv`` into ``(model_arguments, DataArguments, TrainArguments)``, trains with
``trainer``, always tears down the process group, and on rank 0 prints where the model went (or where a
``--stop_after_steps`` run stopped) and the last logged loss. User errors are left to the caller's
:func:`matryoshka.errors.cli_main` (one ``error:`` line, exit status 2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matryoshka.training.arguments import DataArguments, TrainArguments
    from matryoshka.training.trainer import Trainer


def run_training(argv: Sequence[str] | None, model_arguments: type,
                 trainer: Callable[[Any, DataArguments, TrainArguments], Trainer], prog: str, *,
                 model_name: str = "model", term_separator: str = " ") -> int:
    """Train and report (see the module docstring); ``model_name`` and ``term_separator`` shape the two summary
    lines (``trained N steps; <model_name> saved to ...``, ``last loss x (<term><term_separator>v, ...)``)."""
    import torch

    from matryoshka.training.arguments import DataArguments, TrainArguments, parse_arguments

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_args, data_args, train_args = parse_arguments(
            (model_arguments, DataArguments, TrainArguments), argv, prog=prog)
        runner = trainer(model_args, data_args, train_args)
        result = runner.train()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if runner.rank == 0:
        if result.stopped_early:
            print(f"stopped after step {result.step} of {result.total_steps} (continue with --resume)")
        else:
            print(f"trained {result.step} steps; {model_name} saved to {result.model_dir}")
            if result.last_log:
                terms = ", ".join(f"{k}{term_separator}{v:.4f}" for k, v in result.last_log["terms"].items())
                print(f"last loss {result.last_log['loss']:.4f} ({terms})")
    return 0
