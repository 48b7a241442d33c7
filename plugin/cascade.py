"""The cascade runtime: an exported model folder run stage by stage, with confident candidates stopping early.

For one call (usually one query's candidates) the cascade

1. tokenizes the pairs with the manifest's ``tokenizer.json`` (unique queries once) and sorts them by passage
   length, so a batch pads little; batches are assembled by the model's :class:`~matryoshka.layout.PairLayout`
   (queries cut to the layout's query budget, passages to ``max_length - query_length - suffix`` tokens: the
   documented truncation of over-long passages);
2. runs stage 1 on every candidate, computes the exit's compensated score ``s'`` and asks the policy which
   candidates stop; those keep ``s'`` as their final score;
3. feeds only the remaining rows' ``hidden_states`` / ``attention_mask`` / ``position_ids`` to the next stage (the
   batches shrink; survivors with the same sequence length are merged and re-chunked to ``batch_size``), until the
   last stage, where everyone stops.

With a segment-encoded model (``manifest.encoding == "segments"``) step 1 builds one passage segment per candidate
instead of a pair, and before each stage every distinct query that still has an alive candidate is run through that
stage once (:class:`_QueryStates`); each passage batch gets its query's embedding of that exit. Results come back
in the caller's order. Scores of every exit are on the final exit's scale (compensation trained
in the graph, or applied here from the manifest when ``calibration.in_graph`` is false).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from matryoshka.checks import is_int
from matryoshka.errors import MatryoshkaError, OptionError
from matryoshka.layout import PairLayout, prepare_tokenizer
from matryoshka.plugin.fusion import DEFAULT_FUSION
from matryoshka.plugin.manifest import (
    STAGE_CONTRACTS,
    STATE_INPUTS,
    Manifest,
    ManifestError,
    load_manifest,
)
from matryoshka.plugin.policies import ExitPolicy, run_stage_loop
from matryoshka.plugin.session import StageSession, check_threads, open_stage, resolve_providers

logger = logging.getLogger(__name__)


class StageOutputError(MatryoshkaError):
    """A stage returned scores of the wrong shape or non-finite values."""


@dataclass(frozen=True)
class CascadeResult:
    """Per candidate, in the caller's order: final score, 0-based exit stage and exit layer."""

    scores: np.ndarray
    exit_stage: np.ndarray
    exit_layer: np.ndarray
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class _Batch:
    rows: np.ndarray
    feeds: dict[str, np.ndarray]


#: precisions whose stages quantize activations with one scale per call (onnxruntime dynamic quantization)
PER_CALL_SCALED = frozenset({"int8"})


def check_batch_size(batch_size: int) -> int:
    if not is_int(batch_size, 1):
        raise OptionError("batch_size", batch_size, "an integer >= 1")
    return batch_size


