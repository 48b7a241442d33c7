"""benchmarks/recorded.py: per-exit runs written by benchmarks/record_exits.py replay like a fresh recording."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.recorded import find_recorded, load_recorded
from matryoshka.errors import DataFormatError
from matryoshka.io import write_run
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.tuning import record_run
from tests.fixtures.synthetic_model import build_synthetic_model

REPO = Path(__file__).resolve().parent.parent


def _data(n_docs: int = 24) -> tuple[dict[str, str], dict[str, str]]:
    lines = (REPO / "data" / "scifact-mini" / "corpus.jsonl").read_text().splitlines()[:n_docs]
    docs = {(d := json.loads(line))["_id"]: d["text"][:300] for line in lines}
    qlines = (REPO / "data" / "scifact-mini" / "queries.jsonl").read_text().splitlines()[:3]
    queries = {(q := json.loads(line))["_id"]: q["text"] for line in qlines}
    return queries, docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cascade, Path, dict, object]:
    queries, docs = _data()
    root = tmp_path_factory.mktemp("recorded")
    chain = Cascade(build_synthetic_model(root / "model", [*queries.values(), *docs.values()]), batch_size=5)
    ids = list(docs)
    run = {q: {d: float(len(ids) - i) + 0.25 * k for i, d in enumerate(ids[k::2][:8])}
           for k, q in enumerate(queries)}
    recorded = record_run(chain, run, queries, docs, progress=False)
    folder = root / "runs"
    write_run(folder / "mini-bm25.trec", run, tag="bm25")
    for k, e in enumerate(recorded.exits):
        write_run(folder / f"mini-fp32-exit{e}.trec", recorded.to_run(recorded.exit_scores[:, k]), tag=f"exit{e}")
    return chain, folder, run, recorded


def test_loaded_scores_equal_the_recording(setup: tuple) -> None:
    chain, folder, _, recorded = setup
    files = find_recorded("mini", [folder.parent, folder], ["int8", "fp32"], chain.exits)
    assert files is not None and files.tag == "fp32"
    loaded = load_recorded(files, chain)
    assert loaded.qids == recorded.qids and loaded.docids == recorded.docids
    np.testing.assert_array_equal(loaded.groups, recorded.groups)
    np.testing.assert_allclose(loaded.exit_scores, recorded.exit_scores, rtol=0, atol=1e-6)  # 6 decimals in TREC
    np.testing.assert_allclose(loaded.first_stage, recorded.first_stage, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(loaded.cumulative_cost, recorded.cumulative_cost)


def test_missing_exit_run_is_not_found_and_a_foreign_candidate_is_an_error(setup: tuple, tmp_path: Path) -> None:
    chain, folder, run, recorded = setup
    assert find_recorded("mini", [folder], ["int8"], chain.exits) is None
    assert find_recorded("other", [folder], ["fp32"], chain.exits) is None
    for path in folder.iterdir():
        (tmp_path / path.name).write_text(path.read_text())
    last = tmp_path / f"mini-fp32-exit{chain.exits[-1]}.trec"
    lines = last.read_text().splitlines(keepends=True)
    last.write_text("".join(lines[1:]))  # one candidate of the first query lost its score
    files = find_recorded("mini", [tmp_path], ["fp32"], chain.exits)
    with pytest.raises(DataFormatError, match="has no score for BM25 candidate"):
        load_recorded(files, chain)
