"""The decoder family (Llama) on a tiny random backbone: "Yes" logit equivalence, padding independence, compression."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.training.config import Compression
from matryoshka.training.modeling import LayerwiseReranker
from tests.fixtures.tiny_models import make_tiny_base

QUERIES = ["the cat sat", "blue ocean fish gene protein", "virus"]
PASSAGES = ["the cat sat on the mat dog", "protein", "study result shows the gene of a virus cell red blue"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_base(tmp_path_factory.mktemp("llama") / "llama", "llama", num_layers=4, hidden=32, heads=4,
                              seed=2))


@pytest.fixture(scope="module")
def model(base: str) -> LayerwiseReranker:
    return LayerwiseReranker.build(base, exits=[2, 3, 4], max_length=96, query_length=12, compress_layers=(1, 2),
                                   compress_ratios=(2, 4)).eval()


def _batch(model: LayerwiseReranker, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in model.layout.encode(model.tokenizer, queries, passages).items()}


def test_layout_and_head_initialisation(base: str, model: LayerwiseReranker) -> None:
    from transformers import AutoModelForCausalLM

    assert model.config.family == "decoder" and model.layout.suffix_length > 0
    assert model.layout.prefix_ids[0] == 1            # the tokenizer's <s> is kept as bos
    lm = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    yes = model.tokenizer.token_to_id("Yes")
    assert model.config.yes_token_id == yes
    for head in model.heads.values():
        assert torch.equal(head.weight[0], lm.lm_head.weight[yes]) and float(head.bias.detach()) == 0.0


def test_final_exit_is_the_causal_lm_yes_logit(base: str, model: LayerwiseReranker) -> None:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    batch = _batch(model, QUERIES, PASSAGES)
    with torch.no_grad():
        scores = model(**batch)
        for row in range(len(QUERIES)):
            keep = batch["attention_mask"][row].bool()
            logits = lm(input_ids=batch["input_ids"][row][keep][None]).logits
            assert float(scores.raw_at(4)[row]) == pytest.approx(float(logits[0, -1, model.config.yes_token_id]),
                                                                abs=1e-4)


@pytest.mark.parametrize("compression", [None, Compression(1, 2), Compression(2, 4)])
def test_padding_in_the_middle_does_not_change_a_score(model: LayerwiseReranker,
                                                       compression: Compression | None) -> None:
    together = _batch(model, QUERIES, PASSAGES)
    assert (together["attention_mask"][:, :-1] < together["attention_mask"][:, 1:]).any()   # pad before real tokens
    with torch.no_grad():
        joint = model(**together, compression=compression)
        for row in range(len(QUERIES)):
            alone = model(**_batch(model, QUERIES[row:row + 1], PASSAGES[row:row + 1]), compression=compression)
            assert torch.allclose(joint.calibrated[:, row], alone.calibrated[:, 0], atol=1e-4)


def test_compression_shortens_the_passage_and_keeps_the_suffix(model: LayerwiseReranker) -> None:
    batch = _batch(model, QUERIES, PASSAGES)
    seq = batch["input_ids"].shape[1]
    passage = seq - model.layout.query_length - model.layout.suffix_length
    with torch.no_grad():
        state = model.embed(batch["input_ids"], batch["attention_mask"], None, batch["position_ids"])
        state = model.run_layers(state, 0, 2, Compression(1, 4))
    assert state.hidden_states.shape[1] == seq - passage + passage // 4
    assert torch.equal(state.attention_mask[:, -model.layout.suffix_length:],
                       batch["attention_mask"][:, -model.layout.suffix_length:])
    assert torch.equal(state.position_ids[:, -1], batch["position_ids"][:, -1])
    # positions stay non-decreasing over real tokens after pooling
    for row in range(len(QUERIES)):
        real = state.position_ids[row][state.attention_mask[row].bool()]
        assert bool((real[1:] > real[:-1]).all())


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma"])
def test_other_decoders_match_their_causal_lm(tmp_path, model_type: str) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    base = str(make_tiny_base(tmp_path / model_type, model_type, num_layers=2, hidden=32, heads=4, seed=4))
    model = LayerwiseReranker.build(base, exits=[1, 2], max_length=64, query_length=8).eval()
    lm = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    batch = _batch(model, QUERIES[:2], PASSAGES[:2])
    with torch.no_grad():
        scores = model(**batch)
        alone = model(**_batch(model, QUERIES[1:2], PASSAGES[1:2]))
        for row in range(2):
            keep = batch["attention_mask"][row].bool()
            logits = lm(input_ids=batch["input_ids"][row][keep][None]).logits
            assert float(scores.raw_at(2)[row]) == pytest.approx(float(logits[0, -1, model.config.yes_token_id]),
                                                                abs=1e-4)
    assert torch.allclose(scores.calibrated[:, 1], alone.calibrated[:, 0], atol=1e-4)


def test_gemma_embeddings_are_scaled_once_whatever_the_transformers_version(tmp_path) -> None:  # noqa: ANN001
    base = str(make_tiny_base(tmp_path / "gemma", "gemma", num_layers=2, hidden=32, heads=4, seed=4))
    model = LayerwiseReranker.build(base, exits=[1, 2], max_length=64, query_length=8).eval()
    backbone, adapter = model.backbone, model.adapter
    ids = torch.tensor([[1, 5, 7, 9]])
    mask = torch.ones_like(ids)
    expected = backbone.embed_tokens.weight[ids] * 32 ** 0.5
    with torch.no_grad():
        scaled, _ = adapter.embed(backbone, ids, mask, None, None)  # this transformers: a scaled embedding module
        plain = torch.nn.Embedding.from_pretrained(backbone.embed_tokens.weight.detach().clone())
        backbone.embed_tokens = plain  # older transformers: a plain embedding, scaled in GemmaModel.forward
        unscaled_module, _ = adapter.embed(backbone, ids, mask, None, None)
    torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unscaled_module, expected, rtol=1e-5, atol=1e-5)


def test_decoders_read_their_last_token_only(base: str) -> None:
    from matryoshka.training.config import ModelConfigError

    with pytest.raises(ModelConfigError, match=r"readout='mean' is invalid for a decoder: expected one of \['token'\]"):
        LayerwiseReranker.build(base, max_length=64, query_length=16, readout="mean")
