"""Per-run statistics of the cascade: where candidates exited, what that cost, how fast it ran."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from matryoshka.io.atomic import atomic_write


@dataclass
class RunStats:
    """Accumulates :class:`~matryoshka.plugin.cascade.CascadeResult` exits and per-query wall times.

    ``relative_layer_cost`` is the mean, over candidates, of the fraction of the full model's cost spent on them
    (the stages' ``relative_cost`` from the manifest, summed up to the exit stage): 1.0 = every candidate ran every
    stage. ``mean_layers_per_candidate`` counts transformer layers (the exit layer reached). Candidates left below a
    rerank depth (``below_depth``) count as candidates that cost nothing (0 layers), so both figures stay relative
    to reranking every candidate of the run at full depth.
    """

    exits: Sequence[int]
    cumulative_cost: Sequence[float]
    policy: str = ""
    exit_counts: np.ndarray = field(init=False)
    query_seconds: list[float] = field(default_factory=list)
    candidates: int = 0
    truncated: int = 0
    #: candidates kept in first-stage order below the rerank depth (never scored)
    below_depth: int = 0
    #: the rerank depth of the last rerank_run / rerank_query (None = every candidate)
    depth: int | None = None
    #: weight of the normalised first-stage score in the final scores (0 = no fusion) and the normalisation
    first_stage_weight: float = 0.0
    fusion: str = "z"

    def __post_init__(self) -> None:
        self.exit_counts = np.zeros(len(self.exits), dtype=np.int64)
        if len(self.cumulative_cost) != len(self.exits):
            raise ValueError(f"{len(self.cumulative_cost)} stage costs for {len(self.exits)} exits")

    def add(self, exit_stage: np.ndarray, seconds: float, queries: int = 1, truncated: int = 0) -> None:
        """Record one cascade call over ``queries`` queries that took ``seconds`` (split evenly between them)."""
        stages = np.asarray(exit_stage, dtype=np.int64)
        self.exit_counts += np.bincount(stages, minlength=len(self.exits))[: len(self.exits)]
        self.candidates += int(stages.size)
        self.truncated += int(truncated)
        if queries > 0:
            self.query_seconds.extend([seconds / queries] * queries)

    def merge(self, other: RunStats) -> None:
        """Add the counts and per-query times of ``other`` (the same model and policy: a Ray worker's statistics of
        some queries), so that the merged statistics are those of one run over all of them."""
        if list(other.exits) != list(self.exits):
            raise ValueError(f"statistics of exits {list(other.exits)} cannot merge into exits {list(self.exits)}")
        self.exit_counts += other.exit_counts
        self.query_seconds.extend(other.query_seconds)
        self.candidates += other.candidates
        self.truncated += other.truncated
        self.below_depth += other.below_depth
        self.depth = other.depth

    @property
    def queries(self) -> int:
        return len(self.query_seconds)

    def to_dict(self) -> dict[str, Any]:
        n = self.candidates + self.below_depth
        total = float(sum(self.query_seconds))
        times_ms = np.asarray(self.query_seconds, dtype=np.float64) * 1000.0
        layers = np.asarray(self.exits, dtype=np.float64)
        return {
            "policy": self.policy,
            "first_stage_weight": self.first_stage_weight,
            "fusion": self.fusion,
            "depth": self.depth,
            "queries": self.queries,
            "candidates": n,
            "reranked_candidates": self.candidates,
            "candidates_below_depth": self.below_depth,
            "exits": list(self.exits),
            "exit_histogram": {str(e): int(c) for e, c in zip(self.exits, self.exit_counts, strict=True)},
            "mean_layers_per_candidate": float(self.exit_counts @ layers / n) if n else 0.0,
            "relative_layer_cost": float(self.exit_counts @ np.asarray(self.cumulative_cost) / n) if n else 0.0,
            "candidates_per_second": self.candidates / total if total > 0 else 0.0,
            "ms_per_query_p50": float(np.percentile(times_ms, 50)) if times_ms.size else 0.0,
            "ms_per_query_p95": float(np.percentile(times_ms, 95)) if times_ms.size else 0.0,
            "seconds_total": total,
            "passages_truncated": self.truncated,
        }

    def summary(self) -> str:
        d = self.to_dict()
        hist = ", ".join(f"L{e}: {c}" for e, c in d["exit_histogram"].items())
        fusion = f" ({d['fusion']})" if d["first_stage_weight"] else ""  # the normalisation matters only when fused
        return (f"matryoshka [{d['policy']}, first-stage weight {d['first_stage_weight']:g}{fusion}, depth "
                f"{d['depth'] or 'all'}]: {d['queries']} "
                f"queries, {d['candidates']} candidates" + (f" ({d['candidates_below_depth']} below the rerank depth, "
                                                             "not scored)" if d["candidates_below_depth"] else "")
                + f"; mean layers/candidate {d['mean_layers_per_candidate']:.2f} "
                f"of {self.exits[-1]}; relative layer cost {d['relative_layer_cost']:.3f}; exits {{{hist}}}; "
                f"{d['candidates_per_second']:.1f} candidates/s; ms/query p50 {d['ms_per_query_p50']:.1f} p95 "
                f"{d['ms_per_query_p95']:.1f}; {d['passages_truncated']} passages truncated")

    def write_json(self, path: str | os.PathLike[str]) -> None:
        with atomic_write(path) as handle:
            json.dump(self.to_dict(), handle, indent=2)
            handle.write("\n")
