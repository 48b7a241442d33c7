"""The bi-encoder (FlagEmbedding's ``BiEncoderModel``, seed 003): one Hugging Face backbone encodes queries and
passages into single vectors (last-token, mean or [CLS] pooling, optional L2 normalisation).

- ``forward(query, passage) -> (q_reps, p_reps)``; the losses live in :mod:`matryoshka.training.dense.losses` so
  the shared trainer can gather the representations across ranks.
- Sub-batch encoding (``sub_batch_size`` > 0) runs the backbone on slices of the batch and concatenates the
  vectors, keeping the autograd graph (bounds activation memory per forward, as in the seed); each slice drops the
  columns that are padding in all its rows.
- Decoders get ``position_ids = cumsum(mask) - 1``, so a text's vector does not depend on the padding side.
- ``save(dir)`` writes a plain Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files) plus
  ``dense_config.json``, atomically; Pyserini and ``AutoModel`` load it as is. A model trained in ``corpus`` mode
  (query-side fine-tuning) also saves its frozen passage encoder, as a plain folder in ``passage_encoder/``:
  the top folder encodes queries, the subfolder encodes documents (``encode_texts(..., "passage")`` uses it).
  ``load_state_dict`` accepts both this module's keys (``backbone.*``) and the saved file's keys, so the shared
  trainer's resume reads checkpoints.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from matryoshka.errors import MissingInputError
from matryoshka.io import atomic_directory
from matryoshka.training.dense.config import PASSAGE_ENCODER_DIR, DenseConfig, DenseConfigError, Pooling, TrainingMode
from matryoshka.training.dense.pooling import decoder_position_ids, pool

logger = logging.getLogger(__name__)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PathLike = str | os.PathLike[str]
DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")
PREFIX = "backbone."


def is_decoder_config(hf_config: Any) -> bool:
    """Causal LMs (Llama, Qwen, Mistral, GPT-2, ...): by ``architectures`` or the config's decoder flags."""
    architectures = getattr(hf_config, "architectures", None) or []
    if any(str(a).endswith(DECODER_SUFFIXES) for a in architectures):
        return True
    from matryoshka.training.families import decoder_model_types

    return str(getattr(hf_config, "model_type", "")) in decoder_model_types()