class Cascade:
    """The stages of one exported model folder, opened once, run for any number of calls."""

    def __init__(self, folder: str | os.PathLike[str], precision: str | None = None,
                 providers: str | Sequence[str] | None = None, threads: int | None = None, batch_size: int = 32,
                 verify: bool = True) -> None:
        self.folder = Path(folder)
        self.batch_size = check_batch_size(batch_size)
        threads = check_threads(threads)
        unverified = load_manifest(self.folder, verify=False)
        self.precision = precision or unverified.default_precision
        if self.precision not in unverified.precisions:
            raise OptionError("precision", self.precision, f"one of this model's precisions "
                              f"{', '.join(unverified.precisions)}")
        self.manifest: Manifest = load_manifest(self.folder, verify=verify, precisions=[self.precision])
        if self.precision in PER_CALL_SCALED and self.batch_size > 1:
            # dynamic quantization scales the activations of a whole call: a pair's score would depend on the
            # other pairs of its batch (and on their padding), so each pair is its own call
            logger.info("%s stages run one pair per call (batch size %d -> 1): a score must not depend on its "
                        "batch", self.precision, self.batch_size)
            self.batch_size = 1
        self.layout: PairLayout = self.manifest.pair_layout()
        tokenizer_path = self.folder / self.manifest.tokenizer.file
        try:
            self.tokenizer = prepare_tokenizer(Tokenizer.from_file(str(tokenizer_path)))
        except Exception as err:  # the Rust tokenizers library raises a bare Exception
            raise ManifestError(tokenizer_path, f"not a loadable tokenizer.json ({err})") from None
        self.providers = resolve_providers(providers)
        paths = self.manifest.stage_paths(self.folder, self.precision)
        self.segments = self.manifest.encoding == "segments"
        first_inputs, state_inputs, outputs = STAGE_CONTRACTS[self.manifest.encoding]
        self.stages: list[StageSession] = [
            open_stage(path, self.providers, threads, first_inputs if k == 0 else state_inputs, outputs)
            for k, path in enumerate(paths)]
        costs = np.array([stage.relative_cost for stage in self.manifest.stages], dtype=np.float64)
        #: fraction of the full model's cost spent by a candidate that exits at stage k
        self.cumulative_cost = np.cumsum(costs) / costs.sum()
        self.exits = self.manifest.exits
        logger.info("loaded %s: exits %s, precision %s, providers %s", self.folder, list(self.exits), self.precision,
                    ",".join(self.providers))

    # ------------------------------------------------------------------------------------------- tokenization
    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        unique = list(dict.fromkeys(queries))
        encoded = {q: e.ids for q, e in zip(unique, self.tokenizer.encode_batch(unique, add_special_tokens=False),
                                            strict=True)}
        passage_ids = [e.ids for e in self.tokenizer.encode_batch(list(passages), add_special_tokens=False)]
        return [encoded[q] for q in queries], passage_ids

    def _first_feeds(self, rows: np.ndarray, q_ids: list[list[int]], p_ids: list[list[int]]) -> dict[str, np.ndarray]:
        feeds = self.layout.assemble([q_ids[i] for i in rows], [p_ids[i] for i in rows])
        if "position_ids" not in feeds:  # encoders: absolute positions 0..S-1 (what the model uses by default)
            shape = feeds["input_ids"].shape
            feeds["position_ids"] = np.broadcast_to(np.arange(shape[1], dtype=np.int64), shape).copy()
        return feeds

    # ------------------------------------------------------------------------------------------- running
    def _calibrate(self, k: int, scores: np.ndarray) -> np.ndarray:
        if self.manifest.calibration.in_graph:
            return scores
        cal = self.manifest.exit_calibration(self.exits[k])
        return cal.scale * scores + cal.bias

    def _chunks(self, rows: np.ndarray) -> list[np.ndarray]:
        return [rows[i: i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def run(self, queries: Sequence[str], passages: Sequence[str], policy: ExitPolicy,
            groups: Sequence[int] | np.ndarray | None = None, first_stage: Sequence[float] | np.ndarray | None = None,
            first_stage_weight: float = 0.0, fusion: str = DEFAULT_FUSION) -> CascadeResult:
        """Score ``(queries[i], passages[i])`` pairs. ``groups`` (default: all one group) tells the ``query`` and
        ``topk`` policies which candidates belong to the same query; ``first_stage`` scores (with the weight and
        normalisation the caller fuses the final scores with) let ``topk`` prune on the fused ranking. The returned
        scores are never fused."""
        n = len(queries)
        if len(passages) != n:
            raise ValueError(f"got {n} queries but {len(passages)} passages")
        group_ids = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
        if group_ids.shape != (n,):
            raise ValueError(f"groups has shape {group_ids.shape}, expected ({n},)")
        first = None if first_stage is None or first_stage_weight == 0.0 else np.asarray(first_stage, np.float64)
        if first is not None and first.shape != (n,):
            raise ValueError(f"first_stage has shape {first.shape}, expected ({n},)")
        final = np.full(n, np.nan, dtype=np.float64)
        exit_stage = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return CascadeResult(final, exit_stage, exit_stage.copy())
        q_ids, p_ids = self.tokenize(queries, passages)
        budget = self.layout.passage_budget
        truncated = sum(len(p) > budget for p in p_ids)
        lengths = np.array([min(len(p), budget) for p in p_ids])
        order = np.argsort(-lengths, kind="stable")
        produced: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        queries_at = _QueryStates(self, queries, q_ids) if self.segments else None

        def first_feeds(rows: np.ndarray) -> dict[str, np.ndarray]:
            if self.segments:
                return self.layout.assemble_segments([self.layout.passage_segment(p_ids[i]) for i in rows])
            return self._first_feeds(rows, q_ids, p_ids)

        def score_stage(k: int, alive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            nonlocal produced
            pending = ([_Batch(rows, first_feeds(rows)) for rows in self._chunks(order)]
                       if k == 0 else self._survivors(produced, set(alive.tolist())))
            stage, produced, scores = self.stages[k], [], []
            fetch = self._fetch(k, query=False)
            if queries_at is not None:
                queries_at.advance(k, alive)
            for batch in pending:
                if queries_at is not None:
                    batch.feeds["query_embedding"] = queries_at.embeddings(batch.rows)
                out = stage.run(batch.feeds, fetch)
                score = np.asarray(out["score"], dtype=np.float64).reshape(-1)
                if score.shape != (len(batch.rows),):
                    raise StageOutputError(f"{stage.path}: output 'score' has {score.size} values for a batch of "
                                           f"{len(batch.rows)} (expected shape [batch]); re-export the model")
                scores.append(self._calibrate(k, score))
                produced.append((batch.rows, out))
            rows, values = np.concatenate([r for r, _ in produced]), np.concatenate(scores)
            if not np.isfinite(values).all():
                raise StageOutputError(f"{stage.path}: stage {k + 1} gave non-finite scores for "
                                       f"{int((~np.isfinite(values)).sum())} of {rows.size} candidates; the model "
                                       "folder is broken (re-export it)")
            return rows, values

        last = len(self.stages) - 1
        residual = [self.manifest.exit_calibration(e).residual_std for e in self.exits[:last]] + [0.0]
        final, exit_stage = run_stage_loop(n, len(self.stages), score_stage, policy, self.exits, residual, group_ids,
                                           first, first_stage_weight, fusion)
        if np.isnan(final).any():
            raise RuntimeError("cascade ended with unscored candidates")  # an internal invariant, not user input
        exit_layer = np.asarray(self.exits, dtype=np.int64)[exit_stage]
        return CascadeResult(final, exit_stage, exit_layer, int(truncated))

    def _fetch(self, k: int, query: bool) -> list[str]:
        """The outputs stage ``k`` must return: the state for a next stage, plus the query's embedding (segment
        encoding, a query row) or the candidate's score."""
        state = [f"{name}_out" for name in STATE_INPUTS] if k < len(self.stages) - 1 else []
        return state + (["embedding"] if query else ["score"])

    def _survivors(self, produced: list[tuple[np.ndarray, dict[str, np.ndarray]]], alive: set[int]
                   ) -> list[_Batch]:
        """The next stage's batches: the ``alive`` rows of each batch, merged by sequence length, re-chunked."""
        by_length: dict[int, list[tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
        for rows, out in produced:
            keep = np.array([int(r) in alive for r in rows], dtype=bool)
            if not keep.any():
                continue
            state = {name: out[f"{name}_out"][keep] for name in STATE_INPUTS}
            by_length.setdefault(state["hidden_states"].shape[1], []).append((rows[keep], state))
        batches = []
        for parts in by_length.values():
            rows = np.concatenate([r for r, _ in parts])
            state = {name: np.concatenate([s[name] for _, s in parts]) for name in STATE_INPUTS}
            for start in range(0, len(rows), self.batch_size):
                end = start + self.batch_size
                batches.append(_Batch(rows[start:end], {name: value[start:end] for name, value in state.items()}))
        return batches


class _QueryStates:
    """Segment encoding: each distinct query of a call is encoded once per stage, and only while one of its
    candidates is still alive; :meth:`embeddings` gives every candidate row its query's embedding at that stage.
    With the manifest's ``query_exit="final"`` every query runs through all stages before the first one scores a
    passage, and every stage is fed that final embedding."""

    def __init__(self, cascade: Cascade, queries: Sequence[str], q_ids: Sequence[Sequence[int]]) -> None:
        self.cascade = cascade
        index: dict[str, int] = {}
        self.query_of = np.array([index.setdefault(q, len(index)) for q in queries], dtype=np.int64)
        first_row = {i: row for row, i in reversed(list(enumerate(self.query_of.tolist())))}
        self.segments = [cascade.layout.query_segment(q_ids[first_row[i]]) for i in range(len(index))]
        self.current = np.zeros((len(index), cascade.manifest.model.hidden_size), dtype=np.float32)
        self.produced: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self.final = cascade.manifest.query_exit == "final"

    def advance(self, k: int, alive: np.ndarray) -> None:
        """Make the query embeddings stage ``k`` reads current for the queries of the ``alive`` candidates."""
        if self.final and k > 0:
            return                      # every stage ran on every query at k == 0
        wanted = np.unique(self.query_of[alive])
        for stage in range(len(self.cascade.stages)) if self.final else (k,):
            self._run(stage, wanted)

    def _run(self, k: int, wanted: np.ndarray) -> None:
        """Run stage ``k`` on the queries ``wanted`` (a query's own score is not used)."""
        cascade = self.cascade
        if k == 0:
            pending = [_Batch(rows, cascade.layout.assemble_segments([self.segments[i] for i in rows]))
                       for rows in cascade._chunks(wanted)]
        else:
            pending = cascade._survivors(self.produced, set(wanted.tolist()))
        stage, fetch, self.produced = cascade.stages[k], cascade._fetch(k, query=True), []
        for batch in pending:
            batch.feeds["query_embedding"] = np.zeros((len(batch.rows), self.current.shape[1]), np.float32)
            out = stage.run(batch.feeds, fetch)
            self.current[batch.rows] = out["embedding"]
            self.produced.append((batch.rows, out))

    def embeddings(self, rows: np.ndarray) -> np.ndarray:
        return self.current[self.query_of[rows]]
