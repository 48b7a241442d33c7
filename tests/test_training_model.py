"""The layer-wise reranker on tiny random backbones: equivalence with HF, batching, compression, save/load, config."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.errors import DataFormatError, MatryoshkaError, MissingInputError
from matryoshka.training.config import Compression, ModelConfigError, RerankerConfig
from matryoshka.training.modeling import ExitScores, LayerwiseReranker
from tests.fixtures.tiny_models import make_tiny_base

QUERIES = ["the cat sat", "blue ocean fish gene protein", "virus"]
PASSAGES = ["the cat sat on the mat dog", "protein", "study result shows the gene of a virus cell"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bases")
    return {mt: str(make_tiny_base(root / mt, mt, num_layers=4, hidden=32, heads=4, seed=1))
            for mt in ("bert", "mpnet", "xlm-roberta")}


def _batch(model: LayerwiseReranker, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in model.layout.encode(model.tokenizer, queries, passages).items()}


def _no_dropout(model: LayerwiseReranker) -> LayerwiseReranker:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("model_type", ["bert", "mpnet", "xlm-roberta"])
def test_layer_loop_reproduces_hf_backbone(bases: dict[str, str], model_type: str) -> None:
    model = LayerwiseReranker.build(bases[model_type], max_length=64, query_length=8).eval()
    tok = model.tokenizer.token_to_id
    expected = ("[CLS]", "[SEP]", "[PAD]") if model_type == "bert" else ("<s>", "</s>", "<pad>")   # not the decoys
    layout = model.layout
    assert (layout.prefix_ids, layout.query_suffix_ids, layout.pad_id) == ((tok(expected[0]),), (tok(expected[1]),),
                                                                           tok(expected[2]))
    batch = _batch(model, QUERIES, PASSAGES)
    assert batch["token_type_ids"].sum() > 0 and (batch["attention_mask"] == 0).any()   # token types + mid padding
    with torch.no_grad():
        state = model.run_layers(model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
                                 0, model.config.num_layers)
        kwargs = {"token_type_ids": batch["token_type_ids"]} if model_type == "bert" else {}
        reference = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    diff = (state.hidden_states - reference.last_hidden_state)[batch["attention_mask"].bool()].abs().max()
    assert diff < 1e-5
    # chained stages equal one pass
    with torch.no_grad():
        s = model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        for a, b in ((0, 1), (1, 3), (3, 4)):
            s = model.run_layers(s, a, b)
    assert torch.allclose(s.hidden_states, state.hidden_states, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bert", "mpnet", "xlm-roberta"])
def test_scores_do_not_depend_on_batch_mates(bases: dict[str, str], model_type: str) -> None:
    model = LayerwiseReranker.build(bases[model_type], max_length=64, query_length=8,
                                    compress_layers=(2,), compress_ratios=(2,)).eval()
    with torch.no_grad():
        together = model(**_batch(model, QUERIES, PASSAGES))
        alone = model(**_batch(model, QUERIES[1:2], PASSAGES[1:2]))
        together_c = model(**_batch(model, QUERIES, PASSAGES), compression=Compression(2, 2))
        alone_c = model(**_batch(model, QUERIES[1:2], PASSAGES[1:2]), compression=Compression(2, 2))
    assert torch.allclose(together.calibrated[:, 1], alone.calibrated[:, 0], atol=1e-5)
    assert torch.allclose(together_c.calibrated[:, 1], alone_c.calibrated[:, 0], atol=1e-5)


def test_forward_returns_exit_scores_whatever_the_arguments(bases: dict[str, str]) -> None:
    model = LayerwiseReranker.build(bases["bert"], exits=[1, 3, 4], max_length=64, query_length=8,
                                    compress_layers=(1, 2), compress_ratios=(2, 4)).eval()
    batch = _batch(model, QUERIES, PASSAGES)
    assert batch["input_ids"].shape[1] % 4 == 8 % 4
    with torch.no_grad():
        plain = model(**batch)
        compressed = model(**batch, compression=Compression(2, 4))
    for scores in (plain, compressed):
        assert isinstance(scores, ExitScores)
        assert scores.exits == (1, 3, 4)
        assert scores.raw.shape == scores.calibrated.shape == (3, 3)
    # untrained compensation is the identity; compression after layer 2 leaves exit 1 unchanged, changes exit 3
    assert torch.equal(plain.raw, plain.calibrated)
    assert torch.allclose(plain.raw_at(1), compressed.raw_at(1), atol=1e-6)
    assert not torch.allclose(plain.raw_at(3), compressed.raw_at(3), atol=1e-7)
    # exit_score on a staged state equals forward's
    with torch.no_grad():
        state = model.run_layers(model.embed(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
                                 0, 3, Compression(2, 4))
        assert state.hidden_states.shape[1] == 8 + (batch["input_ids"].shape[1] - 8) // 4
        assert torch.allclose(model.exit_score(state, 3), compressed.calibrated_at(3), atol=1e-6)
        assert torch.allclose(model.exit_score(state, 3, calibrated=False), compressed.raw_at(3), atol=1e-6)
    # heads start from one shared init
    assert torch.equal(model.heads["1"].weight, model.heads["4"].weight)
    with pytest.raises(ModelConfigError, match="not an exit"):
        model.exit_score(state, 2)


def test_save_load_round_trip(bases: dict[str, str], tmp_path) -> None:
    model = LayerwiseReranker.build(bases["mpnet"], max_length=64, query_length=8, compress_layers=(2,),
                                    compress_ratios=(2,), compress_method="attention",
                                    inference_compression={"layer": 2, "ratio": 2}).eval()
    with torch.no_grad():   # make the compensation and attention scorer non-trivial so the round trip means something
        model.compensation["1"].scale.fill_(1.7)
        model.compensation["1"].adapter[2].weight.normal_()
        model.compress_scorer.proj.weight.normal_()
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["matryoshka_config.json", "model.safetensors",
                                                                  "tokenizer.json"]
    saved = json.loads((tmp_path / "m" / "matryoshka_config.json").read_text())
    assert saved["compensation"]["per_exit"]["1"]["scale"] == pytest.approx(1.7)
    assert set(saved["versions"]) >= {"torch", "transformers", "matryoshka"}
    loaded = LayerwiseReranker.load(tmp_path / "m").eval()
    batch = _batch(model, QUERIES, PASSAGES)
    with torch.no_grad():
        a = model(**batch, compression=model.config.inference_compression)
        b = loaded(**batch, compression=loaded.config.inference_compression)
    assert torch.equal(a.calibrated, b.calibrated) and torch.equal(a.raw, b.raw)
    assert loaded.config.inference_compression == Compression(2, 2)
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")


def test_load_errors(bases: dict[str, str], tmp_path) -> None:
    model = LayerwiseReranker.build(bases["bert"], max_length=64, query_length=8)
    model.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(MissingInputError, match="model.safetensors"):
        LayerwiseReranker.load(tmp_path / "m")
    with pytest.raises(MissingInputError, match="matryoshka_config.json"):
        LayerwiseReranker.load(tmp_path)
    model.save(tmp_path / "n")
    (tmp_path / "n" / "matryoshka_config.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        LayerwiseReranker.load(tmp_path / "n")
    other = LayerwiseReranker.build(bases["bert"], exits=[2, 4], max_length=64, query_length=8)
    other.save(tmp_path / "o")
    (tmp_path / "o" / "model.safetensors").replace(tmp_path / "x.safetensors")
    model.save(tmp_path / "p")
    (tmp_path / "x.safetensors").replace(tmp_path / "p" / "model.safetensors")
    with pytest.raises(DataFormatError, match="do not match"):
        LayerwiseReranker.load(tmp_path / "p")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"exits": [0, 4]}, "out of range"),
    ({"exits": [2, 5]}, "out of range"),
    ({"exits": [3, 2, 4]}, "strictly ascending"),
    ({"exits": [1, 2]}, "last exit must be the last layer 4"),
    ({"compress_layers": (4,), "compress_ratios": (2,)}, "out of range"),
    ({"compress_layers": (1,), "compress_ratios": (1,)}, "< 2"),
    ({"compress_layers": (1,), "compress_ratios": ()}, "both empty or both non-empty"),
    ({"compress_method": "max"}, "compress_method"),
    ({"compress_layers": (1,), "compress_ratios": (2,), "inference_compression": {"layer": 2, "ratio": 2}},
     "not a trained combination"),
    ({"start_layer": 9}, "start_layer"),
    ({"readout": "max"}, r"readout='max' is invalid for a encoder: expected one of \['token', 'mean', 'cosine'\]"),
])
def test_config_validation(bases: dict[str, str], kwargs: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message) as info:
        LayerwiseReranker.build(bases["bert"], max_length=64, query_length=8, **kwargs)
    assert isinstance(info.value, MatryoshkaError) and "\n" not in str(info.value)


@pytest.mark.parametrize("compression", [None, Compression(2, 2)])
def test_mean_readout_is_the_masked_token_mean_and_survives_save_load(bases: dict[str, str], tmp_path,
                                                                      compression: Compression | None) -> None:
    model = LayerwiseReranker.build(bases["bert"], max_length=64, query_length=8, compress_layers=(2,),
                                    compress_ratios=(2,), readout="mean").eval()
    batch = _batch(model, QUERIES, PASSAGES)
    with torch.no_grad():
        state = model.embed(**batch)
        state = model.run_layers(state, 0, 4, compression)
        mask = state.attention_mask.bool()
        expected = torch.stack([state.hidden_states[i][mask[i]].mean(dim=0) for i in range(len(QUERIES))])
        assert mask.sum() < mask.numel()                     # padding really is left out
        assert torch.allclose(model.exit_hidden(state), expected, atol=1e-6)
        assert not torch.allclose(model.exit_hidden(state), state.hidden_states[:, 0])
        scores = model(**batch, compression=compression).calibrated
        alone = model(**_batch(model, QUERIES[1:2], PASSAGES[1:2]), compression=compression).calibrated
    assert torch.allclose(scores[:, 1], alone[:, 0], atol=1e-5)
    model.save(tmp_path / "m")
    loaded = LayerwiseReranker.load(tmp_path / "m").eval()
    assert loaded.config.readout == "mean"
    with torch.no_grad():
        assert torch.allclose(loaded(**batch, compression=compression).calibrated, scores, atol=1e-6)


def test_unsupported_architecture(bases: dict[str, str]) -> None:
    config = LayerwiseReranker.build(bases["bert"], max_length=64, query_length=8).config.to_dict()
    config["model_type"] = "gpt2"
    with pytest.raises(ModelConfigError, match=r"'gpt2' is not supported: expected one of \[.*'bert'.*'llama'"):
        RerankerConfig.from_dict(config)


def test_gradient_checkpointing_gives_the_same_gradients(bases: dict[str, str]) -> None:
    model = _no_dropout(LayerwiseReranker.build(bases["bert"], max_length=64, query_length=8,
                                                compress_layers=(2,), compress_ratios=(2,))).train()
    batch = _batch(model, QUERIES, PASSAGES)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(**batch, compression=Compression(2, 2)).raw.sum().backward()
        return [p.grad.clone() for p in model.backbone.parameters() if p.grad is not None]

    plain = grads()
    model.gradient_checkpointing_enable()
    checked = grads()
    assert len(plain) == len(checked) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checked, strict=True))


def test_sample_compression_is_seeded(bases: dict[str, str]) -> None:
    model = LayerwiseReranker.build(bases["bert"], max_length=64, query_length=8, compress_layers=(1, 2),
                                    compress_ratios=(2, 4))
    draws = [model.sample_compression(torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1]
    gen = torch.Generator().manual_seed(3)
    seen = {model.sample_compression(gen) for _ in range(64)}
    assert seen == {Compression(layer, ratio) for layer in (1, 2) for ratio in (2, 4)}
    gen = torch.Generator().manual_seed(3)
    assert None in {model.sample_compression(gen, include_uncompressed=True) for _ in range(64)}


def test_bf16_autocast_training_step_with_attention_pooling(bases: dict[str, str]) -> None:
    model = LayerwiseReranker.build(bases["mpnet"], max_length=64, query_length=8, compress_layers=(1,),
                                    compress_ratios=(2,), compress_method="attention").train()
    model.gradient_checkpointing_enable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(**_batch(model, QUERIES, PASSAGES), compression=Compression(1, 2))
    scores.raw.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert float(model.compress_scorer.proj.weight.grad.abs().sum()) > 0
