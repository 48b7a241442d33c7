"""Threshold tuning: record every exit's score once, replay the cascade offline for any policy and threshold.

The cascade's decisions depend only on the compensated exit scores of the candidates (never on timing), so one
full-depth pass that records the score of every exit (:func:`record_exit_scores`) is enough to replay the cascade
for every policy and threshold (:func:`replay`). The replay runs the plugin's own policy objects through the same
stage loop as :meth:`Cascade.run`, and a test checks it gives the very scores and exits of real cascade runs.

:func:`choose` then picks, on a dev split, the cheapest (policy, threshold) whose nDCG@10 loss against full depth is
at most ``max_loss`` (relative), or the best nDCG@10 within a cost target (share of full-depth layer-FLOPs).

Interpolation with the first stage (:mod:`matryoshka.plugin.fusion`): the recorded run keeps the first-stage
(retriever) scores; :func:`choose_weight` picks, among candidate weights, the one with the best *full-depth* nDCG@10
after fusion, and :func:`sweep` replays every policy/threshold with the same fusion applied to the replayed final
scores (exactly as the runtime fuses the cascade's scores), measured against that fused full-depth reference.
:func:`tune` does the three steps. A weight list of ``(0,)`` is the plain reranker.

Rerank depth: with ``depth`` d, only each query's top d first-stage candidates are scored (and fused, among
themselves), the others keep their first-stage order below them at no cost, as :meth:`MatryoshkaReranker.rerank_run`
does. The sweep crosses every policy/threshold with every depth of ``depths`` (``None`` = all candidates); costs
and layers stay relative to scoring every candidate at full depth, so a shallower depth is a cheaper point.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.checks import is_int
from matryoshka.errors import DataFormatError, OptionError
from matryoshka.io.atomic import atomic_write
from matryoshka.metrics import ndcg_at_k
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.fusion import DEFAULT_FUSION, FirstStageScoreError, check_first_stage_weight, fuse
from matryoshka.plugin.policies import POLICIES, ExitPolicy, StageView, make_policy, run_stage_loop

logger = logging.getLogger(__name__)

#: the thresholds each tunable policy sweeps (from the policy registry)
DEFAULT_THRESHOLDS: dict[str, tuple[float, ...]] = {name: cls.sweep for name, cls in POLICIES.items() if cls.sweep}
DEFAULT_FIRST_STAGE_WEIGHTS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: rerank depths swept by default (None = every candidate)
DEFAULT_DEPTHS: tuple[int | None, ...] = (None,)


class _Recorder(ExitPolicy):
    """Never exits; remembers the compensated score of every candidate at every non-final stage."""

    name = "record"

    def __init__(self, n: int, stages: int) -> None:
        super().__init__(0.0)
        self.scores = np.full((n, stages), np.nan)

    def _decide(self, view: StageView) -> np.ndarray:
        self.scores[view.alive, view.stage] = view.scores[view.alive]
        return np.zeros(len(view.alive), dtype=bool)


def record_exit_scores(cascade: Cascade, queries: Sequence[str], passages: Sequence[str],
                       groups: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Scores ``[n, n_exits]`` of every pair at every exit, from one full-depth run of ``cascade``."""
    recorder = _Recorder(len(queries), len(cascade.exits))
    result = cascade.run(queries, passages, recorder, groups)
    recorder.scores[:, -1] = result.scores
    return recorder.scores


def replay(exit_scores: np.ndarray, groups: np.ndarray, policy: ExitPolicy, exits: Sequence[int],
           residual_std: Sequence[float], first_stage: np.ndarray | None = None, first_stage_weight: float = 0.0,
           fusion: str = DEFAULT_FUSION) -> tuple[np.ndarray, np.ndarray]:
    """The (unfused final scores, exit stage) the cascade gives with ``policy``, from recorded exit scores (the
    first-stage scores and fusion as :meth:`Cascade.run` takes them)."""
    n, stages = exit_scores.shape
    return run_stage_loop(n, stages, lambda k, alive: (alive, exit_scores[alive, k]), policy, exits, residual_std,
                          groups, first_stage, first_stage_weight, fusion)


