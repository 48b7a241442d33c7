"""A runtime-only install (``pip install pyserini-matryoshka``, no extras) in a fresh venv: the plugin reranks with
the bundled default model and neither torch nor transformers is installed at all. Pyserini (which brings torch) is
left out of this venv on purpose, so "the plugin needs no torch" is proved by absence, not by an import check; the
reranked run must be byte-identical to the one this (full) environment writes."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "scifact-mini"


def runtime_requirements() -> list[str]:
    """[project].dependencies minus Pyserini: what the plugin runtime itself needs."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    return [d for d in deps if not d.lower().startswith("pyserini")]


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("runtime") / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    proc = subprocess.run([*pip, *runtime_requirements()], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"pip could not install the runtime requirements: {proc.stderr.strip()[-1000:]}")
    subprocess.run([*pip, "--no-deps", "-e", str(REPO)], check=True, capture_output=True, text=True)
    return python


def test_runtime_only_install_reranks_without_torch(runtime_venv: Path, tmp_path: Path) -> None:
    missing = subprocess.run([str(runtime_venv), "-c", "import importlib.util as u; "
                              "print([m for m in ('torch', 'transformers', 'pyserini') if u.find_spec(m)])"],
                             capture_output=True, text=True, check=True)
    assert missing.stdout.strip() == "[]"
    with (DATA / "queries.jsonl").open(encoding="utf-8") as f:
        queries = [json.loads(line) for _, line in zip(range(3), f, strict=False)]
    with (DATA / "corpus.jsonl").open(encoding="utf-8") as f:
        docids = [json.loads(line)["_id"] for _, line in zip(range(24), f, strict=False)]
    topics, run = tmp_path / "topics.tsv", tmp_path / "first.txt"
    topics.write_text("".join(f"{q['_id']}\t{q['text']}\n" for q in queries), encoding="utf-8")
    run.write_text("".join(f"{q['_id']} Q0 {d} {r + 1} {30 - r}.0 first\n" for i, q in enumerate(queries)
                           for r, d in enumerate(docids[8 * i:8 * i + 8])))
    args = ["-m", "matryoshka", "rerank", "--run", str(run), "--topics", str(topics), "--corpus",
            str(DATA / "corpus.jsonl"), "--threads", "1"]
    lean, full = tmp_path / "lean.txt", tmp_path / "full.txt"
    proc = subprocess.run([str(runtime_venv), *args, "--output", str(lean)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    subprocess.run([sys.executable, *args, "--output", str(full)], check=True, capture_output=True, text=True)
    assert lean.read_bytes() == full.read_bytes() and len(lean.read_text().splitlines()) == 24
