"""Early exits for a bi-encoder-initialised reranker, trained on cached segment means (CPU-friendly).

The model (``readout="cosine"``, ``attention="segments"``, built from a mean-pooled bi-encoder) starts with its final
exit equal to the bi-encoder's scaled cosine. This phase keeps the backbone and the final exit exactly as they are
(so nothing the base model knew is forgotten) and trains, for every earlier exit ``l``:

- the projection ``P_l`` and head (``raw_l``) by listwise self-distillation: ``KL(softmax(s_L / T) ||
  softmax(raw_l / T))`` over each query's candidates, plus ``label_weight`` x listwise CE on the positive
  (the positive is always at index 0 of a group);
- the compensation (``s'_l``, inputs detached) by ``gap_weight * mean((s'_l - s_L)^2)``, which puts every exit on
  the final exit's scale.

With ``final_label_weight > 0`` the final exit's projection and head train too, by ``final_label_weight`` x
listwise CE on the positive plus ``final_anchor_weight`` x ``KL(bi-encoder || final exit)`` (the frozen start as
the anchor); the early exits then distil from the moving final exit (detached).

With ``query_exit="final"`` exit ``l`` scores ``P_l`` of the passage's layer-``l`` mean against the query's final
embedding (``P_L q_L``) instead of ``P_l q_l`` (a query is encoded once per call, so this costs next to nothing).

With ``projection_init="regression"`` each ``P_l`` starts as the ridge least-squares affine map from layer ``l``'s
segment mean to the unit final-layer mean, fitted in closed form on every cached training query and passage (no
labels): exit ``l`` then starts as the cosine of the *predicted* bi-encoder embeddings instead of the cosine of the
raw layer-``l`` means, which the anisotropy of intermediate layers makes weak. With ``projection_hidden > 0`` each
``P_l`` also has a residual MLP, and ``prefit_steps`` first fits the whole ``P_l`` to that target by cosine loss
(no labels) before the distillation.

No labels are needed for the main term, so pseudo-queries (titles) from every training corpus count as much as
judged queries. Segment means come from :class:`~matryoshka.training.segment_cache.SegmentCache`; batches are drawn
from a generator seeded by ``(seed, step)``, so a run resumed from its checkpoint reaches the same weights. At the
end the residual std of each exit (``s'_l - s_L``) is measured on ``residual_set`` and recorded, as the
compensation phase does.

CLI::

    python -m matryoshka.training.segment_heads --base_model <bi-encoder> --train_sets runs/train/scifact-train \
        --output_dir runs/heads --final_model_dir runs/heads/model
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from matryoshka.checks import is_int
from matryoshka.errors import OptionError, cli_main
from matryoshka.io import atomic_write
from matryoshka.layout import QUERY_EXITS
from matryoshka.training.data import TrainingSet, load_training_set
from matryoshka.training.modeling import LayerwiseReranker
from matryoshka.training.segment_cache import SegmentCache, exit_scores

logger = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
PROJECTION_INITS = ("identity", "regression")


@dataclass
class SegmentHeadArguments:
    base_model: str = field(metadata={"help": "mean-pooled bi-encoder folder (HF), e.g. all-MiniLM-L6-v2"})
    train_sets: list[str] = field(metadata={"help": "training-set folders (matryoshka.training.mining)"})
    output_dir: str = field(metadata={"help": "run folder: segment cache, checkpoint, log"})
    final_model_dir: str = field(metadata={"help": "where the trained reranker folder is written"})
    residual_set: str = field(default="", metadata={"help": "held-out training set for the residual std ('' = "
                                                            "the first train set)"})
    exits: list[int] = field(default_factory=lambda: [1, 2, 3, 6], metadata={"help": "exit layers, last = all"})
    max_length: int = field(default=288, metadata={"help": "tokens per pair (query_length + passage segment)"})
    query_length: int = field(default=32, metadata={"help": "query segment length, [CLS] and [SEP] included"})
    group_size: int = field(default=32, metadata={"help": "passages per query per step (a positive + candidates)"})
    queries_per_step: int = field(default=64, metadata={"help": "queries per step"})
    max_steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant after warm-up)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the distillation term"})
    label_weight: float = field(default=0.0, metadata={"help": "weight of the listwise CE on the positive"})
    gap_weight: float = field(default=1.0, metadata={"help": "weight of the compensation's squared gap"})
    final_label_weight: float = field(default=0.0, metadata={"help": "weight of the listwise CE on the positive "
                                      "for the FINAL exit's projection and head (0 = the final exit stays frozen, "
                                      "exactly the bi-encoder)"})
    final_anchor_weight: float = field(default=1.0, metadata={"help": "with final_label_weight > 0: weight of "
                                       "KL(bi-encoder || final exit) over each group, which keeps the final exit "
                                       "close to the function it starts as"})
    projection_init: str = field(default="identity", metadata={"help": "start of each early exit's projection: "
                                                                   "'identity' or 'regression' (closed-form map to "
                                                                   "the final-layer mean)"})
    projection_hidden: int = field(default=0, metadata={"help": "width of each early exit's residual projection MLP "
                                                                "(0 = linear projections)"})
    prefit_steps: int = field(default=0, metadata={"help": "steps fitting the early exits' projections to the unit "
                                                           "final-layer mean (cosine loss, every cached text, no "
                                                           "labels) before the distillation; skipped on --resume"})
    query_exit: str = field(default="same", metadata={"help": "query embedding each early exit scores against: "
                                                          "'same' (the query at that exit) or 'final' (the query at "
                                                          "the final exit: encoded once per query, next to free)"})
    ridge: float = field(default=1e-3, metadata={"help": "ridge of the regression init, relative to the mean "
                                                         "feature variance"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every this many steps (0 = only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from output_dir's checkpoint"})
    encode_batch_size: int = field(default=64, metadata={"help": "texts per encoder batch when filling the cache"})
    seed: int = field(default=0, metadata={"help": "seed of batches and heads"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch's default)"})

    def __post_init__(self) -> None:
        positive = ("group_size", "queries_per_step", "max_steps", "encode_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not is_int(value, 1):
                raise OptionError(name, value, "an integer >= 1")
        if self.group_size < 2:
            raise OptionError("group_size", self.group_size, "an integer >= 2 (a positive and a candidate)")
        for name in ("warmup_steps", "save_steps", "threads", "projection_hidden", "prefit_steps"):
            if getattr(self, name) < 0:
                raise OptionError(name, getattr(self, name), "an integer >= 0")
        for name in ("learning_rate", "temperature"):
            if not getattr(self, name) > 0:
                raise OptionError(name, getattr(self, name), "a number > 0")
        for name, choices in (("query_exit", QUERY_EXITS), ("projection_init", PROJECTION_INITS)):
            if getattr(self, name) not in choices:
                raise OptionError(name, getattr(self, name), f"one of {', '.join(choices)}")
        for name in ("label_weight", "gap_weight", "ridge", "final_label_weight", "final_anchor_weight"):
            if not getattr(self, name) >= 0:
                raise OptionError(name, getattr(self, name), "a number >= 0")
        if not self.train_sets:
            raise OptionError("train_sets", self.train_sets, "at least one training-set folder")


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` per group (last dim), averaged; scaled by ``T^2``."""
    target = torch.log_softmax(teacher / temperature, dim=-1)
    log_probs = torch.log_softmax(student / temperature, dim=-1)
    return (target.exp() * (target - log_probs)).sum(-1).mean() * temperature ** 2