@dataclass(frozen=True)
class SweepPoint:
    policy: str
    threshold: float
    ndcg10: float
    relative_ndcg: float
    mean_layers: float
    relative_cost: float
    first_stage_weight: float = 0.0
    #: candidates scored per query (None = all)
    depth: int | None = None

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


@dataclass
class Recorded:
    """Exit scores of a run's candidates, with what is needed to turn them back into runs."""

    qids: list[str]
    docids: list[str]
    groups: np.ndarray
    exit_scores: np.ndarray
    exits: tuple[int, ...]
    residual_std: tuple[float, ...]
    cumulative_cost: np.ndarray
    #: first-stage (retriever) score per candidate, None when the recorded run had bare docids
    first_stage: np.ndarray | None = None
    #: per-query normalisation of the fusion (a :data:`~matryoshka.plugin.fusion.NORMALIZATIONS` name)
    fusion: str = DEFAULT_FUSION

    @classmethod
    def load(cls, path: Path, key: str) -> Recorded | None:
        """The recording cached in ``path`` (an ``.npz`` written by :meth:`save`) if it was made under ``key`` (the
        model files, data and run it came from); None when absent or recorded for another key."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    logger.info("%s was recorded for other model files or data: recording again", path)
                    return None
                first = data["first_stage"]
                recorded = cls([str(q) for q in data["qids"]], [str(d) for d in data["docids"]], data["groups"],
                               data["exit_scores"], tuple(int(e) for e in data["exits"]),
                               tuple(float(r) for r in data["residual_std"]), data["cumulative_cost"],
                               first if first.size else None)
        except (OSError, KeyError, ValueError) as exc:
            raise DataFormatError(path, None, f"not a tuning cache ({exc})",
                                  "delete it or pass another --cache") from None
        logger.info("reusing the exit scores recorded in %s", path)
        return recorded

    def save(self, path: Path, key: str) -> None:
        """Cache this recording in ``path`` (``.npz``, atomically) under ``key``."""
        first = self.first_stage if self.first_stage is not None else np.zeros(0)
        with atomic_write(path, "wb") as handle:
            np.savez(handle, key=np.array(key), qids=np.array(self.qids), docids=np.array(self.docids),
                     groups=self.groups, exit_scores=self.exit_scores, exits=np.array(self.exits),
                     residual_std=np.array(self.residual_std), cumulative_cost=self.cumulative_cost,
                     first_stage=first)

    def fused(self, scores: np.ndarray, first_stage_weight: float = 0.0, rows: np.ndarray | None = None
              ) -> np.ndarray:
        """``scores`` (one per candidate, or one per candidate of ``rows``) fused with the first-stage scores per
        query, as the runtime does."""
        w = check_first_stage_weight(first_stage_weight)
        if w > 0 and self.first_stage is None:
            raise FirstStageScoreError(f"first_stage_weight={w:g} needs first-stage scores, but the recorded run "
                                       "has bare document ids (record a run with scores)")
        if rows is None:
            return fuse(scores, self.first_stage, w, self.groups, qids=self.qids, docids=self.docids,
                        fusion=self.fusion)
        first = None if self.first_stage is None else self.first_stage[rows]
        return fuse(scores, first, w, self.groups[rows], qids=[self.qids[i] for i in rows],
                    docids=[self.docids[i] for i in rows], fusion=self.fusion)

    def to_run(self, scores: np.ndarray) -> dict[str, dict[str, float]]:
        run: dict[str, dict[str, float]] = {}
        for qid, docid, score in zip(self.qids, self.docids, scores, strict=True):
            run.setdefault(qid, {})[docid] = float(score)
        return run

    @cached_property
    def first_stage_rank(self) -> np.ndarray:
        """Each candidate's 0-based rank in its query's first-stage order: by (-score, docid) as the reranker ranks
        a scored run, else in the recorded order (computed once: the recording does not change)."""
        n = len(self.docids)
        if self.first_stage is None:
            order = np.lexsort((np.arange(n), self.groups))
        else:
            order = np.lexsort((np.asarray(self.docids), -self.first_stage, self.groups))
        sorted_groups = self.groups[order]
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        return rank

    def replay(self, policy: ExitPolicy, first_stage_weight: float = 0.0, depth: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The final scores the cascade gives with ``policy``, fused with the first stage by
        ``first_stage_weight`` as the runtime does, and each candidate's exit stage. With ``depth``, only each
        query's top ``depth`` first-stage candidates are scored; the others get stage -1 and scores below the
        scored ones in first-stage order (``min - 1 - i``), as :meth:`MatryoshkaReranker.rerank_run` gives."""
        first = None if first_stage_weight == 0.0 else self.first_stage
        if depth is None:
            final, stage = replay(self.exit_scores, self.groups, policy, self.exits, self.residual_std, first,
                                  first_stage_weight, self.fusion)
            return self.fused(final, first_stage_weight), stage
        rank = self.first_stage_rank
        head, tail = np.flatnonzero(rank < depth), np.flatnonzero(rank >= depth)
        final = np.full(len(self.docids), np.nan)
        stage = np.full(len(self.docids), -1, dtype=np.int64)
        head_final, stage[head] = replay(self.exit_scores[head], self.groups[head], policy, self.exits,
                                         self.residual_std, None if first is None else first[head],
                                         first_stage_weight, self.fusion)
        final[head] = self.fused(head_final, first_stage_weight, rows=head)
        # every query with a tail has scored candidates (its rank-0 one): its floor is their lowest final score
        _, group_index = np.unique(self.groups, return_inverse=True)
        floor = np.full(group_index.max() + 1 if group_index.size else 0, np.inf)
        np.minimum.at(floor, group_index[head], final[head])
        final[tail] = floor[group_index[tail]] - 1.0 - (rank[tail] - depth)
        return final, stage

    def layers_and_cost(self, stage: np.ndarray) -> tuple[float, float]:
        """Mean exit layer and mean share of full-depth layer-FLOPs of candidates leaving at ``stage`` (-1: never
        scored, below the rerank depth: 0 layers, no cost)."""
        scored = stage >= 0
        layers = np.where(scored, np.asarray(self.exits)[np.maximum(stage, 0)], 0)
        cost = np.where(scored, self.cumulative_cost[np.maximum(stage, 0)], 0.0)
        return float(layers.mean()), float(cost.mean())

    def evaluate(self, policy: ExitPolicy, qrels: Mapping[str, Mapping[str, int]], full_ndcg: float,
                 first_stage_weight: float = 0.0, depth: int | None = None) -> SweepPoint:
        final, stage = self.replay(policy, first_stage_weight, depth)
        ndcg = ndcg_at_k(self.to_run(final), qrels)
        layers, cost = self.layers_and_cost(stage)
        return SweepPoint(policy.name, policy.threshold, ndcg, ndcg / full_ndcg if full_ndcg else 0.0, layers, cost,
                          float(first_stage_weight), depth)

    def full_depth_ndcg(self, qrels: Mapping[str, Mapping[str, int]], first_stage_weight: float = 0.0) -> float:
        """nDCG@10 of the full-depth scores, fused with the first stage by ``first_stage_weight``."""
        return ndcg_at_k(self.to_run(self.fused(self.exit_scores[:, -1], first_stage_weight)), qrels)


