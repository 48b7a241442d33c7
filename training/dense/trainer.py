"""The bi-encoder trainer: the shared loop of :class:`matryoshka.training.trainer.Trainer` (groups, AdamW +
warm-up/decay, bf16 autocast, gradient checkpointing, atomic checkpoints, resume, DDP, ``log.jsonl``,
``summary.json``) with a :class:`~matryoshka.training.dense.modeling.BiEncoder` in place of the reranker.

Only what differs is overridden: how the model is built, which parameters train, the collator/objective, and one
optimisation step (encode queries and passages, contrastive + distillation loss; in ``corpus`` mode, encode the
queries only and score them against each training set's fixed passage index, :mod:`.corpus`). Under DDP the
contrastive term can use every rank's passages (``negatives_cross_device``); the logged loss is then averaged over
ranks, which equals the single-process loss on the concatenated batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from matryoshka.errors import OptionError
from matryoshka.training.arguments import DataArguments, TrainArguments
from matryoshka.training.dense.arguments import DenseArguments
from matryoshka.training.dense.collator import DenseCollator, known_positives
from matryoshka.training.dense.config import TrainingMode
from matryoshka.training.dense.corpus import PassageIndex, load_passage_index
from matryoshka.training.dense.losses import DenseObjective, corpus_loss
from matryoshka.training.dense.modeling import BiEncoder
from matryoshka.training.trainer import Trainer, _dist, _seed_for


class DenseTrainer(Trainer):
    """``DenseTrainer(dense_args, data_args, train_args).train()``; the model is saved as a dense model folder."""

    def __init__(self, model_args: DenseArguments, data_args: DataArguments, args: TrainArguments) -> None:
        self.model_args, self.data_args, self.args = model_args, data_args, args
        self.rank, self.world, self.local_rank = _dist()
        self.output = Path(args.output_dir)
        self.device = self._pick_device()
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(_seed_for(args.seed, "init"))
        self.model = self._load_model().to(self.device)
        self.params = self._trainable_parameters()
        self.sampler = self._sampler()
        self.collator = DenseCollator(self.model, known_positives(self.sampler.training_sets))
        self.objective = DenseObjective(
            temperature=model_args.similarity_temperature, mode=model_args.mode,
            cross_device=model_args.negatives_cross_device and self.world > 1,
            teacher_weight=args.teacher_weight, teacher_temperature=args.temperature)
        self.indexes: list[PassageIndex] = []
        if model_args.mode is TrainingMode.CORPUS:
            self.indexes = self._passage_indexes()

    def _passage_indexes(self) -> list[PassageIndex]:
        m, d = self.model_args, self.data_args
        if len(m.passage_indexes) != len(d.train_sets):
            raise OptionError("passage_indexes", m.passage_indexes,
                              f"one Faiss index folder per training set ({len(d.train_sets)}), in the same order")
        if d.teacher_files:
            raise OptionError("teacher_files", d.teacher_files, "none in corpus mode (its target is the graded "
                              "positives over the whole corpus)")
        passages = self.model.passage_model()
        self._positives = [{q.qid: q.positives for q in ts.queries} for ts in self.sampler.training_sets]
        indexes = [load_passage_index(folder, ts, passages)
                   for folder, ts in zip(m.passage_indexes, self.sampler.training_sets, strict=True)]
        for index in indexes:
            index.vectors = index.vectors.to(self.device)
        return indexes

    def _load_model(self) -> nn.Module:
        m = self.model_args
        # normalize=None lets a saved dense model (as base_model) keep its own setting unless --normalize is given
        return BiEncoder.build(m.base_model, pooling=m.pooling, normalize=True if m.normalize else None,
                               query_prefix=m.query_prefix,
                               passage_prefix=m.passage_prefix, query_max_length=m.query_max_length,
                               passage_max_length=m.passage_max_length, temperature=m.similarity_temperature,
                               mode=m.mode, sub_batch_size=m.sub_batch_size)

    def _trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _step(self, net: nn.Module, groups: list, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> dict[str, Any]:
        a = self.args
        torch.manual_seed(_seed_for(a.seed, step, self.rank))
        if self.indexes:
            return self._corpus_step(net, groups, optimizer, scheduler)
        batch = self.collator(groups)
        teacher = batch.get("teacher_scores")
        teacher = teacher.to(self.device) * a.teacher_scale if teacher is not None else None
        query = {k: v.to(self.device) for k, v in batch["query"].items()}
        passage = {k: v.to(self.device) for k, v in batch["passage"].items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            q_reps, p_reps = net(query, passage)
        loss, parts = self.objective(q_reps, p_reps, batch["group_size"], teacher,
                                     batch["passage_keys"].to(self.device), batch["positive_keys"].to(self.device))
        return self._update(loss, parts, optimizer, scheduler)

    def _corpus_step(self, net: nn.Module, groups: list, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
        """Corpus mode: each group's query against every document of its training set's index."""
        config = self.model.config
        query = self.model.tokenize([config.query_text(g.query) for g in groups], "query")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            q_reps, _ = net({k: v.to(self.device) for k, v in query.items()})
        total = q_reps.new_zeros((), dtype=torch.float32)
        for source in sorted({g.source for g in groups}):
            rows = [i for i, g in enumerate(groups) if g.source == source]
            index = self.indexes[source]
            targets = index.targets([self._positives[source][groups[i].qid] for i in rows]).to(self.device)
            total = total + corpus_loss(q_reps[rows], index.vectors, targets, self.objective.temperature).sum()
        loss = total / len(groups)
        return self._update(loss, {"ce/corpus": loss}, optimizer, scheduler)

    def _update(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
        """Backward, clip, optimizer and scheduler step; the logged values (averaged over ranks)."""
        a = self.args
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, a.max_grad_norm) if a.max_grad_norm
                     else torch.zeros(()))
        optimizer.step()
        scheduler.step()
        values = torch.stack([loss.detach().float(), *(v.detach().float() for v in parts.values())])
        if self.world > 1:  # the mean over ranks = the loss of the concatenated batch (equal rows per rank)
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
            values = values / self.world
        return {"loss": float(values[0]), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                "terms": {name: float(v) for name, v in zip(parts, values[1:], strict=True)},
                "compression": None}