def positive_ce(student: Tensor) -> Tensor:
    """Listwise cross-entropy with the positive at index 0 of every group."""
    return -torch.log_softmax(student, dim=-1)[..., 0].mean()


def gap_loss(calibrated: Tensor, final: Tensor) -> Tensor:
    return ((calibrated - final) ** 2).mean()


@dataclass
class EncodedSet:
    """Training queries as rows of cached means: ``queries [Q, E, H]``, ``passages [P, E, H]``; per query the
    passage rows of its positives and of its candidates (BM25 order)."""

    queries: Tensor
    passages: Tensor
    positives: list[list[int]]
    candidates: list[list[int]]


def encode_sets(cache: SegmentCache, sets: Sequence[TrainingSet]) -> EncodedSet:
    query_texts: list[str] = []
    passage_rows: dict[str, int] = {}
    passage_texts: list[str] = []
    positives, candidates = [], []

    def row(text: str) -> int:
        if text not in passage_rows:
            passage_rows[text] = len(passage_texts)
            passage_texts.append(text)
        return passage_rows[text]

    for training_set in sets:
        for query in training_set.queries:
            query_texts.append(query.query)
            positives.append([row(training_set.passage(d, query.field)) for d in query.positives])
            candidates.append([row(training_set.passage(d, query.field)) for d in query.candidates])
    return EncodedSet(torch.from_numpy(cache.means(query_texts, "query", "queries")),
                      torch.from_numpy(cache.means(passage_texts, "passage", "passages")), positives, candidates)


