"""Strict readers and atomic writers of matryoshka.io (issue 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from matryoshka.errors import DataFormatError, MissingInputError
from matryoshka.io import (
    atomic_directory,
    atomic_write,
    load_beir,
    read_qrels,
    read_run,
    read_topics,
    write_jsonl_collection,
    write_run,
)

REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---------------------------------------------------------------------------------------------------- run files
def test_run_round_trip_sorts_by_score_then_docid(tmp_path: Path) -> None:
    out = tmp_path / "run.txt"
    write_run(out, {"q2": {"b": 1.0, "a": 1.0, "c": 3.0}, "q1": [("x", 0.5)]}, tag="mytag")
    assert out.read_text().splitlines() == [
        "q2 Q0 c 1 3.000000 mytag", "q2 Q0 a 2 1.000000 mytag", "q2 Q0 b 3 1.000000 mytag",
        "q1 Q0 x 1 0.500000 mytag"]
    run = read_run(out)
    assert run.tag == "mytag" and list(run.queries) == ["q2", "q1"]
    assert [e.docid for e in run.queries["q2"]] == ["c", "a", "b"]


@pytest.mark.parametrize("line, problem", [
    ("q1 Q0 d1 1 0.5", "expected 6 fields"),
    ("q1 Q0 d1 one 0.5 tag", "rank 'one' is not an integer"),
    ("q1 Q0 d1 1 high tag", "score 'high' is not a number"),
    ("q1 Q0 d1 1 nan tag", "not a finite number"),
])
def test_malformed_run_line_names_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path / "bad.run", f"q1 Q0 d0 1 0.9 tag\n{line}\n")
    with pytest.raises(DataFormatError) as err:
        read_run(path)
    assert f"{path}:2:" in str(err.value) and problem in str(err.value)


def test_duplicate_doc_in_run(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.run", "q1 Q0 d1 1 0.9 t\nq1 Q0 d1 2 0.8 t\n")
    with pytest.raises(DataFormatError, match=r"dup.run:2: document 'd1' listed twice"):
        read_run(path)


def test_empty_and_missing_run(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no entries"):
        read_run(write(tmp_path / "empty.run", ""))
    with pytest.raises(MissingInputError, match="nope.run: run file not found"):
        read_run(tmp_path / "nope.run")


def test_write_run_failure_leaves_previous_file(tmp_path: Path) -> None:
    out = write(tmp_path / "run.txt", "previous\n")
    with pytest.raises(ValueError, match="not finite"):
        write_run(out, {"q": {"a": 1.0, "b": float("inf")}}, tag="t")
    assert out.read_text() == "previous\n"
    assert list(tmp_path.iterdir()) == [out]
    with pytest.raises(ValueError, match="tag"):
        write_run(out, {"q": {"a": 1.0}}, tag="two words")


def test_non_utf8_run(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.run", b"q1 Q0 d1 1 0.9 t\nq\xe9 Q0 d2 1 0.9 t\n")
    with pytest.raises(DataFormatError, match=r"latin1.run:2: not valid UTF-8"):
        read_run(path)


# ---------------------------------------------------------------------------------------------------- qrels
def test_qrels_trec_and_beir(tmp_path: Path) -> None:
    trec = read_qrels(write(tmp_path / "q.trec", "1 0 d1 1\n1 0 d2 0\n2 0 d3 2\n"))
    beir = read_qrels(write(tmp_path / "q.tsv", "query-id\tcorpus-id\tscore\n1\td1\t1\n1\td2\t0\n2\td3\t2\n"))
    assert trec == beir == {"1": {"d1": 1, "d2": 0}, "2": {"d3": 2}}


@pytest.mark.parametrize("text, problem", [("1 0 d1 1\n1 0 d2 x\n", "relevance 'x' is not an integer"),
                                           ("1 0 d1 1\n1 d2\n", "got 2 fields")])
def test_malformed_qrels(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path / "bad.qrels", text)
    with pytest.raises(DataFormatError) as err:
        read_qrels(path)
    assert f"{path}:2:" in str(err.value) and problem in str(err.value)


# ---------------------------------------------------------------------------------------------------- topics
def test_topics_tsv_and_jsonl(tmp_path: Path) -> None:
    assert read_topics(write(tmp_path / "t.tsv", "1\twhat is x\n2\ty?\n")) == {"1": "what is x", "2": "y?"}
    jsonl = write(tmp_path / "q.jsonl", json.dumps({"_id": "7", "text": "z"}) + "\n")
    assert read_topics(jsonl) == {"7": "z"}


@pytest.mark.parametrize("text, problem", [
    ("1\tok\n2 no tab here\n", "expected 'qid<TAB>query text'"),
    ("1\tok\n2\t   \n", "query '2' has empty text"),
    ("1\tok\n1\tagain\n", "query id '1' appears twice"),
])
def test_malformed_topics(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path / "bad.tsv", text)
    with pytest.raises(DataFormatError) as err:
        read_topics(path)
    assert f"{path}:2:" in str(err.value) and problem in str(err.value)


def test_malformed_jsonl_topics(tmp_path: Path) -> None:
    path = write(tmp_path / "q.jsonl", '{"_id": "1", "text": "a"}\n{"text": "no id"}\n')
    with pytest.raises(DataFormatError, match=r"q.jsonl:2: expected a JSON object with '_id' and 'text'"):
        read_topics(path)


# ---------------------------------------------------------------------------------------------------- BEIR
def make_beir(root: Path, corpus: str, qrels: str) -> Path:
    (root / "qrels").mkdir(parents=True)
    write(root / "corpus.jsonl", corpus)
    write(root / "queries.jsonl", '{"_id": "q1", "text": "a question"}\n')
    write(root / "qrels" / "test.tsv", qrels)
    return root


def test_bundled_scifact_mini_loads() -> None:
    data = load_beir(REPO / "data" / "scifact-mini", "test")
    assert len(data.corpus) == 852 and len(data.qrels) == 30
    assert all(qid in data.queries for qid in data.qrels)


def test_unknown_split_lists_available(tmp_path: Path) -> None:
    root = make_beir(tmp_path / "b", '{"_id": "d1", "title": "T", "text": "x"}\n', "query-id\tcorpus-id\tscore\n")
    with pytest.raises(MissingInputError, match=r"qrels/dev.tsv: qrels for split 'dev' not found \(available "
                                                r"splits: test\)"):
        load_beir(root, "dev")


def test_missing_corpus_file(tmp_path: Path) -> None:
    root = make_beir(tmp_path / "b", "", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (root / "corpus.jsonl").unlink()
    with pytest.raises(MissingInputError, match=r"corpus.jsonl: corpus file not found"):
        load_beir(root, "test")


def test_bad_corpus_line_and_unknown_judged_doc(tmp_path: Path) -> None:
    qrels = "query-id\tcorpus-id\tscore\nq1\td1\t1\n"
    root = make_beir(tmp_path / "b", '{"_id": "d1", "text": "x"}\n{not json\n', qrels)
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:2: invalid JSON"):
        load_beir(root, "test")
    root2 = make_beir(tmp_path / "c", '{"_id": "d1", "text": "x"}\n', "query-id\tcorpus-id\tscore\nq1\td9\t1\n")
    with pytest.raises(DataFormatError, match=r"judges document 'd9', which is not in corpus.jsonl"):
        load_beir(root2, "test")


def test_jsonl_collection_has_title_and_text(tmp_path: Path) -> None:
    root = make_beir(tmp_path / "b", '{"_id": "d1", "title": "Title", "text": "Body"}\n',
                     "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    out = write_jsonl_collection(load_beir(root, "test").corpus, tmp_path / "coll")
    assert json.loads(out.read_text()) == {"id": "d1", "contents": "Title Body"}


# ---------------------------------------------------------------------------------------------------- atomic
def test_atomic_write_and_directory_clean_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("partial")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    folder = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(folder) as tmp:
            (tmp / "a").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(folder) as tmp:
        (tmp / "a").write_text("x")
    assert (folder / "a").read_text() == "x"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(folder):
            pass


def test_corpus_non_utf8_names_its_line(tmp_path: Path) -> None:
    lines = b"".join(b'{"_id": "d%d", "text": "%s"}\n' % (i, b"x" * 5000) for i in range(20))
    root = make_beir(tmp_path / "b", "", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    write(root / "corpus.jsonl", lines + b'{"_id": "bad", "text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:21: not valid UTF-8"):
        load_beir(root, "test")


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os
    import stat

    out = tmp_path / "run.txt"
    write_run(out, {"q": {"a": 1.0}}, tag="t")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_read_json_object_names_the_file_line_and_fix(tmp_path: Path) -> None:
    from matryoshka.io.jsonfile import read_json_object

    path = tmp_path / "x.json"
    with pytest.raises(MissingInputError, match=r"x.json: thing not found \(make it\)"):
        read_json_object(path, "thing", "make it")
    path.write_text('{\n"a": 1,\n}')
    with pytest.raises(DataFormatError, match=r"x.json:3: invalid JSON .*\(make it\)"):
        read_json_object(path, "thing", "make it")
    path.write_text("[1]")
    with pytest.raises(DataFormatError, match="expected a JSON object"):
        read_json_object(path, "thing")
    path.write_text('{"a": [1]}')
    assert read_json_object(path, "thing") == {"a": [1]}


# ---------------------------------------------------------------------------------------------------- issue 17
@pytest.mark.parametrize("value", ["null", "false", "3", '["a", "b"]', '{"x": 1}'])
def test_jsonl_topics_with_non_string_text_are_refused(tmp_path: Path, value: str) -> None:  # #5
    path = write(tmp_path / "q.jsonl", '{"_id": "1", "text": "fine"}\n{"_id": "2", "text": ' + value + "}\n")
    with pytest.raises(DataFormatError, match=r"q.jsonl:2: 'text' must be a string"):
        read_topics(path)
    bad_id = write(tmp_path / "i.jsonl", '{"_id": null, "text": "x"}\n')
    with pytest.raises(DataFormatError, match=r"i.jsonl:1: '_id' must be a string"):
        read_topics(bad_id)


@pytest.mark.parametrize("field", ["text", "title", "contents"])
@pytest.mark.parametrize("value", ["null", '["a"]', "1"])
def test_corpus_fields_that_are_not_strings_are_refused(tmp_path: Path, field: str, value: str) -> None:  # #5
    from matryoshka.plugin.docs import CorpusDocs

    other = "contents" if field != "contents" else "text"
    path = write(tmp_path / "c.jsonl", '{"_id": "d1", "text": "ok"}\n'
                 f'{{"_id": "d2", "{field}": {value}, "{other}": "x"}}\n')
    with pytest.raises(DataFormatError, match=rf"c.jsonl:2: '{field}' must be a string"):
        CorpusDocs(path)


def test_lines_end_at_newline_only(tmp_path: Path) -> None:  # #6
    text = "1\tform\x0cfeed\tand tab\n2\tnext\u2028line\x85sep\r\n3\tcr lf\r\n"
    assert read_topics(write(tmp_path / "t.tsv", text)) == {
        "1": "form\x0cfeed\tand tab", "2": "next\u2028line\x85sep", "3": "cr lf"}
    run = write(tmp_path / "r.txt", "1 Q0 d1 1 2.0 x\x0cy z\n")
    with pytest.raises(DataFormatError, match=r"r.txt:1: expected 6 fields .* got 8"):  # \x0c is not a line end
        read_run(run)


def test_a_utf8_bom_is_not_part_of_the_first_id(tmp_path: Path) -> None:  # #14
    bom = "\ufeff"
    assert read_topics(write(tmp_path / "t.tsv", bom + "1\tq\n")) == {"1": "q"}
    assert list(read_run(write(tmp_path / "r.txt", bom + "1 Q0 d1 1 2.0 x\n")).queries) == ["1"]
    assert read_topics(write(tmp_path / "q.jsonl", bom + '{"_id": "7", "text": "z"}\n')) == {"7": "z"}
    from matryoshka.plugin.docs import CorpusDocs

    assert CorpusDocs(write(tmp_path / "c.jsonl", bom + '{"_id": "d1", "text": "t"}\n')).text("d1") == "t"


def test_pyserini_topics_copy_and_qid_map(tmp_path: Path) -> None:  # issue 17 #15
    from matryoshka.io.pyserini_topics import READER_TRAPS, pyserini_qids, pyserini_topics, restore_qids

    assert pyserini_qids(["001", "2"]) == {"1": "001", "2": "2"}  # all integers: TsvIntTopicReader
    assert pyserini_qids(["001", "a"]) == {"001": "001", "a": "a"}  # otherwise strings, as written
    with pytest.raises(ValueError, match="'1' and '01' are the same integer 1"):
        pyserini_qids(["1", "01"])
    with pyserini_topics({"001": "x y", "7": "z"}, "src.jsonl") as (path, back):
        assert not any(trap in str(path) for trap in READER_TRAPS) and path.suffix == ".tsv"
        assert read_topics(path) == {"001": "x y", "7": "z"} and back == {"1": "001", "7": "7"}
    assert not path.exists()
    run = write(tmp_path / "run.txt", "1 Q0 d1 1 2.0 t\n7 Q0 d2 1 1.0 t\n")
    restore_qids(run, back)
    assert run.read_text() == "001 Q0 d1 1 2.0 t\n7 Q0 d2 1 1.0 t\n"


def test_cli_main_turns_user_errors_into_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    from matryoshka.errors import OptionError, cli_main

    @cli_main
    def bad(argv: list[str]) -> int:
        raise OptionError("--x", argv[0], "a good value")

    @cli_main
    def exists(argv: list[str]) -> int:
        raise FileExistsError("out: output folder already exists")

    @cli_main
    def bug(argv: list[str]) -> int:
        raise KeyError("not a user error")

    assert bad(["1"]) == 2 and capsys.readouterr().err == "error: --x='1' is invalid: expected a good value\n"
    assert exists([]) == 2 and "error: out: output folder already exists" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug stays a traceback
        bug([])


def test_is_int_is_the_one_integer_check() -> None:
    from matryoshka.checks import is_int

    assert is_int(3) and is_int(3, 1) and is_int(3, 1, 3) and is_int(-2)
    assert not any([is_int(True), is_int(1.0), is_int("3"), is_int(None), is_int(0, 1), is_int(4, 1, 3)])