def record_run(cascade: Cascade, run: Mapping[str, Sequence[Any] | Mapping[str, float]], topics: Mapping[str, str],
               texts: Mapping[str, str], progress: bool = True) -> Recorded:
    """Record exit scores for every (query, candidate) of ``run``: ``{qid: [docid, ...]}`` (given order, no
    first-stage scores) or, keeping the first-stage scores for fusion, ``{qid: {docid: score}}``, ``{qid:
    [RunEntry, ...]}`` or ``{qid: [(docid, score), ...]}`` (ranked by (-score, docid), as the reranker does).

    One cascade call per query, as the reranker runs in Pyserini (int8 stages score one pair per call, so no score
    depends on its batch).
    """
    from tqdm import tqdm

    from matryoshka.plugin.api import ranked_hits

    qids, docids, groups, blocks = [], [], [], []
    first_stage: list[float] | None = []
    for g, (qid, hits) in enumerate(tqdm(list(run.items()), desc="recording exit scores", unit="query",
                                         disable=not progress)):
        candidates, scores = ranked_hits(hits)
        blocks.append(record_exit_scores(cascade, [topics[qid]] * len(candidates), [texts[d] for d in candidates]))
        qids += [qid] * len(candidates)
        docids += list(candidates)
        groups += [g] * len(candidates)
        if scores is None:
            first_stage = None  # one query without scores: no fusion possible for the run
        elif first_stage is not None:
            first_stage.extend(scores)
    manifest = cascade.manifest
    residual = tuple(manifest.exit_calibration(e).residual_std for e in cascade.exits)
    scores = np.concatenate(blocks) if blocks else np.zeros((0, len(cascade.exits)))
    return Recorded(qids, docids, np.asarray(groups, dtype=np.int64), scores, tuple(cascade.exits), residual,
                    cascade.cumulative_cost, None if first_stage is None else np.asarray(first_stage, np.float64))


