"""``python -m matryoshka rerank``: a real subprocess run, and one-line errors (exit 2, no output) for bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from matryoshka.io.trec import read_run
from matryoshka.plugin.rerank_cli import main
from tests.fixtures.synthetic_model import build_synthetic_model

DATA = Path(__file__).resolve().parent.parent / "data" / "scifact-mini"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rerank")
    with (DATA / "corpus.jsonl").open(encoding="utf-8") as handle:
        docs = [json.loads(line) for _, line in zip(range(30), handle, strict=False)]
    beir = root / "corpus.jsonl"
    beir.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    jsonl = root / "collection.jsonl"
    jsonl.write_text("".join(json.dumps({"id": d["_id"], "contents": f"{d['title']} {d['text']}"}) + "\n"
                             for d in docs), encoding="utf-8")
    topics = root / "topics.tsv"
    topics.write_text("q1\tvitamin d deficiency and bone fractures\nq2\tgene expression in cancer cells\n")
    run = root / "run.txt"
    lines = [f"{q} Q0 {d['_id']} {r + 1} {20 - r}.5 bm25\n" for q, part in (("q1", docs[:12]), ("q2", docs[12:20]))
             for r, d in enumerate(part)]
    run.write_text("".join(lines))
    model = build_synthetic_model(root / "model", [d["text"] for d in docs])
    return {"root": root, "corpus": beir, "collection": jsonl, "topics": topics, "run": run, "model": model}


def args(files: dict[str, Path], out: Path, *extra: str, source: str = "corpus") -> list[str]:
    return ["--run", str(files["run"]), "--topics", str(files["topics"]), "--corpus", str(files[source]),
            "--output", str(out), "--model", str(files["model"]), "--threads", "1", *extra]


def test_rerank_subprocess(files: dict[str, Path], tmp_path: Path) -> None:
    out, stats = tmp_path / "reranked.txt", tmp_path / "stats.json"
    proc = subprocess.run([sys.executable, "-m", "matryoshka", "rerank", *args(files, out, "--stats", str(stats),
                                                                            "--threshold", "0.9")],
                          check=True, capture_output=True, text=True)
    assert "mean layers/candidate" in proc.stderr and "matryoshka rerank" in proc.stderr  # summary + tqdm bar
    before, after = read_run(files["run"]), read_run(out)
    assert after.tag == "matryoshka" and list(after.queries) == ["q1", "q2"]
    for qid in before.queries:
        assert {e.docid for e in after.queries[qid]} == {e.docid for e in before.queries[qid]}
        assert [e.rank for e in after.queries[qid]] == list(range(1, len(before.queries[qid]) + 1))
    assert any([e.docid for e in after.queries[q]] != [e.docid for e in before.queries[q]] for q in before.queries)
    data = json.loads(stats.read_text())
    assert data["candidates"] == 20 and data["queries"] == 2 and sum(data["exit_histogram"].values()) == 20


def test_corpus_formats_and_depth(files: dict[str, Path], tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    assert main(args(files, a)) == 0
    assert main(args(files, b, source="collection")) == 0
    assert a.read_text() == b.read_text()  # BEIR title + text == JsonCollection contents
    assert main(args(files, c, "--depth", "3", "--tag", "deep3")) == 0
    run, original = read_run(c), read_run(files["run"])
    for qid, entries in run.queries.items():
        docs = [e.docid for e in entries]
        first = [e.docid for e in original.queries[qid]]
        assert set(docs[:3]) == set(first[:3]) and docs[3:] == first[3:]
    assert run.tag == "deep3"


def test_first_stage_weight_flag(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    plain, zero, first, mixed = (tmp_path / f"{n}.txt" for n in ("plain", "zero", "first", "mixed"))
    assert main(args(files, plain)) == 0
    assert "first-stage weight 0, depth all]" in capsys.readouterr().err  # the model has no tuned weight
    assert main(args(files, zero, "--first-stage-weight", "0")) == 0
    assert zero.read_bytes() == plain.read_bytes()  # 0 = exactly the reranker without fusion
    assert main(args(files, first, "--first-stage-weight", "1")) == 0
    before, after = read_run(files["run"]), read_run(first)
    for qid, entries in before.queries.items():  # 1 = the run's own (distinct) scores decide
        assert [e.docid for e in after.queries[qid]] == [e.docid for e in entries]
    assert main(args(files, mixed, "--first-stage-weight", "0.5", "--depth", "5")) == 0
    assert "first-stage weight 0.5 (z), depth 5]" in capsys.readouterr().err
    assert mixed.read_bytes() != plain.read_bytes()


def error_of(argv: list[str], capsys: pytest.CaptureFixture[str], out: Path) -> str:
    out.write_text("previous content\n")
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert out.read_text() == "previous content\n"  # never a partial (or any) output on error
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), lines
    return errors[0]


def test_missing_document_names_run_line(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run.txt"
    run.write_text(files["run"].read_text() + "q2 Q0 no-such-doc 9 1.0 bm25\n")
    out = tmp_path / "out.txt"
    err = error_of(["--run", str(run), *args(files, out)[2:]], capsys, out)
    assert f"{run}:21: document 'no-such-doc' of query 'q2' is not in corpus {files['corpus']}" in err


def test_topics_missing_a_query(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    topics = tmp_path / "topics.tsv"
    topics.write_text("q1\tvitamin d\n")
    out = tmp_path / "out.txt"
    err = error_of(args(files, out)[:2] + ["--topics", str(topics)] + args(files, out)[4:], capsys, out)
    assert f"{files['run']}:13: query 'q2' is not in the topics file {topics}" in err


@pytest.mark.parametrize(("content", "pattern"), [
    (b"q1\tvitamin d\nq2\t   \n", "topics.tsv:2: query 'q2' has empty text"),
    (b"q1\tvitamin d\nq2\tgene \xff expression\n", r"topics.tsv:2: not valid UTF-8"),
])
def test_bad_topics(files: dict[str, Path], tmp_path: Path, capsys, content: bytes, pattern: str) -> None:
    topics = tmp_path / "topics.tsv"
    topics.write_bytes(content)
    out = tmp_path / "out.txt"
    err = error_of(args(files, out)[:2] + ["--topics", str(topics)] + args(files, out)[4:], capsys, out)
    assert re.search(pattern, err), err


def test_non_utf8_corpus(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(files["corpus"].read_bytes() + b'{"_id": "x", "title": "", "text": "caf\xe9"}\n')
    out = tmp_path / "out.txt"
    err = error_of(args(files, out)[:4] + ["--corpus", str(corpus)] + args(files, out)[6:], capsys, out)
    assert f"{corpus}:31: not valid UTF-8" in err


@pytest.mark.parametrize(("extra", "pattern"), [
    (["--threshold", "1.5"], r"--threshold=1.5 is invalid: expected a number in \[0, 1\]"),
    (["--threshold", "-0.1"], r"--threshold=-0.1 is invalid"),
    (["--depth", "-1"], r"--depth=-1 is invalid: expected an integer >= 1 \(candidates reranked per query\), or 0"),
    (["--first-stage-weight", "1.5"], r"--first-stage-weight=1.5 is invalid: expected a number in \[0, 1\]"),
    (["--first-stage-weight", "nan"], r"--first-stage-weight=nan is invalid"),
    (["--policy", "fixed", "--exit-layer", "3"], r"--exit-layer=3 is invalid: expected one of the model's exits"),
    (["--policy", "candidate", "--exit-layer", "2"], r"--exit-layer=2 is invalid: expected no exit layer with the "
     r"candidate policy .* add --policy fixed"),
    (["--precision", "int8"], "--precision='int8' is invalid"),
    (["--providers", "cuda"], "CUDAExecutionProvider was asked for but onnxruntime"),
])
def test_bad_options(files: dict[str, Path], tmp_path: Path, capsys, extra: list[str], pattern: str) -> None:
    import onnxruntime

    if "cuda" in extra and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out.txt"
    err = error_of(args(files, out, *extra), capsys, out)
    assert re.search(pattern, err), err


def test_unknown_policy_is_rejected_by_the_parser(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(args(files, tmp_path / "out.txt", "--policy", "greedy"))
    assert info.value.code == 2
    assert "invalid choice: 'greedy'" in capsys.readouterr().err
    assert not (tmp_path / "out.txt").exists()


def test_missing_and_tampered_model(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.txt"
    err = error_of(args(files, out)[:8] + ["--model", str(tmp_path / "nope")], capsys, out)
    assert "nope: model folder not found" in err
    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    (model / "tokenizer.json").write_text((model / "tokenizer.json").read_text().replace("[UNK]", "[UNKNOWN]"))
    err = error_of(args(files, out)[:8] + ["--model", str(model)], capsys, out)
    assert "tokenizer.json: sha256 is" in err and "re-export" in err
    (model / "manifest.json").unlink()
    err = error_of(args(files, out)[:8] + ["--model", str(model)], capsys, out)
    assert "manifest.json: model manifest not found" in err


# ------------------------------------------------------------------------------ outputs (issue 17 #1 #2 #3 #8 #11)
def snapshot(files: dict[str, Path]) -> dict[str, bytes]:
    return {name: files[name].read_bytes() for name in ("run", "topics", "corpus")}


@pytest.mark.parametrize("case", ["symlink", "fifo", "directory", "under-a-file", "stats-is-output",
                                  "output-is-topics", "output-is-run", "stats-directory"])
def test_bad_outputs_are_refused_before_any_work(files: dict[str, Path], tmp_path: Path, capsys,
                                                 case: str) -> None:
    import os

    before = snapshot(files)
    out, stats = tmp_path / "out.txt", None
    target = tmp_path / "target.txt"
    target.write_text("keep me\n")
    if case == "symlink":
        out.symlink_to(target)
    elif case == "fifo":
        os.mkfifo(out)
    elif case == "directory":
        out.mkdir()
    elif case == "under-a-file":
        out = target / "out.txt"
    elif case == "stats-is-output":
        stats = out
    elif case == "output-is-topics":
        out = files["topics"]
    elif case == "output-is-run":
        out = tmp_path / "link-to-run.txt"
        out.symlink_to(files["run"])
    elif case == "stats-directory":
        stats = tmp_path / "stats"
        stats.mkdir()
    argv = args(files, out, *(["--stats", str(stats)] if stats else []))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --") and " is invalid: expected " in err[0], err
    assert snapshot(files) == before and target.read_text() == "keep me\n"
    if case == "symlink":
        assert out.is_symlink()
    if case == "fifo":
        import stat

        assert stat.S_ISFIFO(out.lstat().st_mode)
    if case in ("stats-is-output", "stats-directory"):
        assert not out.exists()  # the run is not written when the stats cannot be
    assert not list(tmp_path.glob(".*.tmp"))


def test_threads_above_the_cpus_are_refused(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.txt"
    err = error_of([*args(files, out), "--threads", "10000"], capsys, out)
    assert "--threads=10000 is invalid: expected an integer from 0" in err and "CPUs available here" in err


def test_an_index_folder_that_is_not_a_lucene_index(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out, fake = tmp_path / "out.txt", tmp_path / "not-an-index"
    fake.mkdir()
    argv = [a if a != str(files["corpus"]) else str(fake) for a in args(files, out)]
    err = error_of([a if a != "--corpus" else "--index" for a in argv], capsys, out)
    assert f"{fake}: Lucene index (no segments_N file) not found" in err


def test_pyserini_thread_flags_are_bounded_too(tmp_path: Path, capsys) -> None:  # issue 17 #3
    from matryoshka.plugin.bm25_cli import main as bm25_main
    from matryoshka.plugin.pipeline_cli import main as pipeline_main

    for cli_main in (bm25_main, pipeline_main):
        assert cli_main(["--data", str(DATA), "--work", str(tmp_path / "work"), "--threads", "10000"]) == 2
        assert "--threads=10000 is invalid: expected an integer from 1 to" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
