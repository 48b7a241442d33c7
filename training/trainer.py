"""The training loop: AdamW + linear warm-up/decay, bf16 autocast, gradient checkpointing, checkpoints, resume, DDP.

Phases (``TrainArguments.phase``), each a run of this loop with its own :class:`Objective`:

1. ``layerwise_ce``: listwise CE at every exit (+ KL to the teacher file's scores when given);
2. ``self_distill``: the same plus distillation from deeper exits to shallower ones;
3. ``compensation``: from a self-distilled checkpoint (``init_checkpoint``), only the per-exit compensation
   trains (:func:`freeze_for_compensation`); the residuals are then measured on held-out groups and recorded.

Determinism and resume: the groups of an epoch depend on ``(seed, epoch)`` only (:class:`GroupSampler`), and every
step reseeds torch (dropout) from ``(seed, step, rank)`` and draws its compression from a generator seeded with
``(seed, step)``. A checkpoint therefore needs only the weights, the optimizer, the scheduler and the step: resuming
replays exactly what an uninterrupted run does. Checkpoints are folders written atomically
(``checkpoint-<step>/model`` in :meth:`LayerwiseReranker.save` format + ``trainer_state.pt``).

DDP: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in ``DistributedDataParallel`` (NCCL on GPU, gloo
on CPU); each rank takes its slice of every step's groups. At the end every rank's weight digest is recorded in
``summary.json``.

Other models reuse this loop by overriding the hooks listed in :class:`Trainer` (the bi-encoder:
:class:`matryoshka.training.dense.trainer.DenseTrainer`); the update itself (backward, clipping, optimizer and
scheduler step) is :meth:`Trainer._step`'s alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from matryoshka.errors import MatryoshkaError, OptionError
from matryoshka.io import atomic_directory, atomic_write
from matryoshka.training.arguments import DataArguments, ModelArguments, TrainArguments
from matryoshka.training.collator import GroupCollator, model_inputs
from matryoshka.training.data import (
    GroupSampler,
    check_teacher_coverage,
    load_training_set,
    read_teacher_scores,
    shard,
)

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
LOG_FILE = "log.jsonl"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainResult:
    step: int
    total_steps: int
    model_dir: Path | None
    stopped_early: bool
    last_log: dict[str, Any]


@dataclass
class BatchLoss:
    """What one batch gives the update (:meth:`Trainer._batch_loss`): the loss to minimise, the per-term values to
    log (floats or 0-d tensors, by name), and the step's sampled compression as a dict (``None``: none)."""

    loss: Tensor
    terms: Mapping[str, Any]
    compression: dict[str, int] | None = None


