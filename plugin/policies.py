"""Early-exit policies of the cascade: after each stage, which of the still-running candidates stop there.

All policies read the *compensated* score ``s'`` of the exit (on the final exit's scale, which is what the
compensation phase trains), so a candidate that stops early stays comparable with one that ran to the end.

``candidate`` (default)
    per candidate: confidence ``c = max(sigmoid(s'), 1 - sigmoid(s'))``; exit when ``c > threshold``.
``query``
    per query (adaptive inference over the candidate list, ``c_l = max(softmax(s_l))``): softmax over the
    query's candidates at the current exit; the whole query exits when its largest probability is ``> threshold``.
``topk``
    per candidate, within its query: stop when it can no longer reach the top ``k``: ``s' + margin < s'_(k)``, the k-th
    best current score of the query (exited candidates count with their final score). ``margin =
    residual_std(exit) * max(0, Phi^-1(threshold))``, where ``residual_std`` is the manifest's standard deviation of
    ``s'_exit - s_final`` and ``Phi^-1`` the standard normal quantile: under a Gaussian residual, a pruned candidate's
    final score would have stayed below the current k-th best with probability >= ``threshold``. At threshold <= 0.5
    the margin is 0; at 1.0 it is infinite. Queries with ``k`` or fewer candidates never exit early. When the final
    scores are fused with the first stage (weight ``w > 0``), ``s'`` and ``s'_(k)`` are the *fused* current scores
    and the margin is converted to fused units (``(1 - w) * margin / spread``, ``spread`` the normalisation's divisor
    of the query's current scores): the policy prunes what cannot reach the top k of the ranking that is returned.
``fixed``
    every candidate exits at one given exit layer (FlagEmbedding's ``cutoff_layers``); the threshold is unused.

Thresholds lie in ``[0, 1]``. At threshold 1.0 no policy but ``fixed`` ever exits before the last stage (guarded
explicitly, not left to floating point), so the cascade at 1.0 equals ``fixed`` at full depth exactly.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from matryoshka.checks import is_int
from matryoshka.errors import OptionError
from matryoshka.plugin.fusion import DEFAULT_FUSION, NORMALIZATIONS, fuse

logger = logging.getLogger(__name__)
DEFAULT_TOP_K = 10
#: threshold of a policy asked for by name, without a threshold, when it is not the model's tuned policy (the tuned
#: threshold belongs to the tuned policy only: the same number means different things to different policies)
POLICY_DEFAULT_THRESHOLD = 0.95


@dataclass(frozen=True)
class StageView:
    """What a policy sees after stage ``stage`` (0-based) ran on the candidates listed in ``alive``.

    ``scores`` and ``groups`` cover *all* candidates of the cascade call: the current compensated score (this stage's
    for alive candidates, the final one for those that exited earlier) and the query group id.
    """

    stage: int
    exit_layer: int
    residual_std: float
    alive: np.ndarray
    scores: np.ndarray
    groups: np.ndarray
    #: the first-stage score of every candidate and how the final scores fuse it (None / 0: no fusion)
    first_stage: np.ndarray | None = None
    first_stage_weight: float = 0.0
    fusion: str = DEFAULT_FUSION

    @property
    def alive_scores(self) -> np.ndarray:
        return self.scores[self.alive]

    def ranking_scores(self, members: np.ndarray) -> tuple[np.ndarray, float]:
        """The scores the final ranking of candidates ``members`` (one query) would use now (fused with the first
        stage when the view has a weight), and what one unit of model score is worth on that scale."""
        scores = self.scores[members]
        w = self.first_stage_weight
        if self.first_stage is None or w == 0.0:
            return scores, 1.0
        spread = NORMALIZATIONS[self.fusion].spread(scores)
        fused = fuse(scores, self.first_stage[members], w, fusion=self.fusion)
        return fused, (1.0 - w) / spread if spread > 0.0 else 0.0


class ExitPolicy(ABC):
    """One exit rule. A registered policy (:data:`POLICIES`) also declares its ``help`` (``{exit_layer_flag}`` is
    filled with the CLI's flag), the thresholds the tuner sweeps (``sweep``; empty: never tuned) and a plot
    ``marker``: adding a policy is one class plus one entry there."""

    name: str = ""
    help: str = ""
    sweep: tuple[float, ...] = ()
    marker: str = "o"

    def __init__(self, threshold: float) -> None:
        self.threshold = check_threshold(threshold)

    @classmethod
    def from_options(cls, threshold: float | None, default_threshold: float, exits: Sequence[int], top_k: int,
                     exit_layer: int | None) -> ExitPolicy:
        """The policy from user options (``threshold`` None = ``default_threshold``)."""
        if exit_layer is not None:
            raise OptionError("exit_layer", exit_layer, f"no exit layer with the {cls.name} policy (it picks each "
                              "candidate's exit itself); add --policy fixed to exit every candidate at one layer")
        return cls(default_threshold if threshold is None else threshold)

    def decide(self, view: StageView) -> np.ndarray:
        """A boolean mask over ``view.alive``: True = exit at this stage. Not called for the last stage."""
        if self.threshold >= 1.0:
            return np.zeros(len(view.alive), dtype=bool)
        mask = np.asarray(self._decide(view), dtype=bool)
        if mask.shape != view.alive.shape:
            raise RuntimeError(f"policy {self.name} returned {mask.shape}, expected {view.alive.shape}")
        return mask

    @abstractmethod
    def _decide(self, view: StageView) -> np.ndarray: ...

    def describe(self) -> str:
        return f"{self.name}(threshold={self.threshold:g})"


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


class CandidatePolicy(ExitPolicy):
    name = "candidate"
    help = "confidence max(sigmoid(s), 1-sigmoid(s)) > threshold"
    #: no 0.5: max(p, 1 - p) > 0.5 holds for every score but exactly 0, so it is the first fixed exit again
    sweep = (0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
    marker = "o"

    def _decide(self, view: StageView) -> np.ndarray:
        p = sigmoid(view.alive_scores)
        return np.maximum(p, 1.0 - p) > self.threshold


def _group_slices(groups: np.ndarray) -> list[np.ndarray]:
    """Positions (into ``groups``) of each distinct group id, in order of first appearance."""
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    return [np.flatnonzero(inverse == g) for g in order]


class QueryPolicy(ExitPolicy):
    name = "query"
    help = "softmax over the query's candidates, max > threshold"
    sweep = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
    marker = "s"

    def _decide(self, view: StageView) -> np.ndarray:
        scores, groups = view.alive_scores.astype(np.float64), view.groups[view.alive]
        mask = np.zeros(len(view.alive), dtype=bool)
        for members in _group_slices(groups):
            s = scores[members]
            p = np.exp(s - s.max())
            mask[members] = p.max() / p.sum() > self.threshold
        return mask


class TopKPolicy(ExitPolicy):
    name = "topk"
    help = "stop candidates that cannot reach the top K"
    sweep = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
    marker = "^"

    def __init__(self, threshold: float, k: int = DEFAULT_TOP_K) -> None:
        super().__init__(threshold)
        if not is_int(k, 1):
            raise OptionError("top_k", k, "an integer >= 1")
        self.k = k

    @classmethod
    def from_options(cls, threshold: float | None, default_threshold: float, exits: Sequence[int], top_k: int,
                     exit_layer: int | None) -> ExitPolicy:
        if exit_layer is not None:
            return super().from_options(threshold, default_threshold, exits, top_k, exit_layer)
        return cls(default_threshold if threshold is None else threshold, top_k)

    def margin(self, residual_std: float) -> float:
        if self.threshold >= 1.0:
            return math.inf
        z = NormalDist().inv_cdf(self.threshold) if self.threshold > 0.5 else 0.0
        return float(residual_std) * z

    def _decide(self, view: StageView) -> np.ndarray:
        margin = self.margin(view.residual_std)
        alive_groups = view.groups[view.alive]
        mask = np.zeros(len(view.alive), dtype=bool)
        for members in _group_slices(view.groups):
            if len(members) <= self.k:
                continue
            values, unit = view.ranking_scores(members)
            kth = np.sort(values)[::-1][self.k - 1]
            rows = np.flatnonzero(alive_groups == view.groups[members[0]])
            position = np.searchsorted(members, view.alive[rows])  # members is ascending (np.flatnonzero)
            if math.isinf(margin):
                continue
            mask[rows] = values[position] + margin * unit < kth
        return mask

    def describe(self) -> str:
        return f"topk(k={self.k}, threshold={self.threshold:g})"


class FixedPolicy(ExitPolicy):
    name = "fixed"
    help = "every candidate exits at {exit_layer_flag}"
    marker = "x"

    def __init__(self, exit_layer: int, exits: Sequence[int]) -> None:
        super().__init__(0.0)
        if exit_layer not in exits:
            raise OptionError("exit_layer", exit_layer, f"one of the model's exits {list(exits)}")
        self.exit_layer = exit_layer

    @classmethod
    def from_options(cls, threshold: float | None, default_threshold: float, exits: Sequence[int], top_k: int,
                     exit_layer: int | None) -> ExitPolicy:
        if threshold is not None:
            logger.warning("the fixed policy ignores the threshold (%s); it exits at one layer", threshold)
        return cls(exits[-1] if exit_layer is None else exit_layer, exits)

    def _decide(self, view: StageView) -> np.ndarray:
        return np.full(len(view.alive), view.exit_layer >= self.exit_layer, dtype=bool)

    def describe(self) -> str:
        return f"fixed(exit_layer={self.exit_layer})"


def check_threshold(threshold: object, option: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= float(threshold) <= 1.0:
        raise OptionError(option, threshold, "a number in [0, 1] (1.0 = never exit early)")
    return float(threshold)


def check_depth(depth: object, option: str = "depth") -> int | None:
    """A rerank depth: None (not given), 0 (all candidates) or a positive number of candidates per query."""
    if depth is None:
        return None
    if not is_int(depth, 0):
        raise OptionError(option, depth, "an integer >= 1 (candidates reranked per query), or 0 for all of them")
    return depth


StageScorer = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def run_stage_loop(n: int, n_stages: int, score_stage: StageScorer, policy: ExitPolicy, exits: Sequence[int],
                   residual_std: Sequence[float], groups: np.ndarray, first_stage: np.ndarray | None = None,
                   first_stage_weight: float = 0.0, fusion: str = DEFAULT_FUSION) -> tuple[np.ndarray, np.ndarray]:
    """The cascade's control loop, the one the runtime (:meth:`Cascade.run`) and the tuner's replay share.

    Stage k scores the candidates still alive (``score_stage(k, alive) -> (rows, scores)``, rows in the order it
    scored them); ``policy`` decides who leaves (everyone at the last stage); a leaver keeps that score. Returns
    ``(final scores, exit stage)`` per candidate, unfused (``first_stage``/weight/fusion only inform the policy).
    """
    final = np.full(n, np.nan)
    exit_stage = np.full(n, -1, dtype=np.int64)
    current = np.full(n, np.nan)
    first = None if first_stage_weight == 0.0 else first_stage
    alive = np.arange(n)
    for k in range(n_stages):
        alive, scores = score_stage(k, alive)
        current[alive] = scores
        if k == n_stages - 1:
            leaving = np.ones(len(alive), dtype=bool)
        else:
            leaving = policy.decide(StageView(k, exits[k], float(residual_std[k]), alive, current.copy(), groups,
                                              first, first_stage_weight, fusion))
        final[alive[leaving]] = current[alive[leaving]]
        exit_stage[alive[leaving]] = k
        alive = alive[~leaving]
        if not alive.size:
            break
    return final, exit_stage


#: the exit policies by name: the one source of the names (manifest schema, CLI choices and help, tuner grid, plots)
POLICIES: dict[str, type[ExitPolicy]] = {cls.name: cls for cls in (CandidatePolicy, QueryPolicy, TopKPolicy,
                                                                   FixedPolicy)}


def policy_help(exit_layer_flag: str) -> str:
    """``name (rule), ...`` for a CLI's --policy help."""
    return ", ".join(f"{name} ({cls.help.format(exit_layer_flag=exit_layer_flag)})" for name, cls in POLICIES.items())


def make_policy(name: str, threshold: float | None, exits: Sequence[int], default_threshold: float,
                top_k: int = DEFAULT_TOP_K, exit_layer: int | None = None) -> ExitPolicy:
    """Build a policy by name; ``threshold`` None takes the model's default (its manifest policy threshold)."""
    if name not in POLICIES:
        raise OptionError("policy", name, f"one of {', '.join(POLICIES)}")
    return POLICIES[name].from_options(threshold, default_threshold, exits, top_k, exit_layer)