def sample_batch(data: EncodedSet, args: SegmentHeadArguments, step: int) -> tuple[Tensor, Tensor]:
    """``(query rows [B], passage rows [B, G])`` of step ``step``: a random positive first, then candidates drawn
    without replacement from the query's list (padded by repetition when it is short)."""
    rng = np.random.default_rng([args.seed, step])
    chosen = rng.choice(len(data.positives), size=min(args.queries_per_step, len(data.positives)), replace=False)
    rows = np.empty((len(chosen), args.group_size), dtype=np.int64)
    for i, q in enumerate(chosen):
        pool = data.candidates[q]
        picks = rng.choice(len(pool), size=args.group_size - 1, replace=len(pool) < args.group_size - 1)
        rows[i, 0] = data.positives[q][int(rng.integers(len(data.positives[q])))]
        rows[i, 1:] = [pool[p] for p in picks]
    return torch.from_numpy(chosen.astype(np.int64)), torch.from_numpy(rows)


@torch.no_grad()
def regression_projections(model: LayerwiseReranker, data: EncodedSet, ridge: float) -> dict[int, float]:
    """Set ``P_l`` of every early exit to ``argmin ||P_l x_l - normalize(x_L)||^2 + ridge * v * ||W_l||^2`` (affine;
    ``v`` = mean feature variance of ``x_l``) over every cached query and passage mean (passages only with
    ``query_exit="final"``, where ``P_l`` never sees a query); returns R^2 per exit."""
    means = _projected_means(model, data).double()                      # [N, E, H]
    target = nn.functional.normalize(means[:, -1], dim=-1)
    target_centred = target - target.mean(0)
    out = {}
    for index, exit_layer in enumerate(model.config.exits[:-1]):
        x = means[:, index]
        centred = x - x.mean(0)
        gram = centred.T @ centred
        penalty = ridge * torch.trace(gram) / gram.shape[0]
        weight = torch.linalg.solve(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype),
                                    centred.T @ target_centred)          # [H_in, H_out]
        bias = target.mean(0) - x.mean(0) @ weight
        layer = model.projections[str(exit_layer)]
        layer.weight.copy_(weight.T.to(layer.weight.dtype))
        layer.bias.copy_(bias.to(layer.bias.dtype))
        residual = ((centred @ weight - target_centred) ** 2).sum()
        out[exit_layer] = float(1 - residual / (target_centred ** 2).sum())
    return out


def _projected_means(model: LayerwiseReranker, data: EncodedSet) -> Tensor:
    """The cached means an early exit's projection is applied to: queries and passages, or only passages when the
    query side is the final exit's (``query_exit="final"``)."""
    return data.passages if model.config.query_exit == "final" else torch.cat([data.queries, data.passages])


def prefit_projections(model: LayerwiseReranker, data: EncodedSet, args: SegmentHeadArguments,
                       batch_size: int = 512) -> dict[int, float]:
    """Fit every early exit's projection ``P_l`` for ``args.prefit_steps`` AdamW steps to ``min 1 - cos(P_l x_l,
    x_L)`` over random cached means of the texts ``P_l`` projects (seeded by ``args.seed``); returns the mean cosine
    per exit over every one of them afterwards."""
    means = _projected_means(model, data)                                # [N, E, H]
    target = nn.functional.normalize(means[:, -1], dim=-1)
    early = list(model.config.exits[:-1])
    projections = [model.projections[str(e)] for e in early]
    parameters = [p for projection in projections for p in projection.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.prefit_steps):
        rows = torch.randint(0, means.shape[0], (batch_size,), generator=generator)
        loss = sum((1 - nn.functional.cosine_similarity(projection(means[rows, i]), target[rows], dim=-1)).mean()
                   for i, projection in enumerate(projections))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for parameter in parameters:
        parameter.requires_grad_(False)
    with torch.no_grad():
        return {e: float(nn.functional.cosine_similarity(projection(means[:, i]), target, dim=-1).mean())
                for i, (e, projection) in enumerate(zip(early, projections, strict=True))}


