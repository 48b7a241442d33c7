"""Python API, in the spirit of sentence-transformers' ``CrossEncoder``::

    from matryoshka.plugin.api import MatryoshkaReranker
    reranker = MatryoshkaReranker("path/to/model", policy="candidate", threshold=0.95)
    reranker.predict([("query", "passage one"), ("query", "passage two")])   # np.ndarray of scores
    reranker.rank("query", ["passage one", "passage two"], top_k=1)           # [{"corpus_id": 1, "score": ...}]
    reranker.rerank_run(run, topics, corpus.get)                              # {qid: {docid: score}}
    reranker.rerank_run(run, topics, corpus.get, engine="ray", workers=4)     # the same, on Ray actors
    print(reranker.stats.summary())

Scores of candidates that exit early are compensated onto the final exit's scale, so one query's scores are
comparable whatever exit each candidate took.

Interpolation with the first stage (``first_stage_weight`` w, default: the manifest's ``policy.first_stage_weight``,
0 when absent): :meth:`MatryoshkaReranker.rerank_run` and :meth:`~MatryoshkaReranker.rerank_query` replace each
query's reranked scores by ``(1 - w) * n(model) + w * n(first stage)`` (normalised per query by ``fusion``, default
the manifest's ``policy.fusion``: ``z`` or ``minmax``, see :mod:`matryoshka.plugin.fusion`), the first-stage scores
being the run's scores. :meth:`~MatryoshkaReranker.rank`
fuses only when it is given ``first_stage_scores``; :meth:`~MatryoshkaReranker.predict` never fuses (it has no
first-stage scores and returns the model's scores). w = 0 gives exactly the model's scores. Where the scores are fused,
the ``topk`` policy prunes on the fused ranking (see :mod:`matryoshka.plugin.policies`); the other policies never
depend on w.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from matryoshka.checks import is_int
from matryoshka.errors import MatryoshkaError, MissingInputError
from matryoshka.io.trec import Run, RunEntry, sort_hits
from matryoshka.plugin.cascade import Cascade, CascadeResult
from matryoshka.plugin.engines import DEFAULT_ENGINE, QueryTask, run_engine
from matryoshka.plugin.fusion import FirstStageScoreError, check_first_stage_weight, check_fusion, fuse
from matryoshka.plugin.manifest import MANIFEST_NAME
from matryoshka.plugin.policies import (
    DEFAULT_TOP_K,
    POLICY_DEFAULT_THRESHOLD,
    CandidatePolicy,
    FixedPolicy,
    check_depth,
    make_policy,
)
from matryoshka.plugin.stats import RunStats

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
MAX_CANDIDATES_PER_CALL = 1024

RunLike = Run | Mapping[str, Mapping[str, float] | Sequence[Any]]
Lookup = Callable[[str], str | None] | Mapping[str, str] | Any


class NoDefaultModelError(MissingInputError):
    """No model folder was given and no default model is bundled."""


class InputTextError(MatryoshkaError):
    """A query or passage that cannot be scored (empty query, not a string, not encodable as UTF-8)."""


class MissingDocumentError(MatryoshkaError):
    def __init__(self, qid: str, docid: str, source: str) -> None:
        self.qid, self.docid = qid, docid
        super().__init__(f"document {docid!r} (query {qid!r}) is not in {source} (pass the index/corpus the run "
                         "was retrieved from)")


class MissingTopicError(MatryoshkaError):
    def __init__(self, qid: str) -> None:
        self.qid = qid
        super().__init__(f"query {qid!r} of the run is not in the topics (pass the topics the run was made from)")


def resolve_model_dir(model_dir: str | os.PathLike[str] | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    if not (DEFAULT_MODEL_DIR / MANIFEST_NAME).is_file():
        raise NoDefaultModelError(DEFAULT_MODEL_DIR / MANIFEST_NAME, "bundled default model",
                                  "no default model is installed; pass an exported model folder: "
                                  "--matryoshka.model DIR (Pyserini), --model DIR (python -m matryoshka rerank) or "
                                  "MatryoshkaReranker(model_dir=DIR)")
    return DEFAULT_MODEL_DIR


def check_text(text: object, what: str, allow_empty: bool) -> str:
    if not isinstance(text, str):
        raise InputTextError(f"{what} is {type(text).__name__}, expected a string")
    if not allow_empty and not text.strip():
        raise InputTextError(f"{what} is empty (expected a non-empty query text)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputTextError(f"{what} is not valid Unicode ({err.reason} at character {err.start}); fix the "
                             "source text's encoding") from None
    return text


def lookup_function(lookup: Lookup) -> tuple[Callable[[str], str | None], str]:
    """A ``docid -> text or None`` function (and a description) from a mapping, a callable or a DocumentSource."""
    if hasattr(lookup, "text") and hasattr(lookup, "describe"):
        return lookup.text, lookup.describe()
    if isinstance(lookup, Mapping):
        return lookup.get, "the document lookup"
    if callable(lookup):
        return lookup, "the document lookup"
    raise TypeError(f"doc_text_lookup must be a mapping, a callable or a DocumentSource, got {type(lookup).__name__}")


def ranked_hits(hits: Mapping[str, float] | Sequence[Any]) -> tuple[list[str], list[float] | None]:
    """The candidates of one query in ranked order, with their first-stage scores: (-score, docid) for scored hits
    (``{docid: score}``, :class:`RunEntry` items, ``(docid, score)`` pairs), given order and None for bare ids."""
    if isinstance(hits, Mapping):
        ranked = sort_hits(hits)
    else:
        items = list(hits)
        if items and isinstance(items[0], RunEntry):
            ranked = sort_hits((e.docid, e.score) for e in items)
        elif items and isinstance(items[0], tuple | list):
            ranked = sort_hits((str(d), float(s)) for d, s in items)
        else:
            return [str(d) for d in items], None
    return [d for d, _ in ranked], [s for _, s in ranked]


class MatryoshkaReranker:
    def __init__(self, model_dir: str | os.PathLike[str] | None = None, policy: str | None = None,
                 threshold: float | None = None, providers: str | Sequence[str] | None = None,
                 threads: int | None = None, batch_size: int = 32, precision: str | None = None,
                 top_k: int = DEFAULT_TOP_K, exit_layer: int | None = None, verify: bool = True,
                 first_stage_weight: float | None = None, depth: int | None = None, fusion: str | None = None
                 ) -> None:
        """``policy``/``threshold``: None = the manifest's tuned policy and threshold; a policy named without a
        threshold takes the tuned threshold if it is the tuned policy, else ``POLICY_DEFAULT_THRESHOLD``.

        ``first_stage_weight``: weight in [0, 1] of the z-normalised first-stage score in the final scores of
        :meth:`rerank_run` / :meth:`rerank_query` (and :meth:`rank` with ``first_stage_scores``); None = the
        manifest's ``policy.first_stage_weight`` (0 = no fusion when the manifest has none).

        ``fusion``: the per-query normalisation of that fusion (``z`` or ``minmax``); None = the manifest's
        ``policy.fusion``.

        ``depth``: :meth:`rerank_run` / :meth:`rerank_query` rerank only each query's top ``depth`` candidates (the
        rest keep their first-stage order below them); None = the manifest's ``policy.depth`` (all when absent),
        0 = all candidates whatever the manifest says."""
        override = None if first_stage_weight is None else check_first_stage_weight(first_stage_weight)
        fusion = None if fusion is None else check_fusion(fusion)
        depth = check_depth(depth)
        self.model_dir = resolve_model_dir(model_dir)
        #: the arguments that rebuild this reranker elsewhere (a Ray worker: the same model path, verified there)
        self.options: dict[str, Any] = {
            "model_dir": os.path.abspath(self.model_dir), "policy": policy, "threshold": threshold,
            "providers": providers, "threads": threads, "batch_size": batch_size, "precision": precision,
            "top_k": top_k, "exit_layer": exit_layer, "verify": verify, "first_stage_weight": first_stage_weight,
            "depth": depth, "fusion": fusion}
        self.cascade = Cascade(self.model_dir, precision=precision, providers=providers, threads=threads,
                               batch_size=batch_size, verify=verify)
        manifest = self.cascade.manifest
        tuned = manifest.policy
        name = tuned.name if policy is None else policy
        default_threshold = tuned.threshold if name == tuned.name else POLICY_DEFAULT_THRESHOLD
        self.policy = make_policy(name, threshold, manifest.exits, default_threshold, top_k, exit_layer)
        self.first_stage_weight = tuned.first_stage_weight if override is None else override
        self.fusion = tuned.fusion if fusion is None else fusion
        #: candidates reranked per query by rerank_run / rerank_query (None = all)
        self.depth = tuned.depth if depth is None else (depth or None)
        self.stats = self._new_stats()
        self.last_result: CascadeResult | None = None
        logger.info("policy %s, first-stage weight %g (%s)%s, depth %s", self.policy.describe(),
                    self.first_stage_weight, self.fusion, " (from the manifest)" if first_stage_weight is None else "",
                    self.depth or "all")

    @property
    def exits(self) -> tuple[int, ...]:
        return self.cascade.exits

    def _new_stats(self) -> RunStats:
        return RunStats(self.exits, self.cascade.cumulative_cost, self.policy.describe(),
                        first_stage_weight=self.first_stage_weight, fusion=self.fusion)

    def reset_stats(self) -> None:
        self.stats = self._new_stats()

    def _chunks(self, groups: np.ndarray) -> list[np.ndarray]:
        """Row chunks of about ``MAX_CANDIDATES_PER_CALL`` (so a call holds a bounded number of hidden states):
        whole groups for the ``query`` and ``topk`` policies (they compare a query's candidates), any rows else."""
        if len(groups) <= MAX_CANDIDATES_PER_CALL:
            return [np.arange(len(groups))]
        if isinstance(self.policy, CandidatePolicy | FixedPolicy):
            return [np.arange(i, min(i + MAX_CANDIDATES_PER_CALL, len(groups)))
                    for i in range(0, len(groups), MAX_CANDIDATES_PER_CALL)]
        order = np.argsort(groups, kind="stable")
        chunks, start = [], 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start < MAX_CANDIDATES_PER_CALL or
                                        groups[order[end]] == groups[order[end - 1]]):
                end += 1
            chunks.append(order[start:end])
            start = end
        return chunks

    def _score(self, queries: list[str], passages: list[str], groups: np.ndarray, n_queries: int,
               first_stage: Sequence[float] | None = None) -> CascadeResult:
        """The cascade over the pairs, in bounded chunks (:meth:`_chunks`); with ``first_stage`` scores, ``topk``
        prunes on the ranking fused with them."""
        start = time.perf_counter()
        weight = 0.0 if first_stage is None else self.first_stage_weight
        n = len(queries)
        scores, stages = np.empty(n, dtype=np.float64), np.empty(n, dtype=np.int64)
        truncated = 0
        for rows in self._chunks(groups):
            part = self.cascade.run([queries[i] for i in rows], [passages[i] for i in rows], self.policy,
                                    groups[rows], None if first_stage is None else [first_stage[i] for i in rows],
                                    weight, self.fusion)
            scores[rows], stages[rows] = part.scores, part.exit_stage
            truncated += part.truncated
        result = CascadeResult(scores, stages, np.asarray(self.exits)[stages], truncated)
        self.stats.add(result.exit_stage, time.perf_counter() - start, n_queries, result.truncated)
        self.last_result = result
        return result

    def predict(self, pairs: Iterable[Sequence[str]]) -> np.ndarray:
        """Scores (float64) of ``(query, passage)`` pairs, in order. Pairs with the same query text form one group
        for the ``query`` and ``topk`` policies. These are the model's own scores: there are no first-stage scores
        here, so ``first_stage_weight`` is not applied (use :meth:`rank` with ``first_stage_scores``, or
        :func:`matryoshka.plugin.fusion.fuse`)."""
        queries, passages = [], []
        for i, pair in enumerate(pairs):
            if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
                raise InputTextError(f"pair {i} is {pair!r}, expected (query, passage)")
            queries.append(check_text(pair[0], f"pair {i}: query", allow_empty=False))
            passages.append(check_text(pair[1], f"pair {i}: passage", allow_empty=True))
        if not queries:
            return np.empty(0, dtype=np.float64)
        codes = {q: k for k, q in enumerate(dict.fromkeys(queries))}
        groups = np.array([codes[q] for q in queries], dtype=np.int64)
        return self._score(queries, passages, groups, len(codes)).scores

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None,
             return_documents: bool = False, first_stage_scores: Sequence[float] | None = None
             ) -> list[dict[str, Any]]:
        """Documents sorted by descending score (ties: lower index first): ``[{"corpus_id", "score"[, "text"]}]``.

        With ``first_stage_scores`` (one per document) the scores are fused with them by ``first_stage_weight``;
        without, they are the model's scores. ``documents`` is a sequence of strings (a bare string is refused, not
        ranked character by character); ``top_k`` is None (all) or an integer >= 1."""
        check_text(query, "query", allow_empty=False)
        if isinstance(documents, str | bytes) or not isinstance(documents, Iterable):
            raise InputTextError(f"documents must be a list of strings, got {type(documents).__name__} "
                                 "(wrap a single document in a list)")
        if top_k is not None and not is_int(top_k, 1):
            raise InputTextError(f"top_k must be None (all documents) or an integer >= 1, got {top_k!r}")
        docs = [check_text(d, f"document {i}", allow_empty=True) for i, d in enumerate(documents)]
        if first_stage_scores is not None and len(first_stage_scores) != len(docs):
            raise InputTextError(f"got {len(first_stage_scores)} first_stage_scores for {len(docs)} documents "
                                 "(expected one per document)")
        if not docs:
            return []
        first = None if first_stage_scores is None else list(first_stage_scores)
        result = self._score([query] * len(docs), docs, np.zeros(len(docs), dtype=np.int64), 1, first)
        scores = result.scores
        if first_stage_scores is not None:
            scores = fuse(scores, first_stage_scores, self.first_stage_weight,
                          docids=[str(i) for i in range(len(docs))], fusion=self.fusion)
        order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))
        ranked = [{"corpus_id": i, "score": float(scores[i]), **({"text": docs[i]} if return_documents else {})}
                  for i in order]
        return ranked[:top_k] if top_k is not None else ranked

    def rerank_query(self, query: str, docids: Sequence[str], texts: Sequence[str], depth: int | None = None,
                     first_stage_scores: Sequence[float] | None = None) -> dict[str, float]:
        """Rerank one query's ranked candidates; those below ``depth`` (None = the reranker's ``depth``, 0 = all)
        keep their order under the reranked ones (their scores become ``min(reranked) - 1 - i``); ``texts`` may
        stop at the depth. ``first_stage_scores`` (parallel to ``docids``) are fused into the reranked candidates'
        scores by ``first_stage_weight``; they are required when it is > 0."""
        return self._rerank_query(query, docids, texts, self._depth(depth), first_stage_scores, None)

    def _depth(self, depth: int | None) -> int | None:
        value = check_depth(depth)
        return self.depth if value is None else (value or None)

    def _rerank_query(self, query: str, docids: Sequence[str], texts: Sequence[str], depth: int | None,
                      first_stage_scores: Sequence[float] | None, qid: str | None) -> dict[str, float]:
        head = list(docids if depth is None else docids[:depth])
        tail = [] if depth is None else list(docids[depth:])
        w = self.first_stage_weight
        if w > 0 and first_stage_scores is None:
            where = f" of query {qid!r}" if qid is not None else ""
            raise FirstStageScoreError(f"first_stage_weight={w:g} needs the first-stage scores, but the candidates"
                                       f"{where} are bare document ids (pass {{docid: score}}, (docid, score) pairs "
                                       "or a Run, or first_stage_weight=0)")
        if first_stage_scores is not None and len(first_stage_scores) != len(docids):
            raise FirstStageScoreError(f"got {len(first_stage_scores)} first-stage scores for {len(docids)} "
                                       "candidates (expected one per candidate)")
        out: dict[str, float] = {}
        if head:
            first = None if w == 0 else list(first_stage_scores[: len(head)])
            if first is not None:  # bad first-stage scores are named by document before any compute
                fuse(np.zeros(len(head)), first, w, docids=head, qids=None if qid is None else [qid] * len(head))
            result = self._score([query] * len(head), list(texts[: len(head)]), np.zeros(len(head), np.int64), 1,
                                 first)
            scores = result.scores
            if w > 0:
                scores = fuse(scores, list(first_stage_scores[: len(head)]), w, docids=head,
                              qids=None if qid is None else [qid] * len(head), fusion=self.fusion)
            out = {d: float(s) for d, s in zip(head, scores, strict=True)}
        self.stats.below_depth += len(tail)
        self.stats.depth = depth
        floor = min(out.values()) if out else 0.0
        for i, docid in enumerate(tail):
            out[docid] = floor - 1.0 - i
        return out

    def rerank_run(self, run: RunLike, topics: Mapping[str, str], doc_text_lookup: Lookup,
                   depth: int | None = None, progress: bool = False, engine: str = DEFAULT_ENGINE,
                   **engine_options: Any) -> dict[str, dict[str, float]]:
        """Rerank every query of a run (``Run``, ``{qid: {docid: score}}`` or ``{qid: [docid, ...]}`` in ranked
        order) and return ``{qid: {docid: score}}`` in the run's query order. Only the top ``depth`` candidates of
        each query are scored (None = the reranker's ``depth``, 0 = all); the text of those is fetched with
        ``doc_text_lookup``, which must also know every candidate below the depth. The run's
        scores are the first-stage scores fused by ``first_stage_weight`` (bare docid lists have none: they need
        ``first_stage_weight=0``).

        ``engine`` (:mod:`matryoshka.plugin.engines`): ``local`` (this process) or ``ray`` (Ray actors, each
        rebuilding this reranker from :attr:`options`; ``engine_options`` ``address``, ``workers``, ``on_result``:
        see :func:`matryoshka.plugin.ray_engine.rerank_ray`). The texts are fetched and checked here either way, and
        the result and :attr:`stats` are the same whatever the engine."""
        depth = self._depth(depth)
        queries = run.queries if isinstance(run, Run) else run
        lookup, source = lookup_function(doc_text_lookup)
        missing = [qid for qid in queries if qid not in topics]
        if missing:
            raise MissingTopicError(missing[0])
        tasks = self._tasks(queries, topics, lookup, source, depth)
        return run_engine(engine, self, tasks, len(queries), progress, **engine_options)

    def _tasks(self, queries: Mapping[str, Any], topics: Mapping[str, str], lookup: Callable[[str], str | None],
               source: str, depth: int | None) -> Iterator[QueryTask]:
        """The run's queries as :class:`QueryTask` (lazily: a task's texts are read when the engine asks for it)."""
        for qid in queries:
            query = check_text(topics[qid], f"query {qid!r}", allow_empty=False)
            docids, first_stage = ranked_hits(queries[qid])
            texts = []
            for docid in docids[:depth] if depth is not None else docids:
                text = lookup(docid)
                if text is None:
                    raise MissingDocumentError(qid, docid, source)
                texts.append(check_text(text, f"document {docid!r}", allow_empty=True))
            for docid in docids[depth:] if depth is not None else ():  # kept unscored, but never made up
                if lookup(docid) is None:
                    raise MissingDocumentError(qid, docid, source)
            yield QueryTask(qid, query, docids, texts, first_stage, depth)
