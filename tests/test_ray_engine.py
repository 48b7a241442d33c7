"""``--engine ray`` (issue 20) on a local Ray instance with 2 CPUs: the run file is byte-identical to the local
engine's, also when a worker process is killed mid-run; a model that does not verify on a worker, a cluster that
cannot be reached and a missing ``ray`` give one line, exit 2 and no output."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from matryoshka.io.trec import read_run, read_topics, write_run  # noqa: E402
from matryoshka.plugin import rerank_cli  # noqa: E402
from matryoshka.plugin.api import DEFAULT_MODEL_DIR, MatryoshkaReranker  # noqa: E402
from matryoshka.plugin.docs import CorpusDocs  # noqa: E402
from matryoshka.plugin.engines import ENGINES, MissingExtraError  # noqa: E402
from matryoshka.plugin.ray_engine import WorkerInfo  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data" / "scifact-mini"
N_QUERIES, HITS = 6, 12
#: same policy, depth and fusion for both engines (explicit, not the manifest's defaults)
POLICY = ["--policy", "topk", "--threshold", "0.9", "--depth", "8", "--first-stage-weight", "0.3",
          "--fusion", "minmax", "--threads", "1"]
TIMING = {"candidates_per_second", "ms_per_query_p50", "ms_per_query_p95", "seconds_total"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The first test queries of scifact-mini with a word-overlap first stage (top 12 of the whole corpus)."""
    root = tmp_path_factory.mktemp("ray")
    judged = [line.split("\t")[0] for line in (DATA / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    qids = list(dict.fromkeys(judged))[:N_QUERIES]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (DATA / "queries.jsonl").read_text().splitlines())}
    docs = [json.loads(line) for line in (DATA / "corpus.jsonl").read_text().splitlines()]
    topics = root / "topics.tsv"
    topics.write_text("".join(f"{q}\t{queries[q]}\n" for q in qids))
    lines = []
    for qid in qids:
        words = set(re.findall(r"\w+", queries[qid].lower()))
        scored = sorted(((len(words & set(re.findall(r"\w+", f"{d['title']} {d['text']}".lower()))), d["_id"])
                         for d in docs), key=lambda x: (-x[0], x[1]))[:HITS]
        lines += [f"{qid} Q0 {docid} {r + 1} {s + 1.0 / (r + 2):.4f} overlap\n" for r, (s, docid) in enumerate(scored)]
    run = root / "run.txt"
    run.write_text("".join(lines))
    local, stats = root / "local.txt", root / "local.json"
    assert rerank_cli.main(args(run, topics, local, "--stats", str(stats))) == 0
    return {"root": root, "run": run, "topics": topics, "local": local, "local_stats": stats}


def args(run: Path, topics: Path, out: Path, *extra: str) -> list[str]:
    return ["--run", str(run), "--topics", str(topics), "--corpus", str(DATA / "corpus.jsonl"), "--output", str(out),
            *POLICY, *extra]


def one_error(argv: Sequence[str], capsys: pytest.CaptureFixture[str], out: Path) -> str:
    assert rerank_cli.main(list(argv)) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert not out.exists(), "no output on error"
    assert lines[-1].startswith("error: ") and sum("error" in line.lower() for line in lines) == 1, lines
    assert not ray.is_initialized(), "ray is shut down after a failed run"
    return lines[-1]


def test_ray_run_is_byte_identical_and_stats_merge(files: dict[str, Path], tmp_path: Path, capfd) -> None:
    out, stats = tmp_path / "ray.txt", tmp_path / "ray.json"
    assert rerank_cli.main(args(files["run"], files["topics"], out, "--stats", str(stats), "--engine", "ray",
                                "--workers", "2")) == 0
    captured = capfd.readouterr()
    assert captured.out == ""  # ray's log noise stays out of stdout
    assert "matryoshka rerank (ray)" in captured.err and f"{N_QUERIES}/{N_QUERIES}" in captured.err  # the bar
    assert out.read_bytes() == files["local"].read_bytes()
    local, merged = json.loads(files["local_stats"].read_text()), json.loads(stats.read_text())
    assert set(merged) == set(local)
    assert {k: v for k, v in merged.items() if k not in TIMING} == {k: v for k, v in local.items() if k not in TIMING}
    assert merged["queries"] == N_QUERIES and merged["reranked_candidates"] == N_QUERIES * 8
    assert not ray.is_initialized()


