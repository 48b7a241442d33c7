"""Interpolation of the reranker's scores with the first-stage (retriever) scores, per query.

For each query (group) of candidates::

    final = (1 - w) * n(model) + w * n(first_stage)

with ``n`` the normalisation named by the manifest's ``policy.fusion`` (:data:`NORMALIZATIONS`, absent = ``z``):

``z``       ``(x - mean(x)) / std(x)`` over the query's candidates (population std)
``minmax``  ``(x - min(x)) / (max(x) - min(x))``: the training-free BM25 + bi-encoder fusion of the literature

A query with a single candidate, or whose scores are all equal, gets ``n = 0`` for that score. ``w = 0`` returns
the model scores unchanged (no normalisation at all), so a weight of 0 is exactly the reranker without fusion. The
weight lives in the manifest's ``policy.first_stage_weight`` (tuned on a dev split by ``python -m matryoshka tune``)
and can be overridden with ``--matryoshka.first-stage-weight`` / ``--first-stage-weight`` /
``MatryoshkaReranker(first_stage_weight=...)``; the normalisation likewise with ``--matryoshka.fusion`` /
``--fusion`` / ``MatryoshkaReranker(fusion=...)``.

The final scores are fused; of the exit policies only ``topk`` reads the first-stage scores (it prunes a candidate
that cannot reach the top k of the *fused* ranking, see :mod:`matryoshka.plugin.policies`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from matryoshka.errors import MatryoshkaError, OptionError

#: what a weight is checked against (used in every error message about it)
WEIGHT_EXPECTED = "a number in [0, 1] (the share of the normalised first-stage score in the final score; 0 = off)"
DEFAULT_FUSION = "z"


class FirstStageScoreError(MatryoshkaError, ValueError):
    """A first-stage score that cannot be fused (not a finite number), or scores missing where fusion needs them."""


def check_first_stage_weight(weight: object, option: str = "first_stage_weight") -> float:
    """``weight`` as a float in [0, 1]; otherwise :class:`OptionError` naming ``option`` and the value."""
    if (isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight))
            or not 0.0 <= float(weight) <= 1.0):
        raise OptionError(option, weight, WEIGHT_EXPECTED)
    return float(weight)


def _unit_scaled(values: np.ndarray) -> np.ndarray:
    """``x / max|x|`` (float64): both normalisations are scale-free, and on [-1, 1] neither ``x - mean`` nor its
    square can overflow, whatever the magnitude of the scores (1e308 included)."""
    x = np.asarray(values, dtype=np.float64)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    return x / peak if peak > 0.0 else x.copy()


def znorm(values: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` (population std); all zeros for a single value or (numerically) constant values."""
    x = _unit_scaled(values)
    if x.size < 2 or np.ptp(x) == 0.0:
        return np.zeros_like(x)
    centred = x - x.mean()
    std = float(np.sqrt(np.mean(centred * centred)))
    if std <= 1e-12:  # rounding noise of equal values (x is on [-1, 1]), not a real spread
        return np.zeros_like(x)
    return centred / std


def minmax(values: np.ndarray) -> np.ndarray:
    """``(x - min) / (max - min)``; all zeros for a single value or (numerically) constant values."""
    x = _unit_scaled(values)
    if x.size < 2:
        return np.zeros_like(x)
    spread = float(np.ptp(x))
    if spread <= 1e-12:
        return np.zeros_like(x)
    return (x - float(x.min())) / spread


def _std(values: np.ndarray) -> float:
    return float(np.std(_unit_scaled(values))) * float(np.max(np.abs(values), initial=0.0))


def _range(values: np.ndarray) -> float:
    return float(np.ptp(_unit_scaled(values))) * float(np.max(np.abs(values), initial=0.0))


@dataclass(frozen=True)
class Normalization:
    """``normalize(x)`` and the divisor it applies (``spread(x)``: what one unit of ``x`` is worth after it)."""

    normalize: Callable[[np.ndarray], np.ndarray]
    spread: Callable[[np.ndarray], float]


#: the one source of the fusion normalisations (manifest ``policy.fusion``, ``--matryoshka.fusion``, tune ``--fusion``)
NORMALIZATIONS: dict[str, Normalization] = {"z": Normalization(znorm, _std), "minmax": Normalization(minmax, _range)}
FUSION_EXPECTED = f"one of {', '.join(NORMALIZATIONS)} (the per-query normalisation of fused scores)"


def check_fusion(name: object, option: str = "fusion") -> str:
    """``name`` if it is a known normalisation; otherwise :class:`OptionError` naming ``option`` and the value."""
    if not isinstance(name, str) or name not in NORMALIZATIONS:
        raise OptionError(option, name, FUSION_EXPECTED)
    return name


def fuse(model_scores: Sequence[float] | np.ndarray, first_stage_scores: Sequence[float] | np.ndarray | None,
         weight: float, groups: Sequence[object] | np.ndarray | None = None,
         qids: Sequence[str] | None = None, docids: Sequence[str] | None = None,
         fusion: str = DEFAULT_FUSION) -> np.ndarray:
    """Per group: ``(1 - weight) * n(model_scores) + weight * n(first_stage_scores)`` (float64, in input order),
    ``n`` = ``NORMALIZATIONS[fusion]``.

    ``groups`` gives each candidate's query (default: all one query). ``weight == 0`` returns a float64 copy of
    ``model_scores`` untouched and ignores ``first_stage_scores`` (which may then be None). ``qids``/``docids``
    (optional, per candidate) only name the culprit when a first-stage score is not finite.
    """
    w = check_first_stage_weight(weight)
    normalize = NORMALIZATIONS[check_fusion(fusion)].normalize
    model = np.array(model_scores, dtype=np.float64)
    if model.ndim != 1:
        raise ValueError(f"model_scores has shape {model.shape}, expected a flat array")
    if w == 0.0:
        return model
    if first_stage_scores is None:
        raise FirstStageScoreError(f"first_stage_weight={w:g} needs first-stage scores (pass the retriever's "
                                   "scores, or first_stage_weight=0)")
    first = np.array(first_stage_scores, dtype=np.float64)
    n = model.size
    if first.shape != (n,):
        raise ValueError(f"first_stage_scores has shape {first.shape}, expected ({n},)")
    group_ids = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    if group_ids.shape != (n,):
        raise ValueError(f"groups has shape {group_ids.shape}, expected ({n},)")
    for name, values in (("first-stage", first), ("model", model)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            i = int(bad[0])
            if docids is not None:
                what = f"document {docids[i]!r}" + (f" (query {qids[i]!r})" if qids is not None else "")
            else:
                what = f"candidate {i} (query group {group_ids[i].item()!r})"
            raise FirstStageScoreError(f"{name} score of {what} is {float(values[i])!r}, expected a finite number "
                                       f"({bad.size} of {n} scores are not finite); fusion with first_stage_weight="
                                       f"{w:g} needs finite scores")
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out
    _, inverse = np.unique(group_ids, return_inverse=True)
    for g in range(int(inverse.max()) + 1):
        rows = np.flatnonzero(inverse == g)
        out[rows] = (1.0 - w) * normalize(model[rows]) + w * normalize(first[rows])
    return out
