"""``encode --reuse_index``: a query-side fine-tuned model reuses the base model's corpus index (same vectors, its
own search flags); anything that would change the document vectors is refused and writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.training.dense.encode import main as encode_main
from matryoshka.training.dense.modeling import BiEncoder
from matryoshka.training.dense.pyserini_args import EncodingSpec
from tests.fixtures.dense import make_tiny_beir, make_tiny_dense_base, tiny_corpus, write_flat_index


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reuse")
    base = make_tiny_dense_base(root / "base")
    beir = make_tiny_beir(root / "beir")
    index = write_flat_index(root / "base-index", base, tiny_corpus(), passage_max_length=32)
    spec = EncodingSpec.from_folder(base, "mean", True, passage_max_length=32)
    info = {"model": str(base), "passage_encoder": str(base), "corpus": str(beir.resolve()),
            "documents": len(tiny_corpus()), "dimension": spec.dimension, "pooling": "mean", "normalize": True,
            "passage_prefix": "", "passage_max_length": 32, "search_flags": spec.search_flags()}
    (index / "dense_index.json").write_text(json.dumps(info), encoding="utf-8")
    models = {}
    for mode in ("corpus", "normal"):  # query-side (frozen passage encoder) and both towers trained
        model = BiEncoder.build(base, pooling="mean", normalize=True, mode=mode, passage_max_length=32)
        with torch.no_grad():
            weight = model.backbone.embeddings.word_embeddings.weight
            weight.add_(0.5 * torch.randn_like(weight))
        models[mode] = model.save(root / f"tuned-{mode}")
    return {"root": root, "base": base, "beir": beir, "index": index, **models}


def encode(*args: object) -> int:
    return encode_main([str(a) for a in args])


def test_query_side_model_reuses_the_base_index(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "reused"
    assert encode("--model", setup["corpus"], "--corpus", setup["beir"], "--reuse_index", setup["index"],
                  "--output", out) == 0
    for name in ("index", "docid"):
        assert (out / name).read_bytes() == (setup["index"] / name).read_bytes()
    info = json.loads((out / "dense_index.json").read_text())
    tuned = setup["corpus"].resolve()
    assert info["search_flags"][:4] == ["--encoder-class", "auto", "--encoder", str(tuned)]
    assert info["passage_encoder"] == str(tuned / "passage_encoder")
    assert info["reused_from"] == str(setup["index"].resolve()) and info["documents"] == len(tiny_corpus())
    # the reused vectors are the tuned model's own document vectors
    import faiss

    vectors = faiss.read_index(str(out / "index")).reconstruct_n(0, len(tiny_corpus()))
    docs = BiEncoder.load(setup["corpus"]).encode_texts([d.contents for d in tiny_corpus().values()], "passage")
    assert torch.allclose(torch.from_numpy(vectors), docs, atol=1e-5)


def test_what_would_change_the_vectors_is_refused(setup: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    common = ("--reuse_index", setup["index"], "--output", out)
    # both towers trained: other document vectors
    assert encode("--model", setup["normal"], "--corpus", setup["beir"], *common) == 2
    assert "differs from" in capsys.readouterr().err and not out.exists()
    # another corpus
    other = make_tiny_beir(tmp_path / "other")
    assert encode("--model", setup["corpus"], "--corpus", other, *common) == 2
    assert f"not {other}" in capsys.readouterr().err and not out.exists()
    # another passage length than the index was encoded with
    assert encode("--model", setup["corpus"], "--corpus", setup["beir"], "--max_length", 16, *common) == 2
    assert "passage_max_length=16" in capsys.readouterr().err and not out.exists()
    # not an index written by encode
    assert encode("--model", setup["corpus"], "--corpus", setup["beir"], "--reuse_index", tmp_path,
                  "--output", out) == 2
    assert "dense_index.json" in capsys.readouterr().err and not out.exists()


def test_a_tampered_index_writes_nothing(setup: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(setup["index"], broken)
    (broken / "docid").write_text("".join(f"d{i}\n" for i in range(3)), encoding="utf-8")
    out = tmp_path / "out"
    assert encode("--model", setup["corpus"], "--corpus", setup["beir"], "--reuse_index", broken,
                  "--output", out) == 2
    assert "3 ids" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_documents_without_text_are_an_error_or_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The collection ``pyserini.encode`` reads: an empty document stops it, naming the id and --skip_empty."""
    from matryoshka.errors import DataFormatError
    from matryoshka.training.dense.encode import write_dense_collection

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "a", "title": "T", "text": "x"}) + "\n"
                      + json.dumps({"_id": "b", "title": "", "text": "  "}) + "\n"
                      + json.dumps({"_id": "c", "title": "", "text": "y"}) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="document 'b' has no text.*--skip_empty"):
        write_dense_collection(corpus, tmp_path / "docs.jsonl")
    assert write_dense_collection(corpus, tmp_path / "docs.jsonl", skip_empty=True) == ["a", "c"]
    lines = [json.loads(line) for line in (tmp_path / "docs.jsonl").read_text().splitlines()]
    assert lines == [{"id": "a", "text": "T x"}, {"id": "c", "text": "y"}]
    assert "1 documents without text left out of the index: b" in caplog.text
    corpus.write_text(json.dumps({"_id": "b", "title": "", "text": ""}) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no document has text"):
        write_dense_collection(corpus, tmp_path / "docs.jsonl", skip_empty=True)