def trainable_modules(model: LayerwiseReranker, train_final: bool = False) -> nn.ModuleDict:
    """Projection, head and compensation of every exit but the final one (and, with ``train_final``, the final
    exit's projection and head; its compensation stays the identity)."""
    early = [str(e) for e in model.config.exits[:-1]]
    kinds = ("projections", "heads", "compensation")
    modules = {f"{kind}_{e}": getattr(model, kind)[e] for e in early for kind in kinds}
    if train_final:
        last = str(model.config.exits[-1])
        modules.update({f"{kind}_{last}": getattr(model, kind)[last] for kind in ("projections", "heads")})
    return nn.ModuleDict(modules)


def final_scores(model: LayerwiseReranker, q: Tensor, p: Tensor) -> Tensor:
    """The final exit's raw scores from cached means (``[..., E, H]``), as :func:`exit_scores` computes them."""
    last = model.config.exits[-1]
    return model.head_scores(model.cosine_features(q[..., -1, :], p[..., -1, :], last), last)[0]


def step_loss(model: LayerwiseReranker, data: EncodedSet, batch: tuple[Tensor, Tensor],
              args: SegmentHeadArguments, anchor: LayerwiseReranker | None = None) -> tuple[Tensor, dict[str, float]]:
    """The loss of one batch; ``anchor`` (the untrained model) is needed when the final exit trains."""
    query_rows, passage_rows = batch
    q = data.queries[query_rows][:, None]                  # [B, 1, E, H]
    p = data.passages[passage_rows]                        # [B, G, E, H]
    raw = exit_scores(model, q, p, calibrated=False)       # [E, B, G]
    final = raw[-1].detach()
    terms: dict[str, float] = {}
    total = torch.zeros(())
    if args.final_label_weight:
        if anchor is None:
            raise ValueError("step_loss: final_label_weight > 0 needs the anchor model")
        with torch.no_grad():
            start = final_scores(anchor, q, p)
        ce, kl = positive_ce(raw[-1]), distillation_loss(raw[-1], start, args.temperature)
        total = total + args.final_label_weight * ce + args.final_anchor_weight * kl
        terms["ce_final"], terms["kl_final"] = float(ce.detach()), float(kl.detach())
    for index, exit_layer in enumerate(model.config.exits[:-1]):
        distill = distillation_loss(raw[index], final, args.temperature)
        loss = distill
        if args.label_weight:
            loss = loss + args.label_weight * positive_ce(raw[index])
        features = model.cosine_features(model.exit_query(q, index), p[..., index, :], exit_layer).detach()
        calibrated = model.compensation[str(exit_layer)](features, raw[index].detach())
        gap = gap_loss(calibrated, final)
        total = total + loss + args.gap_weight * gap
        terms[f"kl_{exit_layer}"], terms[f"gap_{exit_layer}"] = float(distill.detach()), float(gap.detach())
    return total, terms


