"""Tiny fixtures for the dense tests and smoke runs: a random base model, a training set, a BEIR folder, topics.

The texts use the tiny models' word-level vocabulary (:data:`matryoshka.training.tiny.WORDS`), so every token is
known; query ``q<i>`` shares its two words with its positive ``d<i>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from matryoshka.io import Document
from matryoshka.training.data import TrainingQuery, write_teacher_scores, write_training_set
from matryoshka.training.tiny import WORDS, make_tiny_base

PathLike = str | os.PathLike[str]
VOCAB = [w for w in WORDS if w.islower()]


def tiny_text(i: int, words: int) -> str:
    return " ".join(VOCAB[(i + k) % len(VOCAB)] for k in range(words))


def tiny_corpus(n: int = 24) -> dict[str, Document]:
    return {f"d{i}": Document(f"d{i}", "", tiny_text(i, 3 + i % 4)) for i in range(n)}


def tiny_queries(n: int = 16, docs: int = 24, candidates: int = 5) -> list[TrainingQuery]:
    return [TrainingQuery(f"q{i}", tiny_text(i, 2), {f"d{i}": 1},
                          tuple(f"d{(i + j) % docs}" for j in range(1, candidates + 1))) for i in range(n)]


def make_tiny_training_set(folder: PathLike, teacher_file: PathLike | None = None, n: int = 16) -> Path:
    """A training set of ``n`` queries over :func:`tiny_corpus`; with ``teacher_file``, a teacher TSV for it."""
    queries = tiny_queries(n)
    out = write_training_set(folder, queries, tiny_corpus(), {"name": "tiny-dense"}, overwrite=True)
    if teacher_file is not None:
        write_teacher_scores(teacher_file, {q.qid: {d: (3.0 if d in q.positives else 1.0 / (k + 1))
                                                    for k, d in enumerate((*q.positives, *q.candidates))}
                                            for q in queries})
    return out


def make_tiny_beir(folder: PathLike, queries: int = 4) -> Path:
    """A BEIR folder (corpus, queries, ``qrels/test.tsv``) over :func:`tiny_corpus`."""
    root = Path(folder)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for doc in tiny_corpus().values():
            handle.write(json.dumps({"_id": doc.docid, "title": doc.title, "text": doc.text}) + "\n")
    with (root / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(queries):
            handle.write(json.dumps({"_id": f"q{i}", "text": tiny_text(i, 2)}) + "\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\td{i}\t1\n" for i in range(queries)), encoding="utf-8")
    return root


def make_tiny_dense_base(folder: PathLike, model_type: str = "bert", dropout: float | None = None) -> Path:
    """A tiny random base model (2 layers, hidden 32); ``dropout`` overrides BERT's dropout probabilities."""
    out = make_tiny_base(folder, model_type, num_layers=2, hidden=32, heads=4)
    if dropout is not None:
        config_file = out / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout"):
            if key in config:
                config[key] = dropout
        config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def write_flat_index(folder: PathLike, model_folder: PathLike, corpus: dict[str, Document] | None = None,
                     passage_max_length: int = 32, prefix: str = "") -> Path:
    """A flat inner-product Faiss index folder (``index`` + ``docid``, as ``pyserini.encode --to-faiss`` writes it)
    of ``corpus`` (default :func:`tiny_corpus`) encoded with mean pooling + L2 by the model in ``model_folder``
    (with a passage ``prefix``: an index of another text format)."""
    import faiss

    from matryoshka.training.dense.modeling import BiEncoder

    corpus = corpus if corpus is not None else tiny_corpus()
    model = BiEncoder.build(model_folder, pooling="mean", normalize=True, passage_max_length=passage_max_length,
                            passage_prefix=prefix)
    docids = list(corpus)
    vectors = model.encode_texts([corpus[d].contents for d in docids], "passage").numpy()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / "index"))
    (out / "docid").write_text("".join(f"{d}\n" for d in docids), encoding="utf-8")
    return out
