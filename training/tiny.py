"""Tiny random base models on disk (BERT, MPNet, XLM-R, Llama, Mistral, Qwen2, Gemma) for tests and smoke runs.

``make_tiny_base(folder, "bert")`` writes a Hugging Face folder (``config.json``, ``model.safetensors``,
``tokenizer.json``) with a handful of layers, hidden size 32-64 and a word-level tokenizer over :data:`WORDS`, so
``LayerwiseReranker.build(folder)`` works offline in well under a second. The weights are random (seeded): scores
mean nothing, shapes and numerics are real.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from matryoshka.training.config import ModelConfigError
from matryoshka.training.families import decoder_model_types

logger = logging.getLogger(__name__)

WORDS = ("A", "B", ":", ".", "Predict", "whether", "passage", "contains", "an", "answer", "to", "query", "Yes", "No",
         "the", "cat", "dog", "sat", "on", "mat", "fish", "ocean", "blue", "red", "protein", "cell", "gene", "virus",
         "study", "result", "shows")
SPECIALS = {
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "mpnet": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "xlm-roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "llama": ["<unk>", "<s>", "</s>"],
    "mistral": ["<unk>", "<s>", "</s>"],
    "qwen2": ["<unk>", "<s>", "</s>"],
    "gemma": ["<unk>", "<s>", "</s>"],
}
DECODERS = decoder_model_types()


def _tokenizer(model_type: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = SPECIALS[model_type]
    decoys = ["[CLS]", "[SEP]", "[PAD]"] if model_type in ("mpnet", "xlm-roberta") else []
    vocab = {tok: i for i, tok in enumerate([*specials, *WORDS, *decoys])}
    unk = "[UNK]" if model_type == "bert" else "<unk>"
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if model_type in DECODERS:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    elif model_type != "bert":   # like the real MPNet/XLM-R tokenizers: <s> $A </s>, with BERT's names in the vocab
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                                 special_tokens=[("<s>", 0), ("</s>", 2)])
    return tokenizer, len(vocab)


def _config(model_type: str, vocab_size: int, num_layers: int, hidden: int, heads: int):
    from transformers import (
        BertConfig,
        GemmaConfig,
        LlamaConfig,
        MistralConfig,
        MPNetConfig,
        Qwen2Config,
        XLMRobertaConfig,
    )

    common = {"vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": num_layers,
              "num_attention_heads": heads, "intermediate_size": 2 * hidden, "max_position_embeddings": 512}
    if model_type == "bert":
        return BertConfig(**common, type_vocab_size=2, pad_token_id=0)
    if model_type == "mpnet":
        return MPNetConfig(**common, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if model_type == "xlm-roberta":
        return XLMRobertaConfig(**common, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    decoder = {"num_key_value_heads": max(1, heads // 2), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    if model_type == "mistral":
        return MistralConfig(**common, **decoder, sliding_window=4096, tie_word_embeddings=False)
    if model_type == "qwen2":
        return Qwen2Config(**common, **decoder, tie_word_embeddings=True)
    if model_type == "gemma":
        return GemmaConfig(**common, **decoder, head_dim=hidden // heads, tie_word_embeddings=True)
    return LlamaConfig(**common, **decoder, tie_word_embeddings=False)


def make_tiny_base(folder: str | os.PathLike[str], model_type: str = "bert", num_layers: int = 4,
                   hidden: int = 32, heads: int = 4, seed: int = 0) -> Path:
    """Write a tiny random base model folder of ``model_type`` (a key of :data:`SPECIALS`)."""
    from transformers import AutoModel, AutoModelForCausalLM

    if model_type not in SPECIALS:
        raise ModelConfigError(f"model_type={model_type!r} is invalid for a tiny model: expected one of "
                               f"{sorted(SPECIALS)}")
    folder = Path(folder)
    tokenizer, vocab_size = _tokenizer(model_type)
    config = _config(model_type, vocab_size, num_layers, hidden, heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (AutoModelForCausalLM if model_type in DECODERS else AutoModel).from_config(config)
    model.save_pretrained(str(folder))
    tokenizer.save(str(folder / "tokenizer.json"))
    logger.info("wrote tiny %s model to %s", model_type, folder)
    return folder
