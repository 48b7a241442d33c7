"""Training data: mining (positives never negatives), groups, teacher files, the collator, bad-input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.errors import DataFormatError
from matryoshka.io import Document, RunEntry
from matryoshka.training.collator import GroupCollator
from matryoshka.training.data import (
    GroupSampler,
    TrainingDataError,
    TrainingQuery,
    check_teacher_coverage,
    load_training_set,
    read_teacher_scores,
    shard,
    write_teacher_scores,
    write_training_set,
)
from matryoshka.training.mining import build_queries, judged_queries, title_queries
from matryoshka.training.teacher import fuse

WORDS = ["cat", "dog", "fish", "ocean", "blue", "red", "protein", "cell", "gene", "virus", "study", "mat"]


def tiny_corpus(n: int = 12) -> dict[str, Document]:
    return {f"d{i}": Document(f"d{i}", f"title {WORDS[i % 12]} {WORDS[(i * 5) % 12]} words",
                              " ".join(WORDS[(i + k) % 12] for k in range(4)))
            for i in range(n)}


def tiny_queries() -> list[TrainingQuery]:
    return [TrainingQuery("q1", "cat dog", {"d0": 2, "d1": 1}, ("d2", "d3", "d4"), {"d0": 3.0, "d2": 2.0}),
            TrainingQuery("q2", "ocean fish", {"d5": 1}, ("d6", "d7", "d8", "d9", "d10"), {"d6": 1.5})]


def write_beir(root: Path, qrels: list[tuple[str, str, int]], corpus: dict[str, Document] | None = None) -> Path:
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w") as handle:
        for doc in (corpus or tiny_corpus()).values():
            handle.write(json.dumps({"_id": doc.docid, "title": doc.title, "text": doc.text}) + "\n")
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in
                                                [("q1", "cat dog"), ("q2", "ocean fish"), ("q3", "gene virus")]))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                              "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return root


def test_build_queries_excludes_positives_and_keeps_grades() -> None:
    wanted = {"q1": ("cat dog", {"d0": 2, "d1": 1})}
    hits = {"q1": [RunEntry(d, 10.0 - i, i + 1) for i, d in enumerate(["d1", "d2", "d0", "d3", "d4", "d5"])]}
    (query,) = build_queries(wanted, hits, depth=3)
    assert query.candidates == ("d2", "d3", "d4")
    assert query.positives == {"d0": 2, "d1": 1}
    assert query.bm25 == {"d1": 10.0, "d2": 9.0, "d0": 8.0, "d3": 7.0, "d4": 6.0}
    with pytest.raises(TrainingDataError):
        build_queries(wanted, {"q1": [RunEntry("d0", 1.0, 1)]}, depth=3)   # nothing but positives


def test_judged_queries_and_titles() -> None:
    queries = {"q1": "a", "q2": "b"}
    assert judged_queries(queries, {"q1": {"d0": 0, "d1": 2}, "q2": {"d3": 0}}, "x") == {"q1": ("a", {"d1": 2})}
    with pytest.raises(TrainingDataError, match="no query with a positive"):
        judged_queries(queries, {"q2": {"d3": 0}}, "qrels/train.tsv")
    corpus = tiny_corpus(14)   # d12/d13 repeat the titles of d0/d1: those titles are not unique any more
    titles = title_queries(corpus, min_words=4)
    assert "title-d0" not in titles and "title-d12" not in titles
    assert titles["title-d2"] == (corpus["d2"].title, {"d2": 1})


def test_training_set_round_trip_and_validation(tmp_path: Path) -> None:
    folder = write_training_set(tmp_path / "set", tiny_queries(), tiny_corpus(), {"name": "tiny"})
    loaded = load_training_set(folder)
    assert [q.qid for q in loaded.queries] == ["q1", "q2"]
    assert set(loaded.corpus) == {f"d{i}" for i in range(11)}          # only the referenced documents
    assert loaded.passage("d0", "text") == tiny_corpus()["d0"].text
    bad = TrainingQuery("q3", "x", {"d0": 1}, ("d0", "d2"))
    with pytest.raises(DataFormatError, match="positives"):
        write_training_set(tmp_path / "bad", [bad], tiny_corpus(), {})
    assert not (tmp_path / "bad").exists()
    missing = TrainingQuery("q3", "x", {"nope": 1}, ("d2",))
    with pytest.raises(DataFormatError, match="not in the corpus"):
        write_training_set(tmp_path / "bad", [missing], tiny_corpus(), {})


def test_group_sampler_is_seeded_and_never_uses_positives_as_negatives(tmp_path: Path) -> None:
    ts = load_training_set(write_training_set(tmp_path / "set", tiny_queries(), tiny_corpus(), {}))
    sampler = GroupSampler([ts], group_size=4, seed=7)
    first, again, other = sampler.epoch(0), sampler.epoch(0), sampler.epoch(1)
    assert first == again and len(first) == 2
    assert [g.docids for g in first] != [g.docids for g in other] or [g.qid for g in first] != [g.qid for g in other]
    for epoch in range(5):
        for group in sampler.epoch(epoch):
            query = {q.qid: q for q in ts.queries}[group.qid]
            assert group.docids[0] in query.positives
            assert group.labels[0] == query.positives[group.docids[0]] and group.labels[1:] == (0, 0, 0)
            assert not set(group.docids[1:]) & set(query.positives)
    capped = GroupSampler([ts, ts], group_size=4, seed=7, queries_per_epoch=[1, 0])
    assert len(capped) == 3 and all(len(capped.epoch(e)) == 3 for e in range(4))
    assert len({tuple(sorted(g.qid for g in capped.epoch(e))) for e in range(8)}) == 2   # the sample changes
    with pytest.raises(TrainingDataError, match="queries_per_epoch"):
        GroupSampler([ts], group_size=4, seed=7, queries_per_epoch=[1, 1])
    assert len(shard(first, rank=1, world_size=2, per_rank_batch=1)) == 1
    with pytest.raises(TrainingDataError, match="cannot fill one step"):
        shard(first, rank=0, world_size=2, per_rank_batch=2)


def test_positives_per_query_gives_one_group_per_distinct_positive(tmp_path: Path) -> None:
    ts = load_training_set(write_training_set(tmp_path / "set", tiny_queries(), tiny_corpus(), {}))
    every = GroupSampler([ts], group_size=4, seed=3, positives_per_query=[0])
    assert len(every) == 3                                   # q1 has two positives, q2 one
    for epoch in range(4):
        groups = every.epoch(epoch)
        assert len(groups) == 3 and groups == every.epoch(epoch)
        assert sorted((g.qid, g.docids[0]) for g in groups) == [("q1", "d0"), ("q1", "d1"), ("q2", "d5")]
        assert {g.docids[0]: g.labels[0] for g in groups} == {"d0": 2, "d1": 1, "d5": 1}
        for group in groups:
            assert not {"d0", "d1", "d5"} & set(group.docids[1:])
    assert len(GroupSampler([ts], 4, 3, positives_per_query=[5])) == 3     # capped at the positives there are
    assert len(GroupSampler([ts], 4, 3, positives_per_query=[1])) == 2
    with pytest.raises(TrainingDataError, match="positives_per_query"):
        GroupSampler([ts], 4, 3, positives_per_query=[1, 2])
    with pytest.raises(TrainingDataError, match="queries_per_epoch=1 and positives_per_query=2"):
        GroupSampler([ts], 4, 3, queries_per_epoch=[1], positives_per_query=[2])


def test_teacher_file_round_trip_coverage_and_errors(tmp_path: Path) -> None:
    ts = load_training_set(write_training_set(tmp_path / "set", tiny_queries(), tiny_corpus(), {}))
    scores = {q.qid: fuse(q.bm25, {d: 0.1 * i for i, d in enumerate([*q.positives, *q.candidates])},
                          [*q.positives, *q.candidates], 0.5) for q in ts.queries}
    assert scores["q1"]["d0"] == pytest.approx(0.5)       # best BM25 (1.0 * 0.5), lowest cosine (0)
    path = write_teacher_scores(tmp_path / "t.tsv", scores)
    check_teacher_coverage(ts, read_teacher_scores(path), path)
    group = GroupSampler([ts], 3, 0, [read_teacher_scores(path)]).epoch(0)[0]
    assert group.teacher == tuple(pytest.approx(scores[group.qid][d], abs=1e-6) for d in group.docids)
    del scores["q2"]["d9"]
    write_teacher_scores(tmp_path / "t2.tsv", scores)
    with pytest.raises(TrainingDataError, match="d9"):
        check_teacher_coverage(ts, read_teacher_scores(tmp_path / "t2.tsv"), tmp_path / "t2.tsv")
    (tmp_path / "t3.tsv").write_text("q1\td0\tnan\n")
    with pytest.raises(DataFormatError, match="t3.tsv:1"):
        read_teacher_scores(tmp_path / "t3.tsv")


def test_collator_shapes(tmp_path: Path) -> None:
    from matryoshka.training.modeling import LayerwiseReranker
    from tests.fixtures.tiny_models import make_tiny_base

    model = LayerwiseReranker.build(make_tiny_base(tmp_path / "bert", "bert"), max_length=40, query_length=8,
                                    compress_layers=(2,), compress_ratios=(4,))
    ts = load_training_set(write_training_set(tmp_path / "set", tiny_queries(), tiny_corpus(), {}))
    teacher = {q.qid: {d: 1.0 for d in (*q.positives, *q.candidates)} for q in ts.queries}
    groups = GroupSampler([ts], 3, 0, [teacher]).epoch(0)
    batch = GroupCollator(model.layout, model.tokenizer)(groups)
    rows, seq = batch["input_ids"].shape
    assert rows == 2 * 3 and batch["attention_mask"].shape == (6, seq) and batch["token_type_ids"].shape == (6, seq)
    assert (seq - 8) % 4 == 0 and seq <= 40                            # passage segment: a multiple of the ratio
    assert batch["labels"].shape == (2, 3) and batch["labels"][:, 1:].eq(0).all() and batch["labels"][:, 0].gt(0).all()
    assert batch["teacher_scores"].shape == (2, 3) and batch["group_size"] == 3
    assert batch["input_ids"][:, 0].eq(model.tokenizer.token_to_id("[CLS]")).all()
    scores = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert scores.calibrated.shape == (len(model.config.exits), 6)


def run_mining(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matryoshka.training.mining", *args], capture_output=True,
                          text=True, check=check)


def test_mining_cli_bad_inputs_leave_nothing(tmp_path: Path) -> None:
    empty = write_beir(tmp_path / "empty", [("q1", "d0", 0), ("q2", "d1", 0)])
    proc = run_mining("--data_dir", str(empty), "--output", str(tmp_path / "out1"), "--work_dir",
                      str(tmp_path / "w"), check=False)
    assert proc.returncode == 2 and "no query with a positive" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out1").exists()
    ghost = write_beir(tmp_path / "ghost", [("q1", "d0", 1), ("q2", "d99", 1)])
    proc = run_mining("--data_dir", str(ghost), "--output", str(tmp_path / "out2"), "--work_dir",
                      str(tmp_path / "w"), check=False)
    assert proc.returncode == 2 and "'d99'" in proc.stderr and "train.tsv" in proc.stderr
    assert not (tmp_path / "out2").exists()
    proc = run_mining("--data_dir", str(ghost), "--output", str(tmp_path / "out3"), "--depth", "0", check=False)
    assert proc.returncode == 2 and "depth=0" in proc.stderr


def test_mining_cli_with_pyserini_bm25(tmp_path: Path) -> None:
    data = write_beir(tmp_path / "beir", [("q1", "d0", 2), ("q1", "d1", 1), ("q1", "d10", 0), ("q2", "d5", 1)])
    run_mining("--data_dir", str(data), "--output", str(tmp_path / "set"), "--work_dir", str(tmp_path / "w"),
               "--depth", "5", "--score_depth", "12")
    ts = load_training_set(tmp_path / "set")
    by_id = {q.qid: q for q in ts.queries}
    assert set(by_id) == {"q1", "q2"} and by_id["q1"].positives == {"d0": 2, "d1": 1}
    assert "d10" in by_id["q1"].candidates                          # judged 0: still a negative
    for query in ts.queries:
        assert 1 <= len(query.candidates) <= 5 and not set(query.candidates) & set(query.positives)
        assert all(d in query.bm25 for d in query.candidates)