def load_hf_tokenizer(folder: PathLike, hf_config: Any, pooling: Pooling) -> Any:
    """``AutoTokenizer`` from the local folder, with a pad token (eos/unk if it has none) and left padding for
    last-token pooling (as Pyserini's last-token encoder pads)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise MissingInputError(Path(folder) / "tokenizer.json", "loadable tokenizer",
                                f"the model folder needs Hugging Face tokenizer files ({type(exc).__name__})") from None
    if tokenizer.pad_token is None:
        candidates = [tokenizer.eos_token, tokenizer.unk_token]
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(hf_config, name, None)
            value = value[0] if isinstance(value, list | tuple) and value else value
            if isinstance(value, int):
                candidates.append(tokenizer.convert_ids_to_tokens(value))
        token = next((c for c in candidates if c), None)
        if token is None:
            raise DenseConfigError(f"{folder}: the tokenizer has no pad, eos or unk token: expected one to pad with")
        tokenizer.pad_token = token
    tokenizer.padding_side = "left" if pooling is Pooling.LAST else "right"
    return tokenizer


def equal_state_dicts(left: Mapping[str, Tensor], right: Mapping[str, Tensor]) -> bool:
    """Whether two state dicts hold the same tensors under the same names (then they encode identically)."""
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


class BiEncoder(nn.Module):
    """See the module docstring. Build with :meth:`build` (from a base model) or :meth:`load` (a saved folder)."""

    def __init__(self, backbone: nn.Module, tokenizer: Any, config: DenseConfig, decoder: bool,
                 sub_batch_size: int = 0, passage_source: PathLike | None = None) -> None:
        super().__init__()
        self.backbone, self.tokenizer, self.config = backbone, tokenizer, config
        self.decoder, self.sub_batch_size = decoder, sub_batch_size
        if bool(config.passage_encoder) != (passage_source is not None):
            raise DenseConfigError("a frozen passage encoder needs both passage_encoder in the config and its folder")
        # the frozen passage encoder's folder; kept out of the module tree (no parameters, no state_dict entries)
        self.__dict__["passage_source"] = Path(passage_source) if passage_source is not None else None
        self.__dict__["_passage_model"] = None
        accepted = inspect.signature(backbone.forward).parameters
        self._takes_positions = decoder and "position_ids" in accepted
        for name, parameter in backbone.named_parameters():
            if name.startswith("pooler."):  # BERT's pooler is never used by the pooled vector
                parameter.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def build(cls, base_model: PathLike, pooling: Pooling | str | None = None, normalize: bool | None = None,
              query_prefix: str | None = None, passage_prefix: str | None = None, query_max_length: int = 64,
              passage_max_length: int = 256, temperature: float = 1.0,
              mode: TrainingMode | str = TrainingMode.NORMAL, sub_batch_size: int = 0) -> BiEncoder:
        """From a local HF folder. Unset options come from the folder's ``dense_config.json`` when it has one,
        else: last-token pooling for decoders, mean for encoders; no normalisation; no prefixes."""
        from transformers import AutoConfig, AutoModel

        folder = Path(base_model)
        if not (folder / "config.json").is_file():
            raise MissingInputError(folder / "config.json", "base model config",
                                    "pass a local Hugging Face model folder (the hub is never used)")
        hf_config = AutoConfig.from_pretrained(str(folder))
        decoder = is_decoder_config(hf_config)
        saved = DenseConfig.load(folder) if DenseConfig.exists(folder) else None

        def pick(value: Any, key: str, default: Any) -> Any:
            return value if value is not None else (getattr(saved, key) if saved is not None else default)

        mode = TrainingMode(mode)
        frozen = saved is not None and bool(saved.passage_encoder)
        if frozen and mode is not TrainingMode.CORPUS:
            raise DenseConfigError(f"{folder} has a frozen passage encoder (it was trained in corpus mode): expected "
                                   "mode=corpus to continue from it, or start from its base model")
        passage_source = None
        if mode is TrainingMode.CORPUS:
            passage_source = saved.passage_folder(folder) if frozen else folder
        config = DenseConfig(
            pooling=pick(pooling, "pooling", Pooling.LAST if decoder else Pooling.MEAN),
            normalize=bool(pick(normalize, "normalize", False)), query_prefix=pick(query_prefix, "query_prefix", ""),
            passage_prefix=pick(passage_prefix, "passage_prefix", ""), query_max_length=query_max_length,
            passage_max_length=passage_max_length, temperature=temperature, mode=mode,
            model_type=str(hf_config.model_type),
            base_model=saved.base_model if saved is not None and saved.base_model else folder.name,
            hidden_size=int(getattr(hf_config, "hidden_size", 0) or 0),
            passage_encoder=PASSAGE_ENCODER_DIR if passage_source is not None else "")
        _check_length(hf_config, config)
        backbone = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = load_hf_tokenizer(folder, hf_config, config.pooling)
        logger.info("bi-encoder from %s: %s pooling, normalize=%s, %s", folder, config.pooling.value,
                    config.normalize, "decoder" if decoder else "encoder")
        return cls(backbone, tokenizer, config, decoder, sub_batch_size, passage_source)

    @classmethod
    def load(cls, folder: PathLike, device: str | torch.device = "cpu", sub_batch_size: int = 0) -> BiEncoder:
        """A folder written by :meth:`save`."""
        from transformers import AutoConfig, AutoModel

        folder = Path(folder)
        config = DenseConfig.load(folder)
        hf_config = AutoConfig.from_pretrained(str(folder))
        backbone = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(device)
        tokenizer = load_hf_tokenizer(folder, hf_config, config.pooling)
        passage_source = config.passage_folder(folder) if config.passage_encoder else None
        return cls(backbone, tokenizer, config, is_decoder_config(hf_config), sub_batch_size, passage_source)

    def save(self, folder: PathLike, overwrite: bool = False) -> Path:
        from matryoshka.training.config import package_versions

        self.config.versions = package_versions()
        with atomic_directory(folder, overwrite=overwrite) as tmp:
            self.backbone.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            self.config.save(tmp)
            if self.passage_source is not None:
                passages = self.passage_model()
                passages.backbone.save_pretrained(str(tmp / PASSAGE_ENCODER_DIR))
                passages.tokenizer.save_pretrained(str(tmp / PASSAGE_ENCODER_DIR))
        return Path(folder)

    def passage_model(self) -> BiEncoder:
        """The model that encodes passages: this one, or (corpus mode) the frozen passage encoder, loaded once, in
        eval mode and without gradients."""
        if self.passage_source is None:
            return self
        if self._passage_model is None:
            from transformers import AutoConfig, AutoModel

            hf_config = AutoConfig.from_pretrained(str(self.passage_source))
            backbone = AutoModel.from_pretrained(str(self.passage_source), dtype=torch.float32)
            backbone.to(next(self.backbone.parameters()).device)
            config = DenseConfig.from_dict({**self.config.to_dict(), "passage_encoder": ""})
            model = BiEncoder(backbone, load_hf_tokenizer(self.passage_source, hf_config, config.pooling), config,
                              self.decoder, self.sub_batch_size)
            model.requires_grad_(False)
            self.__dict__["_passage_model"] = model.eval()
        return self._passage_model

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        if state_dict and not all(k.startswith(PREFIX) for k in state_dict):
            state_dict = {PREFIX + k: v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def gradient_checkpointing_enable(self) -> None:
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        self.backbone.gradient_checkpointing_disable()

    # ------------------------------------------------------------------------------------------------ encoding
    def tokenize(self, texts: Sequence[str], kind: str) -> dict[str, Tensor]:
        """Tokenise already formatted texts (``kind`` = ``query`` | ``passage`` picks the maximum length)."""
        limit = self.config.query_max_length if kind == "query" else self.config.passage_max_length
        encoded = self.tokenizer(list(texts), max_length=limit, truncation=True, padding=True,
                                 return_token_type_ids=False, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def encode(self, features: Mapping[str, Tensor]) -> Tensor:
        """``[B, H]`` vectors of tokenised texts, in slices of ``sub_batch_size`` rows (0 = all at once)."""
        rows = features["input_ids"].shape[0]
        step = self.sub_batch_size if 0 < self.sub_batch_size < rows else rows
        return torch.cat([self._encode_slice({k: v[i:i + step] for k, v in features.items()})
                          for i in range(0, rows, step)], dim=0)

    def _encode_slice(self, features: Mapping[str, Tensor]) -> Tensor:
        mask = features["attention_mask"]
        keep = mask.bool().any(dim=0)
        if not bool(keep.all()):
            features = {k: v[:, keep] for k, v in features.items()}
            mask = features["attention_mask"]
        inputs = dict(features)
        if self._takes_positions:
            inputs["position_ids"] = decoder_position_ids(mask)
        hidden = self.backbone(**inputs).last_hidden_state
        vectors = pool(hidden, mask, self.config.pooling)
        return F.normalize(vectors.float(), dim=-1) if self.config.normalize else vectors

    def forward(self, query: Mapping[str, Tensor], passage: Mapping[str, Tensor] | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Query and passage vectors (``None`` without passages: corpus mode reads them from an index)."""
        return self.encode(query), (self.encode(passage) if passage is not None else None)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], kind: str, batch_size: int = 32) -> Tensor:
        """Inference helper: format (prefix), tokenise and encode raw texts; float32 ``[N, H]`` on the CPU."""
        if kind == "passage" and self.passage_source is not None:
            return self.passage_model().encode_texts(texts, kind, batch_size)
        fmt = self.config.query_text if kind == "query" else self.config.passage_text
        device = next(self.backbone.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            features = self.tokenize([fmt(t) for t in texts[i:i + batch_size]], kind)
            out.append(self.encode({k: v.to(device) for k, v in features.items()}).float().cpu())
        return torch.cat(out, dim=0) if out else torch.empty(0, self.config.hidden_size)


def _check_length(hf_config: Any, config: DenseConfig) -> None:
    limit = getattr(hf_config, "max_position_embeddings", None)
    longest = max(config.query_max_length, config.passage_max_length)
    if limit is not None and longest > int(limit):
        raise DenseConfigError(f"passage_max_length/query_max_length={longest} is invalid: expected <= "
                               f"{int(limit)} (max_position_embeddings of the base model)")