def _dist() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _seed_for(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") % (2 ** 63)


def weight_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Trainer:
    """See the module docstring. ``Trainer(model_args, data_args, train_args).train()``.

    ``model_args`` is the model's arguments dataclass (:class:`ModelArguments` here, a subclass's own otherwise).
    Hooks a subclass overrides (each called once, in this order, unless said otherwise):

    - :meth:`_check_arguments`: reject option combinations before anything is built;
    - :meth:`_load_model`, :meth:`_trainable_parameters`, :meth:`_make_collator`, :meth:`_make_objective`;
    - :meth:`_batch_loss` (every step): how a batch of groups becomes a :class:`BatchLoss`;
    - :meth:`_logged` (every step, after the update): the loss and terms written to the log.

    What is saved is the model's own: ``model.save(folder)`` in checkpoints and as the final model, and
    ``model.config.compensation`` in ``summary.json``.
    """

    model_args: ModelArguments

    def __init__(self, model_args: Any, data_args: DataArguments, args: TrainArguments) -> None:
        self.model_args, self.data_args, self.args = model_args, data_args, args
        self._check_arguments()
        self.rank, self.world, self.local_rank = _dist()
        self.output = Path(args.output_dir)
        self.device = self._pick_device()
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
        torch.manual_seed(_seed_for(args.seed, "init"))
        self.model = self._load_model().to(self.device)
        self.params = self._trainable_parameters()
        self.sampler = self._sampler()
        self.collator = self._make_collator()
        self.objective = self._make_objective()

    # ------------------------------------------------------------------------------------------------ hooks
    def _check_arguments(self) -> None:
        """Raise :class:`OptionError` for options that cannot train together (before any model is loaded)."""
        if self.args.phase == "compensation" and not self.model_args.init_checkpoint:
            raise OptionError("init_checkpoint", None, "a self-distilled checkpoint for the compensation phase")

    def _load_model(self) -> nn.Module:
        """The model to train (moved to the device by the caller); here a built or loaded reranker."""
        from matryoshka.training.modeling import LayerwiseReranker

        m = self.model_args
        if m.init_checkpoint:
            return LayerwiseReranker.load(m.init_checkpoint)
        return LayerwiseReranker.build(
            m.base_model, exits=m.exits or None, compress_layers=tuple(m.compress_layers),
            compress_ratios=tuple(m.compress_ratios), compress_method=m.compress_method, max_length=m.max_length,
            query_length=m.query_length, gguf_file=m.gguf_file, seed=m.head_seed, readout=m.readout,
            attention=m.attention)

    def _trainable_parameters(self) -> list[nn.Parameter]:
        """Set ``requires_grad`` for the phase and return the parameters the optimizer updates (and clips)."""
        from matryoshka.training.compensation import freeze_for_compensation

        model = self.model
        if self.args.phase == "compensation":
            return freeze_for_compensation(model)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        for parameter in model.compensation.parameters():  # the identity until the compensation phase
            parameter.requires_grad_(False)
        if self.model_args.freeze_word_embeddings:
            model.backbone.get_input_embeddings().weight.requires_grad_(False)
        return [p for p in model.parameters() if p.requires_grad]

    def _make_collator(self) -> Callable[[list], dict[str, Any]]:
        """Turns a list of groups into a batch dict (called after the model and the sampler exist)."""
        return GroupCollator(self.model.layout, self.model.tokenizer)

    def _make_objective(self) -> Callable[..., tuple[Tensor, dict[str, Any]]]:
        """The phase's loss function (called last in ``__init__``)."""
        return build_objective(self.args, tuple(self.model.config.exits), self.sampler.has_teacher)

    def _batch_loss(self, net: nn.Module, groups: list, step: int) -> BatchLoss:
        """One step's loss on this rank's ``groups``, computed with ``net`` (the model, or its DDP wrapper); torch
        is already seeded for the step. Here: the exit scores of a sampled compression, through the objective."""
        a = self.args
        generator = torch.Generator().manual_seed(_seed_for(a.seed, step, "compression"))
        compression = self.model.sample_compression(generator) if self.model.config.compress_layers else None
        batch = self.collator(groups)
        teacher = batch.get("teacher_scores")
        teacher = teacher.reshape(-1).to(self.device) * a.teacher_scale if teacher is not None else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            scores = net(**model_inputs(batch, self.device), compression=compression)
        loss, terms = self.objective(_to_float(scores), batch["group_size"], teacher_scores=teacher)
        return BatchLoss(loss, {k: v for k, v in terms.items() if k != "loss"},
                         None if compression is None else compression.to_dict())

    def _logged(self, batch: BatchLoss) -> tuple[float, dict[str, float]]:
        """The logged loss and terms of a step (called after the update); here this rank's own values."""
        return float(batch.loss.detach()), dict(batch.terms)

    # ------------------------------------------------------------------------------------------------ setup
    def _pick_device(self) -> torch.device:
        wanted = self.args.device
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        if wanted == "cuda":
            if not torch.cuda.is_available():
                raise OptionError("device", "cuda", "'cpu' or 'auto': no CUDA device is visible")
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def _sampler(self) -> GroupSampler:
        d = self.data_args
        sets = [load_training_set(path) for path in d.train_sets]
        teachers = None
        if d.teacher_files:
            teachers = []
            for training_set, path in zip(sets, d.teacher_files, strict=True):
                scores = read_teacher_scores(path)
                check_teacher_coverage(training_set, scores, path)
                teachers.append(scores)
        return GroupSampler(sets, d.group_size, self.args.seed, teachers, d.negative_depth, d.queries_per_epoch,
                            d.positives_per_query)

    def _optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        a = self.args
        head_ids = {id(p) for name, p in self.model.named_parameters()
                    if name.startswith(("heads.", "compensation.", "compress_scorer."))}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for parameter in self.params:
            groups.setdefault((parameter.ndim < 2, id(parameter) in head_ids), []).append(parameter)
        param_groups = [{"params": ps, "weight_decay": 0.0 if no_decay else a.weight_decay,
                         "lr": a.head_learning_rate if (is_head and a.head_learning_rate) else a.learning_rate}
                        for (no_decay, is_head), ps in sorted(groups.items())]
        optimizer = torch.optim.AdamW(param_groups, lr=a.learning_rate, fused=False, foreach=False)
        warmup = int(total_steps * a.warmup_ratio)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _prepare_output(self) -> int:
        """Create or check ``output_dir``; return the step to resume from (0 for a fresh run)."""
        a = self.args
        ours = [p for p in self.output.glob("*") if CHECKPOINT_RE.match(p.name) or p.name in
                (LOG_FILE, "model", "summary.json", "arguments.json")] if self.output.is_dir() else []
        if a.resume:
            return max((int(CHECKPOINT_RE.match(p.name).group(1)) for p in ours if CHECKPOINT_RE.match(p.name)
                        and (p / STATE_FILE).is_file()), default=0)
        if ours and not a.overwrite_output_dir:
            raise OptionError("output_dir", str(self.output), "an empty or new folder (or pass --resume / "
                              "--overwrite_output_dir)")
        self._barrier()
        if self.rank == 0:
            for path in ours:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self._barrier()
        return 0

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        a = self.args
        start_step = self._prepare_output()
        steps_per_epoch = len(shard(self.sampler.epoch(0), self.rank, self.world, a.per_device_batch_size))
        total = steps_per_epoch * a.num_epochs
        total = min(total, a.max_steps) if a.max_steps else total
        optimizer, scheduler = self._optimizer(total)
        if start_step:
            self._load_checkpoint(start_step, optimizer, scheduler)
        if self.rank == 0:
            self.output.mkdir(parents=True, exist_ok=True)
            self._write_json("arguments.json", {"model": asdict(self.model_args), "data": asdict(self.data_args),
                                                "train": asdict(a), "world_size": self.world})
            self._truncate_log(start_step)
        if a.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        net: nn.Module = self.model
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.model.train()
        logger.info("phase %s: %d steps (%d per epoch), %d trainable parameters, world size %d, start at step %d",
                    a.phase, total, steps_per_epoch, sum(p.numel() for p in self.params), self.world, start_step)
        bar = tqdm(total=total, initial=start_step, desc=a.phase, disable=self.rank != 0)
        step, last_log, epoch_batches, epoch = start_step, {}, [], -1
        while step < total:
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                epoch_batches = shard(self.sampler.epoch(epoch), self.rank, self.world, a.per_device_batch_size)
            groups = epoch_batches[step % steps_per_epoch]
            record = self._step(net, groups, optimizer, scheduler, step)
            step += 1
            bar.update(1)
            bar.set_postfix({"loss": f"{record['loss']:.3f}"} |
                            {k: f"{v:.3f}" for k, v in record["terms"].items() if k.startswith("ce/")})
            if step % a.logging_steps == 0 or step == total:
                last_log = {"step": step, "epoch": round(step / steps_per_epoch, 4), **record}
                self._log(last_log)
            stopping = bool(a.stop_after_steps) and step == a.stop_after_steps and step < total
            if (a.save_steps and step % a.save_steps == 0) or step == total or stopping:
                self._save_checkpoint(step, optimizer, scheduler)  # a stop always leaves its step to resume from
            if stopping:
                bar.close()
                return TrainResult(step, total, None, True, last_log)
        bar.close()
        model_dir = self._finish(step)
        return TrainResult(step, total, model_dir, False, last_log)

    def _step(self, net: nn.Module, groups: list, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> dict[str, Any]:
        """Seed, :meth:`_batch_loss`, backward, clip, optimizer and scheduler step; the step's log record."""
        a = self.args
        torch.manual_seed(_seed_for(a.seed, step, self.rank))
        batch = self._batch_loss(net, groups, step)
        optimizer.zero_grad(set_to_none=True)
        batch.loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, a.max_grad_norm) if a.max_grad_norm
                     else torch.zeros(()))
        optimizer.step()
        scheduler.step()
        loss, terms = self._logged(batch)
        return {"loss": loss, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], "terms": terms,
                "compression": batch.compression}

    # ------------------------------------------------------------------------------------------------ persistence
    def _save_checkpoint(self, step: int, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        if self.rank == 0:
            with atomic_directory(self.output / f"checkpoint-{step}", overwrite=True) as tmp:
                self.model.save(tmp / "model")
                torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "phase": self.args.phase, "world_size": self.world}, tmp / STATE_FILE)
            old = sorted((int(CHECKPOINT_RE.match(p.name).group(1)), p) for p in self.output.iterdir()
                         if CHECKPOINT_RE.match(p.name))
            for _, path in old[: -self.args.keep_checkpoints]:
                shutil.rmtree(path, ignore_errors=True)
        self._barrier()

    def _load_checkpoint(self, step: int, optimizer: torch.optim.Optimizer,
                         scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        from safetensors.torch import load_file

        folder = self.output / f"checkpoint-{step}"
        state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=True)
        if state.get("phase") != self.args.phase or state.get("world_size") != self.world:
            raise OptionError("resume", str(folder), f"a checkpoint of phase {self.args.phase!r} with world size "
                              f"{self.world} (found {state.get('phase')!r}, {state.get('world_size')})")
        self.model.load_state_dict(load_file(str(folder / "model" / "model.safetensors"), device=str(self.device)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        logger.info("resumed from %s (step %d)", folder, step)

    def _finish(self, step: int) -> Path:
        model_dir = Path(self.args.final_model_dir or self.output / "model")
        if self.args.phase == "compensation":
            self._measure_residuals()
        digests = [weight_digest(self.model)]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, digests[0])
            digests = gathered
        if self.rank == 0:
            self.model.save(model_dir, overwrite=True)
            self._write_json("summary.json", {"step": step, "model_dir": str(model_dir), "weight_digests": digests,
                                              "compensation": self.model.config.compensation})
        self._barrier()
        return model_dir

    def _measure_residuals(self) -> None:
        from matryoshka.training.compensation import measure_residuals

        d = self.data_args
        if d.residual_set:
            sampler = GroupSampler([load_training_set(d.residual_set)], d.group_size, self.args.seed + 1)
        else:
            logger.warning("no residual_set: measuring the compensation residuals on training groups")
            sampler = self.sampler
        groups = sampler.epoch(0)[: d.residual_groups]
        size = self.args.per_device_batch_size
        batches = [self.collator(groups[i: i + size]) for i in range(0, len(groups), size)]
        residuals = measure_residuals(self.model, batches)
        logger.info("compensation residual std per exit: %s", residuals)

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        with atomic_write(self.output / name) as handle:
            json.dump(data, handle, indent=2, default=str)
            handle.write("\n")

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if not all(math.isfinite(v) for v in [record["loss"], *record["terms"].values()]):
            raise MatryoshkaError(f"step {record['step']}: the loss is not finite ({record['loss']}); lower the "
                                  "learning rate or check the teacher scores")
        with (self.output / LOG_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        """On resume, forget log lines written after the checkpoint (the steps are replayed)."""
        path = self.output / LOG_FILE
        if not path.is_file():
            return
        lines = [line for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and json.loads(line)["step"] <= step]
        with atomic_write(path) as handle:
            handle.writelines(line + "\n" for line in lines)


def build_objective(args: TrainArguments, exits: tuple[int, ...], has_teacher: bool) -> Any:
    """The phase's :class:`Objective`; the teacher term is on when teacher files are given and its weight > 0."""
    from matryoshka.training.losses import SelfDistillStrategy
    from matryoshka.training.objective import Objective, PhaseType

    strategy = SelfDistillStrategy(args.distill_strategy)
    if strategy is SelfDistillStrategy.TEACHER and not has_teacher:
        raise OptionError("distill_strategy", args.distill_strategy, "teacher files (--teacher_files) to distil from")
    teacher_weight = args.teacher_weight if has_teacher and args.phase != "compensation" else 0.0
    return Objective(PhaseType(args.phase), exits, temperature=args.temperature, strategy=strategy,
                     anchors=tuple(args.anchors), distill_weight=args.distill_weight, teacher_weight=teacher_weight,
                     gap_weight=args.gap_weight)


def _to_float(scores: Any) -> Any:
    """Exit scores in float32 for the loss (autocast may have produced bf16)."""
    from dataclasses import replace

    return replace(scores, raw=scores.raw.float(), calibrated=scores.calibrated.float())
