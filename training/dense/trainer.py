"""The bi-encoder trainer: the shared loop of :class:`matryoshka.training.trainer.Trainer` (groups, AdamW +
warm-up/decay, bf16 autocast, gradient checkpointing, atomic checkpoints, resume, DDP, ``log.jsonl``,
``summary.json``) with a :class:`~matryoshka.training.dense.modeling.BiEncoder` in place of the reranker.

Only the trainer's hooks are overridden: how the model is built, which parameters train, the collator/objective,
how a batch becomes a loss (encode queries and passages, contrastive + distillation loss; in ``corpus`` mode, encode
the queries only and score them against each training set's fixed passage index, :mod:`.corpus`) and what is
logged. Under DDP the contrastive term can use every rank's passages (``negatives_cross_device``); the logged loss
is then averaged over ranks, which equals the single-process loss on the concatenated batch.
"""

from __future__ import annotations

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
from matryoshka.training.trainer import BatchLoss, Trainer


class DenseTrainer(Trainer):
    """``DenseTrainer(dense_args, data_args, train_args).train()``; the model is saved as a dense model folder."""

    model_args: DenseArguments

    def __init__(self, model_args: DenseArguments, data_args: DataArguments, args: TrainArguments) -> None:
        super().__init__(model_args, data_args, args)
        self.indexes: list[PassageIndex] = []
        if model_args.mode is TrainingMode.CORPUS:
            self.indexes = self._passage_indexes()

    # ------------------------------------------------------------------------------------------------ hooks
    def _check_arguments(self) -> None:
        """Nothing beyond :class:`DenseArguments`' own checks."""

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

    def _make_collator(self) -> DenseCollator:
        return DenseCollator(self.model, known_positives(self.sampler.training_sets))

    def _make_objective(self) -> DenseObjective:
        m = self.model_args
        return DenseObjective(temperature=m.similarity_temperature, mode=m.mode,
                              cross_device=m.negatives_cross_device and self.world > 1,
                              teacher_weight=self.args.teacher_weight, teacher_temperature=self.args.temperature)

    def _batch_loss(self, net: nn.Module, groups: list, step: int) -> BatchLoss:
        """Contrastive (+ distillation) loss of the queries and passages of ``groups``; see :meth:`_corpus_loss`."""
        if self.indexes:
            return self._corpus_loss(net, groups)
        a = self.args
        batch = self.collator(groups)
        teacher = batch.get("teacher_scores")
        teacher = teacher.to(self.device) * a.teacher_scale if teacher is not None else None
        query = {k: v.to(self.device) for k, v in batch["query"].items()}
        passage = {k: v.to(self.device) for k, v in batch["passage"].items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.bf16):
            q_reps, p_reps = net(query, passage)
        loss, parts = self.objective(q_reps, p_reps, batch["group_size"], teacher,
                                     batch["passage_keys"].to(self.device), batch["positive_keys"].to(self.device))
        return BatchLoss(loss, parts)

    def _logged(self, batch: BatchLoss) -> tuple[float, dict[str, float]]:
        """The loss and terms averaged over ranks (= the loss of the concatenated batch: equal rows per rank)."""
        values = torch.stack([batch.loss.detach().float(), *(v.detach().float() for v in batch.terms.values())])
        if self.world > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
            values = values / self.world
        return float(values[0]), {name: float(v) for name, v in zip(batch.terms, values[1:], strict=True)}

    # ------------------------------------------------------------------------------------------------ corpus mode
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

    def _corpus_loss(self, net: nn.Module, groups: list) -> BatchLoss:
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
        return BatchLoss(loss, {"ce/corpus": loss})
