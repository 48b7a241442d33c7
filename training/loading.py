"""Loading base models from local folders (HF folders or a GGUF file), offline, for :mod:`modeling`.

- HF folder (``config.json`` + weights + ``tokenizer.json``): encoders load as ``AutoModel`` without pooler;
  decoders as ``AutoModelForCausalLM`` so the ``lm_head`` row of "Yes" can initialise the exit heads, then only the
  base decoder (``lm.base_model``) is kept.
- GGUF (e.g. SmolLM2's ``*.gguf``): ``from_pretrained(dir, gguf_file=...)`` dequantises the weights (needs the
  ``gguf`` package); the tokenizer comes from the same file. The saved backbone config drops
  ``quantization_config`` so a saved reranker reloads with ``from_config`` + ``load_state_dict(strict=True)``.

Always ``attn_implementation="eager"`` (additive float masks; ONNX-friendly) and float32 weights. Never touches the
network: ``HF_HUB_OFFLINE=1`` is set before ``transformers`` loads anything.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from matryoshka.checks import is_int
from matryoshka.errors import MissingInputError
from matryoshka.layout import PairLayout, decoder_layout, encoder_layout, lcm_of, prepare_tokenizer
from matryoshka.training.config import TOKENIZER_FILE, ModelConfigError, RerankerConfig
from matryoshka.training.families import FamilyAdapter, get_adapter, supported_model_types

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GENERIC_FOLDER_NAMES = ("model", "models", "checkpoint", "weights", "base")
DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype", "dtype")


def default_exits(num_layers: int, start_layer: int | None = None) -> tuple[int, ...]:
    """Every layer from ``start_layer`` on, or (no start layer) the thirds ``[L//3, 2L//3, L]``."""
    if start_layer is not None:
        if not is_int(start_layer, 1, num_layers):
            raise ModelConfigError(f"start_layer={start_layer!r} is invalid: expected an integer in 1..{num_layers}")
        return tuple(range(start_layer, num_layers + 1))
    return tuple(sorted({max(1, num_layers * k // 3) for k in (1, 2, 3)}))


@dataclass
class BaseModel:
    """A loaded base model and what building a reranker on it needs."""

    name: str
    model_type: str
    hf_config: Any
    backbone: nn.Module
    tokenizer: Any
    adapter: FamilyAdapter
    yes_token_id: int | None = None
    yes_row: Tensor | None = None

    def backbone_config_dict(self) -> dict[str, Any]:
        data = self.hf_config.to_dict()
        for key in DROPPED_CONFIG_KEYS:
            data.pop(key, None)
        return data

    def make_layout(self, max_length: int, query_length: int, ratios: tuple[int, ...], passage_cls: bool = False
                    ) -> PairLayout:
        """The pair layout of this base model; ``passage_cls`` (encoders) starts the passage segment with its own
        [CLS], as a bi-encoder encodes a passage alone (``attention="segments"``)."""
        multiple = lcm_of(ratios)
        limit = getattr(self.hf_config, "max_position_embeddings", None)
        if limit is not None and max_length > int(limit) - 2:
            raise ModelConfigError(f"max_length={max_length} is invalid for {self.name}: expected <= "
                                   f"{int(limit) - 2} (max_position_embeddings={limit})")
        try:
            if self.adapter.family == "encoder":
                specials = _encoder_specials(self.tokenizer, self.hf_config)
                layout = (encoder_layout(self.tokenizer, max_length, query_length, multiple) if specials is None
                          else PairLayout("encoder", max_length, query_length, multiple, specials[2],
                                          prefix_ids=(specials[0],), query_suffix_ids=(specials[1],),
                                          passage_suffix_ids=(specials[1],)))
                if passage_cls:
                    layout = dataclasses.replace(layout, passage_prefix_ids=layout.prefix_ids)
                return layout
            bos, pad = _bos_id(self.tokenizer), _pad_id(self.hf_config)
            return decoder_layout(self.tokenizer, max_length, query_length, multiple, bos_id=bos, pad_id=pad)
        except ValueError as exc:
            raise ModelConfigError(f"cannot lay out pairs with max_length={max_length}, query_length={query_length}, "
                                   f"passage_multiple={multiple}: {exc}") from None


def _encoder_specials(tokenizer: Any, hf_config: Any) -> tuple[int, int, int] | None:
    """(cls, sep, pad) as the tokenizer's own post-processor and the model config use them, when both say.

    Looking tokens up by name is not enough: MPNet's vocabulary also holds BERT's ``[CLS]``/``[PAD]``, but the model
    uses ``<s>``/``</s>`` and pads with id 1 (its position ids count tokens that differ from the pad id).
    """
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    special = tokenizer.encode("a", add_special_tokens=True).ids
    pad = getattr(hf_config, "pad_token_id", None)
    if pad is None or len(special) != len(plain) + 2 or special[1:-1] != plain:
        return None
    return int(special[0]), int(special[-1]), int(pad)


def _bos_id(tokenizer: Any) -> int | None:
    """The token the tokenizer's own post-processor puts in front of a text, if any."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    special = tokenizer.encode("a", add_special_tokens=True).ids
    if len(special) > len(plain) and special[1:1 + len(plain)] == plain:
        return int(special[0])
    return None


def _pad_id(hf_config: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(hf_config, name, None)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def yes_token_id(tokenizer: Any, source: str) -> int:
    tid = tokenizer.token_to_id("Yes")
    if tid is not None:
        return int(tid)
    ids = tokenizer.encode("Yes", add_special_tokens=False).ids
    if len(ids) != 1:
        raise ModelConfigError(f"{source}: the tokenizer splits 'Yes' into {len(ids)} tokens: expected one token "
                               "(the decoder head is initialised from the lm_head row of 'Yes')")
    return int(ids[0])


def _find_gguf(folder: Path, gguf_file: str | None) -> str | None:
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise MissingInputError(folder / gguf_file, "GGUF file", "pass the file name of a .gguf in the folder")
        return gguf_file
    if (folder / "config.json").is_file():
        return None
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if len(found) == 1:
        return found[0]
    raise MissingInputError(folder / "config.json", "base model config",
                            "expected a Hugging Face model folder, or a folder with exactly one .gguf file "
                            f"(found {len(found)})")


def _load_tokenizer(folder: Path, gguf_file: str | None) -> Any:
    from tokenizers import Tokenizer

    if (folder / TOKENIZER_FILE).is_file():
        return prepare_tokenizer(Tokenizer.from_file(str(folder / TOKENIZER_FILE)))
    if gguf_file is None:
        raise MissingInputError(folder / TOKENIZER_FILE, "tokenizer",
                                "the base model folder needs a fast-tokenizer tokenizer.json")
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file).backend_tokenizer)


def load_base(base_model_dir: str | os.PathLike[str], gguf_file: str | None = None) -> BaseModel:
    """Load the backbone, tokenizer and (decoders) the "Yes" row of the LM head from a local folder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = Path(base_model_dir)
    if not folder.is_dir():
        raise MissingInputError(folder, "base model folder", "pass a local folder (the hub is never used)")
    gguf = _find_gguf(folder, gguf_file)
    extra: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    hf_config = AutoConfig.from_pretrained(str(folder), **extra)
    model_type = str(hf_config.model_type)
    supported = supported_model_types()
    if model_type not in supported:
        raise ModelConfigError(f"{folder}: model_type={model_type!r} is not supported: expected one of "
                               f"{sorted(supported)}")
    adapter = get_adapter(model_type)
    tokenizer = _load_tokenizer(folder, gguf)
    common = {"attn_implementation": "eager", "dtype": torch.float32, **extra}
    yes_id, yes_row = None, None
    if adapter.family == "decoder":
        yes_id = yes_token_id(tokenizer, str(folder))
        lm = AutoModelForCausalLM.from_pretrained(str(folder), **common)
        yes_row = lm.get_output_embeddings().weight[yes_id].detach().clone()
        backbone = lm.base_model
    else:
        backbone = AutoModel.from_pretrained(str(folder), **common, **adapter.load_kwargs())
    backbone.config._attn_implementation = "eager"
    label = folder.resolve().name
    if label.lower() in GENERIC_FOLDER_NAMES:
        label = f"{folder.resolve().parent.name}/{label}"
    name = f"{label}/{gguf}" if gguf else label
    return BaseModel(name, model_type, backbone.config, backbone, tokenizer, adapter, yes_id, yes_row)


def backbone_from_config(config: RerankerConfig) -> nn.Module:
    """An (uninitialised-weights) backbone from a saved reranker's ``backbone_config``."""
    from transformers import AutoConfig, AutoModel

    data = dict(config.backbone_config)
    model_type = data.pop("model_type", config.model_type)
    if model_type != config.model_type:
        raise ModelConfigError(f"backbone_config model_type={model_type!r} does not match model_type="
                               f"{config.model_type!r}: re-save the model")
    hf_config = AutoConfig.for_model(model_type, **data)
    hf_config._attn_implementation = "eager"
    backbone = AutoModel.from_config(hf_config, attn_implementation="eager", **get_adapter(model_type).load_kwargs())
    return backbone.float()
