"""Argument handling of the Pyserini integration (the end-to-end runs are in integration_tests/)."""

from __future__ import annotations

import pytest

from matryoshka.errors import MatryoshkaError
from matryoshka.plugin.pyserini_cli import _parser, find_option, reranker_help, split_argv

LUCENE = "pyserini.search.lucene.__main__"
HYBRID = "pyserini.search.hybrid.__main__"


def test_split_argv_takes_only_our_flags() -> None:
    argv = ["--index", "idx", "--reranker", "matryoshka", "--topics", "t.tsv", "--matryoshka.threshold=0.5",
            "--matryoshka.model", "m", "--bm25", "--output", "run.txt", "--matryoshka.batch-size", "8"]
    ours, theirs = split_argv(argv)
    assert ours == ["--reranker", "matryoshka", "--matryoshka.threshold=0.5", "--matryoshka.model", "m",
                    "--matryoshka.batch-size", "8"]
    assert theirs == ["--index", "idx", "--topics", "t.tsv", "--bm25", "--output", "run.txt"]
    ns = _parser().parse_args(ours)
    assert (ns.reranker, ns.threshold, ns.model, ns.batch_size, ns.policy) == ("matryoshka", 0.5, "m", 8, None)
    assert ns.first_stage_weight is None  # None = the manifest's weight


def test_first_stage_weight_flag() -> None:
    ours, theirs = split_argv(["--bm25", "--reranker", "matryoshka", "--matryoshka.first-stage-weight", "0.3",
                               "--hits", "100"])
    assert ours == ["--reranker", "matryoshka", "--matryoshka.first-stage-weight", "0.3"]
    assert theirs == ["--bm25", "--hits", "100"]
    assert _parser().parse_args(ours).first_stage_weight == 0.3
    ours, _ = split_argv(["--matryoshka.first-stage-weight=0"])
    assert _parser().parse_args(ours).first_stage_weight == 0.0
    with pytest.raises(MatryoshkaError, match="unknown option --matryoshka.first-stage-weights"):
        split_argv(["--matryoshka.first-stage-weights", "0.3"])


def test_unknown_matryoshka_flag() -> None:
    with pytest.raises(MatryoshkaError, match="unknown option --matryoshka.treshold: expected one of"):
        split_argv(["--matryoshka.treshold", "0.5"])


def test_unknown_reranker_name() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--reranker", "monot5"])


def test_find_option_lucene() -> None:
    argv = ["--index", "idx", "--output", "a.txt", "--output=b.txt"]
    assert find_option(argv, "--output", "", LUCENE) == (4, "b.txt")
    assert find_option(argv, "--index", "", LUCENE) == (1, "idx")
    assert find_option(argv, "--topics", "", LUCENE) is None


def test_find_option_hybrid_segments() -> None:
    argv = ["dense", "--index", "faiss-idx", "--encoder", "enc", "sparse", "--index", "lucene-idx", "fusion",
            "--alpha", "0.1", "run", "--topics", "t.tsv", "--output", "run.txt"]
    assert find_option(argv, "--index", "sparse", HYBRID) == (7, "lucene-idx")
    assert find_option(argv, "--index", "dense", HYBRID) == (2, "faiss-idx")
    assert find_option(argv, "--output", "run", HYBRID) == (15, "run.txt")
    assert find_option(argv, "--output", "sparse", HYBRID) is None


def test_help_text_lists_every_flag() -> None:
    text = reranker_help()
    for flag in ("--reranker", "--matryoshka.model", "--matryoshka.threshold", "--matryoshka.policy",
                 "--matryoshka.depth", "--matryoshka.stats", "--matryoshka.providers", "--matryoshka.batch-size",
                 "--matryoshka.threads", "--matryoshka.index", "--matryoshka.corpus",
                 "--matryoshka.first-stage-weight"):
        assert flag in text