def test_a_killed_worker_loses_nothing(files: dict[str, Path], tmp_path: Path) -> None:
    reranker = MatryoshkaReranker(policy="topk", threshold=0.9, depth=8, first_stage_weight=0.3, fusion="minmax",
                                  threads=1)
    killed: list[int] = []

    def kill_one(done: int, workers: Sequence[WorkerInfo]) -> None:
        if not killed:  # after the first result, while the other tasks are queued or running
            killed.append(workers[0].pid)
            os.kill(workers[0].pid, signal.SIGKILL)

    run = read_run(files["run"])
    reranked = reranker.rerank_run(run, read_topics(files["topics"]), CorpusDocs(DATA / "corpus.jsonl"),
                                   engine="ray", workers=2, on_result=kill_one)
    assert killed
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    out = tmp_path / "killed.txt"
    write_run(out, reranked, "matryoshka")
    assert out.read_bytes() == files["local"].read_bytes()
    assert reranker.stats.queries == N_QUERIES and reranker.stats.candidates == N_QUERIES * 8


def test_a_model_that_does_not_verify_on_a_worker(files: dict[str, Path], tmp_path: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model, ignore=shutil.ignore_patterns("int8"))
    built = rerank_cli.build_reranker

    def build_then_tamper(ns):  # the driver's copy verifies; the workers then read a changed tokenizer
        reranker = built(ns)
        tokenizer = model / "tokenizer.json"
        tokenizer.write_text(tokenizer.read_text().replace("[UNK]", "[UNKNOWN]"))
        return reranker

    monkeypatch.setattr(rerank_cli, "build_reranker", build_then_tamper)
    out = tmp_path / "out.txt"
    err = one_error(args(files["run"], files["topics"], out, "--model", str(model), "--engine", "ray", "--workers",
                         "1"), capsys, out)
    assert re.search(r"^error: Ray worker on \S+: .*tokenizer.json: sha256 is \w+ but manifest.json expects", err), err
    monkeypatch.setattr(rerank_cli, "build_reranker", built)  # tampered before the run: the driver refuses it
    err = one_error(args(files["run"], files["topics"], out, "--model", str(model), "--engine", "ray"), capsys, out)
    assert "tokenizer.json: sha256 is" in err and "Ray" not in err


def test_a_missing_document_mid_run(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run.txt"
    lines = files["run"].read_text().splitlines(keepends=True)
    qid = lines[-1].split()[0]
    run.write_text("".join(lines) + f"{qid} Q0 no-such-doc {HITS + 1} 0.5 overlap\n")
    out = tmp_path / "out.txt"
    err = one_error(args(run, files["topics"], out, "--engine", "ray", "--workers", "1"), capsys, out)
    assert f"{run}:{len(lines) + 1}: document 'no-such-doc' of query '{qid}' is not in corpus" in err, err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_existing_cluster_is_used_and_left_running(files: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.is_file():
        pytest.skip(f"no ray command beside {sys.executable}")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(0.5)
        out = tmp_path / "cluster.txt"
        # the CLI as a user runs it; Ray reads RAY_AUTH_MODE once per process: the head's default is token mode,
        # and a driver joins it with the token (~/.ray/auth_token) in that mode (README)
        subprocess.run([sys.executable, "-m", "matryoshka", "rerank", *args(files["run"], files["topics"], out,
                        "--engine", "ray", "--ray-address", f"127.0.0.1:{port}")], check=True, capture_output=True,
                       env={**os.environ, "RAY_AUTH_MODE": "token"}, timeout=120)
        assert out.read_bytes() == files["local"].read_bytes()
        assert head.poll() is None  # the driver disconnected; the cluster still runs
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head's process group: only what this test started
        head.wait()


def test_an_unreachable_cluster_fails_first(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    port = free_port()  # nothing listens on it
    out = tmp_path / "out.txt"
    err = one_error(args(files["run"], files["topics"], out, "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"),
                    capsys, out)
    assert err.startswith(f"error: Ray cluster at 127.0.0.1:{port} cannot be reached"), err
    err = one_error(args(files["run"], files["topics"], out, "--engine", "ray", "--ray-address", "head:port"),
                    capsys, out)
    assert "--ray-address='head:port' is invalid" in err


@pytest.mark.parametrize(("extra", "pattern"), [
    (["--workers", "2"], r"--workers=2 is invalid: expected no --workers with engine 'local' \(it is an option of "
                         r"--engine ray\)"),
    (["--engine", "ray", "--workers", "0"], r"--workers=0 is invalid: expected an integer >= 1"),
    (["--engine", "ray", "--workers", "64"], r"--workers=64 is invalid: expected at most \d+ workers of 1 thread"),
])
def test_bad_engine_options(files: dict[str, Path], tmp_path: Path, capsys, extra: list[str], pattern: str) -> None:
    out = tmp_path / "out.txt"
    assert re.search(pattern, one_error(args(files["run"], files["topics"], out, *extra), capsys, out))


def test_without_ray_installed(files: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "out.txt"
    err = one_error(args(files["run"], files["topics"], out, "--engine", "ray"), capsys, out)
    assert err == "error: --engine ray needs the ray extra: pip install 'pyserini-matryoshka[ray]'"
    with pytest.raises(MissingExtraError):
        ENGINES["ray"].load()

