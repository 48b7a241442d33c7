"""A decoder bi-encoder end to end through the real CLIs: a tiny random Llama trained for two steps with
``python -m matryoshka.training.dense`` (last-token pooling, L2, query and passage prefixes), its corpus encoded by
``python -m matryoshka.training.dense.encode`` (Pyserini's ``qwen3`` last-token encoder class), then searched with
``python -m pyserini.search.faiss``: Pyserini's scores must be the trained model's own ``query . passage`` scores,
i.e. Pyserini encodes queries and passages exactly as training did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from integration_tests.conftest import pyserini
from matryoshka.io import load_beir, read_run, write_topics
from tests.fixtures.dense import make_tiny_beir, make_tiny_dense_base, make_tiny_training_set


def test_tiny_llama_train_encode_search(tmp_path: Path) -> None:
    base = make_tiny_dense_base(tmp_path / "base", "llama")
    data = make_tiny_training_set(tmp_path / "train")
    beir = make_tiny_beir(tmp_path / "beir", queries=6)
    subprocess.run([sys.executable, "-m", "matryoshka.training.dense", "--base_model", str(base), "--normalize",
                    "--train_sets", str(data), "--group_size", "3", "--per_device_batch_size", "4", "--max_steps", "2",
                    "--query_prefix", "query : ", "--passage_prefix", "passage : ", "--output_dir",
                    str(tmp_path / "out")], check=True, capture_output=True)
    model = tmp_path / "out" / "model"
    saved = json.loads((model / "dense_config.json").read_text())
    assert (saved["pooling"], saved["normalize"], saved["query_prefix"]) == ("last", True, "query : ")

    index = tmp_path / "faiss"
    subprocess.run([sys.executable, "-m", "matryoshka.training.dense.encode", "--model", str(model), "--corpus",
                    str(beir), "--output", str(index), "--batch_size", "5"], check=True, capture_output=True)
    flags = json.loads((index / "dense_index.json").read_text())["search_flags"]
    assert flags[:2] == ["--encoder-class", "qwen3"] and "--l2-norm" in flags
    dataset = load_beir(beir, "test")
    topics = tmp_path / "topics.tsv"
    write_topics(topics, dataset.split_queries)
    run = tmp_path / "run.txt"
    pyserini("pyserini.search.faiss", "--index", index, "--topics", topics, "--output", run, "--hits", 5, *flags)

    import faiss

    from matryoshka.training.dense.modeling import BiEncoder

    encoder = BiEncoder.load(model).eval()
    docids = (index / "docid").read_text().split()
    stored = faiss.read_index(str(index / "index")).reconstruct_n(0, len(docids))
    mine = encoder.encode_texts([dataset.corpus[d].contents for d in docids], "passage").numpy()
    assert np.allclose(stored, mine, atol=1e-5)  # passages: Pyserini's encoder == the trained model
    hits = read_run(run).queries
    assert set(hits) == set(dataset.split_queries)
    for qid, text in dataset.split_queries.items():
        scores = encoder.encode_texts([text], "query").numpy() @ mine.T
        expected = sorted(scores[0], reverse=True)[:5]
        assert np.allclose([e.score for e in hits[qid]], expected, atol=1e-4), qid  # queries too
