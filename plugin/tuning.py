"""Threshold tuning: record every exit's score once, replay the cascade offline for any policy and threshold.

The cascade's decisions depend only on the compensated exit scores of the candidates (never on timing), so one
full-depth pass that records the score of every exit (:func:`record_exit_scores`) is enough to replay the cascade
for every policy and threshold (:func:`replay`). The replay runs the plugin's own policy objects through the same
stage loop as :meth:`Cascade.run`, and a test checks it gives the very scores and exits of real cascade runs.

:func:`choose` then picks, on a dev split, the cheapest (policy, threshold) whose nDCG@10 loss against full depth is
at most ``max_loss`` (relative), or the best nDCG@10 within a cost target (share of full-depth layer-FLOPs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from matryoshka.errors import OptionError
from matryoshka.metrics import ndcg_at_k
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.policies import ExitPolicy, StageView, make_policy

logger = logging.getLogger(__name__)
DEFAULT_THRESHOLDS: dict[str, tuple[float, ...]] = {
    "candidate": (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999),
    "query": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    "topk": (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999),
}


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
           residual_std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The (final scores, exit stage) the cascade gives with ``policy``, from recorded exit scores."""
    n, stages = exit_scores.shape
    final = np.full(n, np.nan)
    exit_stage = np.full(n, -1, dtype=np.int64)
    alive = np.arange(n)
    current = np.full(n, np.nan)
    for k in range(stages):
        current[alive] = exit_scores[alive, k]
        if k == stages - 1:
            leaving = np.ones(len(alive), dtype=bool)
        else:
            leaving = policy.decide(StageView(k, exits[k], float(residual_std[k]), alive, current.copy(), groups))
        final[alive[leaving]] = current[alive[leaving]]
        exit_stage[alive[leaving]] = k
        alive = alive[~leaving]
        if not alive.size:
            break
    return final, exit_stage


@dataclass(frozen=True)
class SweepPoint:
    policy: str
    threshold: float
    ndcg10: float
    relative_ndcg: float
    mean_layers: float
    relative_cost: float

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

    def to_run(self, scores: np.ndarray) -> dict[str, dict[str, float]]:
        run: dict[str, dict[str, float]] = {}
        for qid, docid, score in zip(self.qids, self.docids, scores, strict=True):
            run.setdefault(qid, {})[docid] = float(score)
        return run

    def evaluate(self, policy: ExitPolicy, qrels: Mapping[str, Mapping[str, int]], full_ndcg: float
                 ) -> SweepPoint:
        final, stage = replay(self.exit_scores, self.groups, policy, self.exits, self.residual_std)
        ndcg = ndcg_at_k(self.to_run(final), qrels)
        layers = float(np.asarray(self.exits)[stage].mean())
        cost = float(self.cumulative_cost[stage].mean())
        return SweepPoint(policy.name, policy.threshold, ndcg, ndcg / full_ndcg if full_ndcg else 0.0, layers, cost)


def record_run(cascade: Cascade, run: Mapping[str, Sequence[str]], topics: Mapping[str, str],
               texts: Mapping[str, str], progress: bool = True) -> Recorded:
    """Record exit scores for every (query, candidate) of ``run`` ({qid: [docid, ...]}).

    One cascade call per query, as the reranker runs in Pyserini, so the batches are the same: with dynamically
    quantized (int8) stages a score depends slightly on the other rows of its batch.
    """
    from tqdm import tqdm

    qids, docids, groups, blocks = [], [], [], []
    for g, (qid, candidates) in enumerate(tqdm(list(run.items()), desc="recording exit scores", unit="query",
                                               disable=not progress)):
        blocks.append(record_exit_scores(cascade, [topics[qid]] * len(candidates), [texts[d] for d in candidates]))
        qids += [qid] * len(candidates)
        docids += list(candidates)
        groups += [g] * len(candidates)
    manifest = cascade.manifest
    residual = tuple(manifest.exit_calibration(e).residual_std for e in cascade.exits)
    scores = np.concatenate(blocks) if blocks else np.zeros((0, len(cascade.exits)))
    return Recorded(qids, docids, np.asarray(groups, dtype=np.int64), scores, tuple(cascade.exits), residual,
                    cascade.cumulative_cost)


def sweep(recorded: Recorded, qrels: Mapping[str, Mapping[str, int]],
          thresholds: Mapping[str, Sequence[float]] = DEFAULT_THRESHOLDS) -> tuple[float, list[SweepPoint]]:
    """nDCG@10 and cost of every fixed exit and every (policy, threshold); returns (full-depth nDCG@10, points)."""
    full = ndcg_at_k(recorded.to_run(recorded.exit_scores[:, -1]), qrels)
    points = [recorded.evaluate(make_policy("fixed", None, recorded.exits, 1.0, exit_layer=e), qrels, full)
              for e in recorded.exits]
    for name, values in thresholds.items():
        for threshold in values:
            points.append(recorded.evaluate(make_policy(name, threshold, recorded.exits, 1.0), qrels, full))
    return full, points


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
