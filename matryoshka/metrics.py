"""In-process ranking metrics for fast sweeps (threshold tuning). Reported figures come from trec_eval.

Conventions follow ``trec_eval -c``: linear gains (the relevance grade), log2 discount, the ideal ranking built from
all judged relevant documents, and queries of the qrels with no run count as 0. Ties are broken by (-score, docid),
as the run writer does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def ndcg_of_ranking(ranked: Sequence[str], judged: Mapping[str, int], k: int = 10) -> float:
    """nDCG@k of one query's ranked document ids (0.0 when nothing judged is relevant)."""
    gains = sorted((g for g in judged.values() if g > 0), reverse=True)
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(gains[:k]))
    if not idcg:
        return 0.0
    dcg = sum(max(judged.get(docid, 0), 0) / math.log2(rank + 2) for rank, docid in enumerate(ranked[:k]))
    return dcg / idcg


def ndcg_at_k(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], k: int = 10) -> float:
    """Mean nDCG@k over the queries of ``qrels`` that have at least one relevant document."""
    total, count = 0.0, 0
    for qid, judged in qrels.items():
        if not any(g > 0 for g in judged.values()):
            continue
        count += 1
        hits = run.get(qid)
        if not hits:
            continue
        ranked = [docid for docid, _s in sorted(hits.items(), key=lambda item: (-item[1], item[0]))]
        total += ndcg_of_ranking(ranked, judged, k)
    return total / count if count else 0.0