def sweep(recorded: Recorded, qrels: Mapping[str, Mapping[str, int]],
          thresholds: Mapping[str, Sequence[float]] = DEFAULT_THRESHOLDS, first_stage_weight: float = 0.0,
          depths: Sequence[int | None] = DEFAULT_DEPTHS) -> tuple[float, list[SweepPoint]]:
    """nDCG@10 and cost of every fixed exit (all candidates) and every (policy, threshold, depth), each replay's
    final scores fused with the first stage by ``first_stage_weight``; returns (fused full-depth nDCG@10, points)."""
    w = check_first_stage_weight(first_stage_weight)
    depths = check_depths(depths)
    full = recorded.full_depth_ndcg(qrels, w)
    points = [recorded.evaluate(make_policy("fixed", None, recorded.exits, 1.0, exit_layer=e), qrels, full, w)
              for e in recorded.exits]
    for depth in depths:
        for name, values in thresholds.items():
            for threshold in values:
                points.append(recorded.evaluate(make_policy(name, threshold, recorded.exits, 1.0), qrels, full, w,
                                                depth))
    return full, points


def check_depths(depths: Sequence[int | None], option: str = "--depths") -> tuple[int | None, ...]:
    """Rerank depths to sweep: each None (all candidates) or an integer >= 1; at least one; duplicates dropped."""
    values = tuple(dict.fromkeys(depths))
    if not values:
        raise OptionError(option, list(depths), "at least one depth (all, or an integer >= 1)")
    for depth in values:
        if depth is not None and not is_int(depth, 1):
            raise OptionError(option, depth, "all, or an integer >= 1 (candidates reranked per query)")
    return values


def check_weights(weights: Sequence[float], option: str = "--first-stage-weights") -> tuple[float, ...]:
    """The distinct weights in the given order, each checked to lie in [0, 1]; at least one."""
    values = list(weights)
    if not values:
        raise OptionError(option, values, "at least one weight in [0, 1], e.g. 0 0.1 0.2 0.3")
    for value in values:
        check_first_stage_weight(value, option)
    return tuple(dict.fromkeys(float(v) for v in values))