def train(args: SegmentHeadArguments) -> Path:
    """Build, train and save (see the module docstring); returns the model folder."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = [load_training_set(p) for p in args.train_sets]
    torch.manual_seed(args.seed)
    model = LayerwiseReranker.build(args.base_model, exits=args.exits, max_length=args.max_length,
                                    query_length=args.query_length, readout="cosine", attention="segments",
                                    seed=args.seed, projection_hidden=args.projection_hidden,
                                    query_exit=args.query_exit)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    cache = SegmentCache(model, out / "segment-cache", args.encode_batch_size)
    data = encode_sets(cache, sets)
    if args.projection_init == "regression":
        logger.info("regression init of the projections, R^2 per exit: %s",
                    regression_projections(model, data, args.ridge))
    if args.prefit_steps and not args.resume:
        logger.info("projection prefit, mean cosine to the final-layer mean per exit: %s",
                    prefit_projections(model, data, args))
    train_final = args.final_label_weight > 0
    anchor = copy.deepcopy(model) if train_final else None
    modules = trainable_modules(model, train_final)
    for parameter in modules.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps else 1.0)
    start = _resume(out, modules, optimizer, scheduler, args) if args.resume else 0
    if not args.resume:
        (out / LOG_FILE).unlink(missing_ok=True)
    from tqdm.auto import tqdm

    for step in tqdm(range(start, args.max_steps), desc="segment heads", initial=start, total=args.max_steps):
        loss, terms = step_loss(model, data, sample_batch(data, args, step), args, anchor)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 50 == 0 or step + 1 == args.max_steps:
            with (out / LOG_FILE).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step + 1, "loss": float(loss.detach()), **terms}) + "\n")
        if args.save_steps and (step + 1) % args.save_steps == 0 and step + 1 < args.max_steps:
            _save_checkpoint(out, step + 1, modules, optimizer, scheduler, args)
    residual_sets = [load_training_set(args.residual_set)] if args.residual_set else sets[:1]
    residuals = measure_cached_residuals(model, encode_sets(cache, residual_sets), args.group_size)
    logger.info("residual std per exit: %s", residuals)
    with atomic_write(out / "arguments.json") as handle:
        handle.write(json.dumps(asdict(args), indent=2, sort_keys=True) + "\n")
    return model.save(args.final_model_dir, overwrite=True)


@torch.no_grad()
def measure_cached_residuals(model: LayerwiseReranker, data: EncodedSet, group_size: int) -> dict[int, float]:
    """Std of ``s'_l - s_L`` per exit over each query's positive and first ``group_size - 1`` candidates (the
    pair forward's :func:`~matryoshka.training.compensation.measure_residuals`, on cached means); recorded."""
    from matryoshka.training.compensation import record_compensation

    parts: list[Tensor] = []
    for q, (pos, cand) in enumerate(zip(data.positives, data.candidates, strict=True)):
        rows = torch.tensor([*pos[:1], *cand[: group_size - 1]])
        scores = exit_scores(model, data.queries[q][None], data.passages[rows], calibrated=True)   # [E, G]
        parts.append((scores - scores[-1]).double())
    values = torch.cat(parts, dim=1)
    out = {e: float(values[i].std()) for i, e in enumerate(model.config.exits)}
    record_compensation(model, residual_std=out, measured_on=int(values.shape[1]))
    return out


def _state(step: int, modules: nn.ModuleDict, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LambdaLR, args: SegmentHeadArguments) -> dict[str, Any]:
    return {"step": step, "modules": modules.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "arguments": {k: v for k, v in asdict(args).items()
                                                               if k not in ("resume", "max_steps", "save_steps")}}


def _save_checkpoint(out: Path, step: int, modules: nn.ModuleDict, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LambdaLR, args: SegmentHeadArguments) -> None:
    with atomic_write(out / CHECKPOINT_FILE, mode="wb") as handle:
        torch.save(_state(step, modules, optimizer, scheduler, args), handle)


def _resume(out: Path, modules: nn.ModuleDict, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LambdaLR, args: SegmentHeadArguments) -> int:
    path = out / CHECKPOINT_FILE
    if not path.is_file():
        raise OptionError("resume", str(path), "an existing checkpoint (run without --resume first)")
    state = torch.load(path, weights_only=True)
    expected = _state(0, modules, optimizer, scheduler, args)["arguments"]
    if state.get("arguments") != expected:
        changed = sorted(k for k in expected if state.get("arguments", {}).get(k) != expected[k])
        raise OptionError("resume", str(path), f"a checkpoint of the same run (arguments differ: {changed})")
    modules.load_state_dict(state["modules"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from matryoshka.training.arguments import parse_arguments

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = parse_arguments((SegmentHeadArguments,), argv, prog="python -m matryoshka.training.segment_heads")
    folder = train(args)
    print(f"reranker written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
