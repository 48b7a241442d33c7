"""Bi-encoder objectives: contrastive InfoNCE (in-batch / cross-device negatives, or per-group) and KL distillation.

Shapes: ``q`` ``[n, H]`` (one query per group), ``p`` ``[n * g, H]`` (group after group; row ``i * g`` is the positive
of query ``i``), ``teacher`` ``[n, g]``.

- ``normal`` mode: each query is scored against every passage of the batch; with cross-device negatives, against
  every rank's passages too, gathered by :func:`gather_with_grad`. Each rank's loss is the mean over its own
  queries; the gather's backward sums the other ranks' gradients into each rank's passages, so after DDP averages
  the gradients, training is exactly the single-process loss on the concatenated batch. In-batch passages that are
  known positives of a query (other than its target) are masked out (false negatives).
- ``custom`` mode: each query is scored against its own group only (no in-batch negatives).
- Distillation: ``KL(softmax(teacher / T) || softmax(student))`` over each query's own group (positives and
  negatives), added with ``teacher_weight``.
- ``corpus`` mode (query-side fine-tuning, :func:`corpus_loss`): each query against every document vector of a
  fixed index, soft cross-entropy to a target distribution over the corpus (its graded positives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from matryoshka.training.dense.config import DenseConfigError, TrainingMode


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _check_equal_rows(tensor: Tensor, world: int) -> None:
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    torch.distributed.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    found = [int(s) for s in sizes]
    if len(set(found)) != 1:
        raise DenseConfigError(f"cross-device negatives need the same number of rows on every rank, got {found}: "
                               "use the same per_device_batch_size and group_size everywhere")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = distributed_world()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: Tensor) -> tuple[Tensor, int]:
    """Every rank's rows (this rank's keep their gradient path) and this rank's row offset in the result."""
    rank, world = distributed_world()
    if world == 1:
        return tensor, 0
    _check_equal_rows(tensor, world)
    return _GatherWithGrad.apply(tensor), rank * tensor.shape[0]


def gather_no_grad(tensor: Tensor) -> Tensor:
    rank, world = distributed_world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def group_scores(q: Tensor, p: Tensor, group_size: int) -> Tensor:
    """``[n, g]``: each query against its own group's passages."""
    n = q.shape[0]
    if p.shape[0] != n * group_size:
        raise DenseConfigError(f"got {p.shape[0]} passages for {n} queries of group size {group_size}: expected "
                               f"{n * group_size}")
    return torch.einsum("nh,ngh->ng", q, p.view(n, group_size, -1))


def contrastive_loss(q: Tensor, p: Tensor, group_size: int, temperature: float, mode: TrainingMode,
                     cross_device: bool = False, passage_keys: Tensor | None = None,
                     positive_keys: Tensor | None = None) -> Tensor:
    """InfoNCE (see the module docstring). ``passage_keys`` ``[n*g]`` and ``positive_keys`` ``[n, K]`` (ids of each
    query's known positives, 0 = padding) enable the false-negative mask in ``normal`` mode."""
    n = q.shape[0]
    if mode is TrainingMode.CUSTOM:
        scores = group_scores(q, p, group_size) / temperature
        return F.cross_entropy(scores, torch.zeros(n, dtype=torch.long, device=q.device))
    if p.shape[0] != n * group_size:
        raise DenseConfigError(f"got {p.shape[0]} passages for {n} queries of group size {group_size}: expected "
                               f"{n * group_size}")
    if cross_device:
        p_all, offset = gather_with_grad(p)
    else:
        p_all, offset = p, 0
    scores = q @ p_all.T / temperature
    target = offset + torch.arange(n, device=q.device) * group_size
    if passage_keys is not None and positive_keys is not None:
        keys = gather_no_grad(passage_keys) if cross_device else passage_keys
        known = (keys.view(1, 1, -1) == positive_keys.unsqueeze(-1)) & (positive_keys.unsqueeze(-1) != 0)
        mask = known.any(dim=1)
        mask[torch.arange(n, device=q.device), target] = False
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    return F.cross_entropy(scores, target)


def corpus_loss(q: Tensor, documents: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """``[n]``: each query's cross-entropy ``-sum_d target[d] * log softmax(q @ documents.T / T)[d]`` over the whole
    corpus (``documents`` ``[N, H]``, ``targets`` ``[n, N]`` rows summing to 1)."""
    if documents.shape[1] != q.shape[1] or targets.shape != (q.shape[0], documents.shape[0]):
        raise DenseConfigError(f"corpus loss got queries {tuple(q.shape)}, documents {tuple(documents.shape)} and "
                               f"targets {tuple(targets.shape)}: expected [n, H], [N, H] and [n, N]")
    logits = q.float() @ documents.float().T / temperature
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def distill_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student))`` per query, averaged over queries."""
    if student.shape != teacher.shape:
        raise DenseConfigError(f"teacher scores of shape {tuple(teacher.shape)} do not match the student's "
                               f"{tuple(student.shape)}: expected one teacher score per passage of each group")
    target = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(F.log_softmax(student.float(), dim=-1), target, reduction="batchmean")


@dataclass
class DenseObjective:
    """``objective(q, p, group_size, teacher=None, ...) -> (loss, {"ce/contrastive": ..., "kl/teacher": ...})``
    (the term names follow the shared trainer's log, which shows ``ce/*`` terms on the progress bar)."""

    temperature: float
    mode: TrainingMode = TrainingMode.NORMAL
    cross_device: bool = False
    teacher_weight: float = 1.0
    teacher_temperature: float = 1.0

    def __call__(self, q: Tensor, p: Tensor, group_size: int, teacher: Tensor | None = None,
                 passage_keys: Tensor | None = None, positive_keys: Tensor | None = None
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        q, p = q.float(), p.float()
        parts = {"ce/contrastive": contrastive_loss(q, p, group_size, self.temperature, self.mode, self.cross_device,
                                                 passage_keys, positive_keys)}
        loss = parts["ce/contrastive"]
        if teacher is not None and self.teacher_weight > 0:
            student = group_scores(q, p, group_size) / self.temperature
            parts["kl/teacher"] = distill_loss(student, teacher, self.teacher_temperature)
            loss = loss + self.teacher_weight * parts["kl/teacher"]
        return loss, parts