def choose_weight(recorded: Recorded, qrels: Mapping[str, Mapping[str, int]],
                  weights: Sequence[float] = DEFAULT_FIRST_STAGE_WEIGHTS) -> tuple[float, dict[float, float]]:
    """The weight with the best fused full-depth nDCG@10 (ties: the smallest weight), and every weight's figure."""
    values = check_weights(weights)
    if recorded.first_stage is None and any(w > 0 for w in values):
        raise OptionError("--first-stage-weights", list(values), "0 only: the recorded run has no first-stage scores")
    by_weight = {w: recorded.full_depth_ndcg(qrels, w) for w in values}
    best = max(sorted(by_weight), key=lambda w: by_weight[w])  # max keeps the first (smallest) of equal figures
    return best, by_weight


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` chose: the first-stage weight, the policy/threshold point, and the figures behind them."""

    first_stage_weight: float
    full_ndcg_by_weight: dict[float, float]
    full_ndcg: float
    points: list[SweepPoint]
    best: SweepPoint
    #: nDCG@10 of the first stage's own ranking of the recorded candidates (None: the run had no scores)
    first_stage_ndcg: float | None = None

    @property
    def adds_to_first_stage(self) -> bool | None:
        """Whether the chosen point beats the first stage alone (None when the run had no scores)."""
        return None if self.first_stage_ndcg is None else self.best.ndcg10 > self.first_stage_ndcg


def tune(recorded: Recorded, qrels: Mapping[str, Mapping[str, int]],
         weights: Sequence[float] = DEFAULT_FIRST_STAGE_WEIGHTS,
         thresholds: Mapping[str, Sequence[float]] = DEFAULT_THRESHOLDS, max_loss: float | None = 0.01,
         cost_target: float | None = None, depths: Sequence[int | None] = DEFAULT_DEPTHS) -> TuneResult:
    """:func:`choose_weight` (best fused full depth), then :func:`sweep` with that weight and :func:`choose` the
    cheapest point within ``max_loss`` of the fused full-depth nDCG@10 (or the best within ``cost_target``)."""
    weight, by_weight = choose_weight(recorded, qrels, weights)
    full, points = sweep(recorded, qrels, thresholds, first_stage_weight=weight, depths=depths)
    best = choose(points, max_loss=max_loss, cost_target=cost_target)
    first = None if recorded.first_stage is None else ndcg_at_k(recorded.to_run(recorded.first_stage), qrels)
    return TuneResult(weight, by_weight, full, points, best, first)


def choose(points: Sequence[SweepPoint], max_loss: float | None = 0.01, cost_target: float | None = None
           ) -> SweepPoint:
    """The cheapest adaptive point within ``max_loss`` of full depth, or the best one within ``cost_target``."""
    if (max_loss is None) == (cost_target is None):
        raise OptionError("budget", (max_loss, cost_target), "exactly one of a maximum nDCG@10 loss or a cost target")
    adaptive = [p for p in points if p.policy != "fixed"]
    if max_loss is not None:
        if not 0.0 <= max_loss < 1.0:
            raise OptionError("--max-loss", max_loss, "a relative loss in [0, 1), e.g. 0.01 for 1%")
        ok = [p for p in adaptive if p.relative_ndcg >= 1.0 - max_loss - 1e-12]
        if not ok:
            raise OptionError("--max-loss", max_loss, "a looser budget: no policy/threshold on the sweep stays "
                              "within it (add thresholds closer to 1.0)")
        return min(ok, key=lambda p: (p.relative_cost, -p.ndcg10))
    if not 0.0 < cost_target <= 1.0:
        raise OptionError("--cost", cost_target, "a share of full-depth layer-FLOPs in (0, 1]")
    ok = [p for p in adaptive if p.relative_cost <= cost_target + 1e-12]
    if not ok:
        raise OptionError("--cost", cost_target, "a larger cost target: every swept point costs more")
    return max(ok, key=lambda p: (p.ndcg10, -p.relative_cost))
