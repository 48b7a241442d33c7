"""The bi-encoder: pooling (last token with left and right padding on a tiny random Llama, mean, [CLS]),
sub-batch encoding, save/load as a Hugging Face folder with ``dense_config.json``, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.errors import DataFormatError, MissingInputError
from matryoshka.training.dense.config import DenseConfig, DenseConfigError, Pooling, format_text
from matryoshka.training.dense.modeling import BiEncoder
from matryoshka.training.dense.pooling import last_token_index, pool
from tests.fixtures.dense import make_tiny_dense_base

TEXTS = ["cat", "the blue fish sat on the mat", "gene virus cell"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dense_base(tmp_path_factory.mktemp("llama") / "base", "llama")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dense_base(tmp_path_factory.mktemp("bert") / "base", "bert")


def test_last_token_index_left_right_and_mixed_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert (left.sum(1) - 1).tolist() != [3, 3, 3]  # the usual shortcut is wrong for left padding
    with pytest.raises(DenseConfigError, match="all padding"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_mean_and_cls_pooling_ignore_padding() -> None:
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, Pooling.CLS), hidden[:, 0])
    assert torch.allclose(pool(hidden, mask, Pooling.MEAN)[0], hidden[0, :2].mean(0))
    assert torch.allclose(pool(hidden, mask, Pooling.MEAN)[1], hidden[1].mean(0))
    assert torch.equal(pool(hidden, mask, Pooling.LAST), torch.stack([hidden[0, 1], hidden[1, 2]]))


def test_llama_last_token_vectors_do_not_depend_on_padding_side(llama_dir: Path) -> None:
    model = BiEncoder.build(llama_dir, normalize=False).eval()
    assert model.decoder and model.config.pooling is Pooling.LAST
    with torch.no_grad():
        alone = torch.cat([model.encode(model.tokenize([t], "passage")) for t in TEXTS])
        vectors = {}
        for side in ("left", "right"):
            model.tokenizer.padding_side = side
            features = model.tokenize(TEXTS, "passage")
            assert int(features["attention_mask"].sum()) < features["attention_mask"].numel()  # really padded
            vectors[side] = model.encode(features)
    assert torch.allclose(vectors["left"], alone, atol=1e-5)
    assert torch.allclose(vectors["right"], alone, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)


def test_sub_batches_give_the_same_vectors_and_gradients(bert_dir: Path) -> None:
    model = BiEncoder.build(bert_dir, normalize=True).eval()
    features = model.tokenize(TEXTS * 2, "passage")
    full = model.encode(features)
    full.sum().backward()
    grad_full = model.backbone.embeddings.word_embeddings.weight.grad.clone()
    model.zero_grad()
    model.sub_batch_size = 4
    sliced = model.encode(features)
    sliced.sum().backward()
    assert torch.allclose(full, sliced, atol=1e-5)
    assert torch.allclose(grad_full, model.backbone.embeddings.word_embeddings.weight.grad, atol=1e-5)
    assert torch.allclose(full.norm(dim=-1), torch.ones(len(TEXTS) * 2), atol=1e-5)


def test_save_load_round_trip_as_a_hugging_face_folder(bert_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModel

    model = BiEncoder.build(bert_dir, pooling="cls", normalize=True, query_prefix="query:",
                            passage_prefix="passage:", passage_max_length=32).eval()
    out = model.save(tmp_path / "dense")
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "dense_config.json"} <= \
        {p.name for p in out.iterdir()}
    saved = json.loads((out / "dense_config.json").read_text())
    assert saved["pooling"] == "cls" and saved["normalize"] and saved["query_prefix"] == "query:"
    assert set(saved["versions"]) >= {"torch", "transformers"}
    again = BiEncoder.load(out).eval()
    with torch.no_grad():
        assert torch.allclose(model.encode_texts(TEXTS, "query"), again.encode_texts(TEXTS, "query"), atol=1e-6)
    plain = AutoModel.from_pretrained(str(out))  # what Pyserini loads
    assert plain.config.hidden_size == 32
    from safetensors.torch import load_file

    again.load_state_dict(load_file(str(out / "model.safetensors")))  # the shared trainer's resume path
    assert format_text("query:", " cat ", Pooling.CLS) == "query: cat"
    assert format_text("Query: ", "cat", Pooling.LAST) == "Query: cat"


def test_bad_model_folders_and_configs(tmp_path: Path, bert_dir: Path) -> None:
    with pytest.raises(MissingInputError, match="base model config not found"):
        BiEncoder.build(tmp_path / "nowhere")
    with pytest.raises(MissingInputError, match="dense model config not found"):
        BiEncoder.load(bert_dir)
    with pytest.raises(DenseConfigError, match="pooling='max' is invalid"):
        BiEncoder.build(bert_dir, pooling="max")
    with pytest.raises(DenseConfigError, match="expected <= 512"):
        BiEncoder.build(bert_dir, passage_max_length=4096)
    (tmp_path / "dense_config.json").write_text('{"pooling": "mean", "normalize": true, "extra": 1}')
    with pytest.raises(DataFormatError, match="unknown keys"):
        DenseConfig.load(tmp_path)
    (tmp_path / "dense_config.json").write_text('{"pooling": "mean", "normalize": true, "temperature": -1}')
    with pytest.raises(DataFormatError, match="temperature=-1 is invalid"):
        DenseConfig.load(tmp_path)


def test_corpus_mode_keeps_a_frozen_passage_encoder(bert_dir: Path, tmp_path: Path) -> None:
    """Query-side fine-tuning: the passage encoder is the base model, outside the module's parameters, saved as a
    plain subfolder; a model with one continues only in corpus mode."""
    model = BiEncoder.build(bert_dir, pooling="mean", normalize=True, mode="corpus", passage_max_length=32)
    base = BiEncoder.build(bert_dir, pooling="mean", normalize=True, passage_max_length=32)
    assert model.config.passage_encoder == "passage_encoder" and model.passage_source == bert_dir
    assert set(model.state_dict()) == set(base.state_dict())  # no passage-encoder entries in checkpoints
    with torch.no_grad():
        weight = model.backbone.embeddings.word_embeddings.weight
        weight.add_(0.5 * torch.randn_like(weight))
    texts = TEXTS[1:]
    assert torch.allclose(model.encode_texts(texts, "passage"), base.encode_texts(texts, "passage"), atol=1e-6)
    assert not torch.allclose(model.encode_texts(texts, "query"), base.encode_texts(texts, "query"), atol=1e-3)
    assert not any(p.requires_grad for p in model.passage_model().parameters())
    model.save(tmp_path / "saved")
    again = BiEncoder.build(tmp_path / "saved", mode="corpus")  # continuing: the subfolder stays the passage side
    assert again.passage_source == tmp_path / "saved" / "passage_encoder"
    assert torch.allclose(again.encode_texts(texts, "passage"), base.encode_texts(texts, "passage"), atol=1e-6)
    with pytest.raises(DenseConfigError, match="expected mode=corpus"):
        BiEncoder.build(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "dense_config.json").read_text())
    config["passage_encoder"] = "elsewhere"
    (tmp_path / "saved" / "dense_config.json").write_text(json.dumps(config))
    with pytest.raises(DataFormatError, match="passage_encoder='elsewhere' is invalid"):
        BiEncoder.load(tmp_path / "saved")
