"""The reranker's configuration: one dataclass, saved as ``matryoshka_config.json`` beside the weights.

``RerankerConfig`` holds everything needed to rebuild a :class:`~matryoshka.training.modeling.LayerwiseReranker`
from its folder without the original base model: the backbone's own Hugging Face config (``backbone_config``), the
exits, the compression choices, the pair layout and what the compensation phase trained. It is validated on
construction, so a bad value fails early with one line naming the value, what was expected and how to fix it.

Conventions (ARCHITECTURE.md):
- ``exits`` are ascending 1-based layer counts ("the score after layer l"); the last one is ``num_layers``.
- ``compress_layers`` are 1-based too: "pool passage tokens right after layer l", so 1 <= l < ``num_layers``.
- ``inference_compression`` is ``{"layer": l, "ratio": r}`` (one of the trained combinations) or ``None``.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from matryoshka.checks import is_int
from matryoshka.errors import DataFormatError, ModelConfigError
from matryoshka.io.jsonfile import write_json_object
from matryoshka.layout import QUERY_EXITS, Compression, PairLayout, lcm_of

CONFIG_FILE = "matryoshka_config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
COMPRESS_METHODS = ("mean", "attention")
# what an exit head reads: the family's scoring token ([CLS] / the last token), (encoders) the masked mean of
# every token of the pair; or (encoders) "cosine": the cosine of the two segments' masked means, as a bi-encoder scores
READOUTS = {"encoder": ("token", "mean", "cosine"), "decoder": ("token",)}
# how the pair's tokens attend: "pair" (every token sees every token: a cross-encoder) or "segments" (each segment
# attends only within itself, with its own positions and token type 0: the bi-encoder's view of query and passage)
ATTENTIONS = ("pair", "segments")
SEGMENT_MODEL_TYPES = ("bert",)
CONFIG_VERSION = 1




def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a checkpoint (recorded in the config for reproducibility)."""
    import safetensors
    import torch
    import transformers

    import matryoshka
    return {"matryoshka": matryoshka.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def _ints(name: str, values: Any) -> tuple[int, ...]:
    try:
        out = tuple(values)
    except TypeError:
        raise ModelConfigError(f"{name}={values!r} is invalid: expected a list of integers") from None
    if any(isinstance(v, bool) or not isinstance(v, int) for v in out):
        raise ModelConfigError(f"{name}={list(out)!r} is invalid: expected a list of integers")
    return out


@dataclass
class RerankerConfig:
    """Everything that defines a layer-wise reranker besides its weights and tokenizer (see module docstring)."""

    family: str
    model_type: str
    base_model: str
    num_layers: int
    hidden_size: int
    exits: tuple[int, ...]
    layout: dict[str, Any]
    backbone_config: dict[str, Any]
    compress_layers: tuple[int, ...] = ()
    compress_ratios: tuple[int, ...] = ()
    compress_method: str = "mean"
    inference_compression: Compression | None = None
    yes_token_id: int | None = None
    adapter_hidden: int = 64
    readout: str = "token"
    attention: str = "pair"
    projection_hidden: int = 0
    query_exit: str = "same"
    compensation: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    config_version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        from matryoshka.training.families import supported_model_types

        self.exits = _ints("exits", self.exits)
        self.compress_layers = _ints("compress_layers", self.compress_layers)
        self.compress_ratios = _ints("compress_ratios", self.compress_ratios)
        self.inference_compression = Compression.from_value(self.inference_compression)
        supported = supported_model_types()
        if self.model_type not in supported:
            raise ModelConfigError(f"model_type={self.model_type!r} is not supported: expected one of "
                                   f"{sorted(supported)} (choose a base model of a supported architecture)")
        if self.family != supported[self.model_type]:
            raise ModelConfigError(f"family={self.family!r} does not match model_type={self.model_type!r}: "
                                   f"expected {supported[self.model_type]!r}")
        if self.num_layers < 1:
            raise ModelConfigError(f"num_layers={self.num_layers} is invalid: expected >= 1")
        self._check_exits()
        self._check_compression()
        if self.family == "decoder" and self.yes_token_id is None:
            raise ModelConfigError("yes_token_id=None is invalid for a decoder: expected the id of the token 'Yes'")
        if self.readout not in READOUTS.get(self.family, ()):
            raise ModelConfigError(f"readout={self.readout!r} is invalid for a {self.family}: expected one of "
                                   f"{list(READOUTS.get(self.family, ()))}")
        self._check_attention()
        if self.adapter_hidden < 1:
            raise ModelConfigError(f"adapter_hidden={self.adapter_hidden} is invalid: expected >= 1")
        if not is_int(self.projection_hidden, 0) or (self.projection_hidden and self.readout != "cosine"):
            raise ModelConfigError(f"projection_hidden={self.projection_hidden!r} is invalid: expected an integer "
                                   ">= 0, and 0 unless readout='cosine'")
        if self.query_exit not in QUERY_EXITS or (self.query_exit != "same" and self.readout != "cosine"):
            raise ModelConfigError(f"query_exit={self.query_exit!r} is invalid: expected one of {list(QUERY_EXITS)}, "
                                   "and 'same' unless readout='cosine'")
        layout = self.pair_layout()
        if layout.family != self.family:
            raise ModelConfigError(f"layout family {layout.family!r} does not match model family {self.family!r}")
        needed = lcm_of(self.compress_ratios)
        if layout.passage_multiple % needed:
            raise ModelConfigError(f"layout passage_multiple={layout.passage_multiple} is invalid: expected a "
                                   f"multiple of lcm(compress_ratios)={needed}")

    def _check_exits(self) -> None:
        exits, n = self.exits, self.num_layers
        if not exits:
            raise ModelConfigError(f"exits=[] is invalid: expected ascending layer numbers ending with {n}")
        bad = [e for e in exits if not 1 <= e <= n]
        if bad:
            raise ModelConfigError(f"exits={list(exits)} has layers {bad} out of range: expected 1..{n} "
                                   f"(the backbone has {n} layers)")
        if any(b <= a for a, b in itertools.pairwise(exits)):
            raise ModelConfigError(f"exits={list(exits)} is invalid: expected strictly ascending layer numbers")
        if exits[-1] != n:
            raise ModelConfigError(f"exits={list(exits)} is invalid: the last exit must be the last layer {n} "
                                   f"(append {n})")

    def _check_compression(self) -> None:
        n = self.num_layers
        if self.compress_method not in COMPRESS_METHODS:
            raise ModelConfigError(f"compress_method={self.compress_method!r} is invalid: expected one of "
                                   f"{list(COMPRESS_METHODS)}")
        bad = [c for c in self.compress_layers if not 1 <= c < n]
        if bad:
            raise ModelConfigError(f"compress_layers={list(self.compress_layers)} has layers {bad} out of range: "
                                   f"expected 1..{n - 1} (compression happens after a layer, before the last)")
        if len(set(self.compress_layers)) != len(self.compress_layers):
            raise ModelConfigError(f"compress_layers={list(self.compress_layers)} has duplicates")
        small = [r for r in self.compress_ratios if r < 2]
        if small:
            raise ModelConfigError(f"compress_ratios={list(self.compress_ratios)} has ratios {small} < 2: "
                                   "expected integers >= 2")
        if bool(self.compress_layers) != bool(self.compress_ratios):
            raise ModelConfigError(f"compress_layers={list(self.compress_layers)} and compress_ratios="
                                   f"{list(self.compress_ratios)} must be both empty or both non-empty")
        inf = self.inference_compression
        if inf is not None and (inf.layer not in self.compress_layers or inf.ratio not in self.compress_ratios):
            raise ModelConfigError(f"inference_compression={inf.to_dict()} is not a trained combination: expected "
                                   f"layer in {list(self.compress_layers)} and ratio in {list(self.compress_ratios)}")

    def _check_attention(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ModelConfigError(f"attention={self.attention!r} is invalid: expected one of {list(ATTENTIONS)}")
        if self.attention == "segments":
            if self.model_type not in SEGMENT_MODEL_TYPES:
                raise ModelConfigError(f"attention='segments' is not supported for model_type={self.model_type!r}: "
                                       f"expected one of {list(SEGMENT_MODEL_TYPES)} (or attention='pair')")
            if self.compress_layers:
                raise ModelConfigError(f"attention='segments' with compress_layers={list(self.compress_layers)} is "
                                       "not supported: pooling would merge the passage's [CLS] into its tokens; "
                                       "expected no compression (or attention='pair')")
            if not self.pair_layout().passage_prefix_ids:
                raise ModelConfigError("attention='segments' needs a layout whose passage segment starts with its "
                                       "own [CLS] (passage_prefix_ids): build the model with attention='segments'")
        elif self.readout == "cosine":
            raise ModelConfigError("readout='cosine' is invalid with attention='pair': expected attention='segments' "
                                   "(the cosine of two segments that see each other is not the bi-encoder's)")

    # ------------------------------------------------------------------------------------------------ helpers
    def pair_layout(self) -> PairLayout:
        try:
            return PairLayout.from_dict(self.layout)
        except (TypeError, ValueError) as exc:
            raise ModelConfigError(f"layout is invalid: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("exits", "compress_layers", "compress_ratios"):
            data[key] = list(data[key])
        data["inference_compression"] = (self.inference_compression.to_dict()
                                         if self.inference_compression is not None else None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> RerankerConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataFormatError(source, None, f"unknown fields {unknown}",
                                  f"expected a subset of {sorted(known)}; was it written by a newer version?")
        if data.get("config_version", CONFIG_VERSION) != CONFIG_VERSION:
            raise DataFormatError(source, None, f"config_version={data.get('config_version')!r}",
                                  f"this version reads config_version {CONFIG_VERSION}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise DataFormatError(source, None, f"bad or missing fields: {exc}",
                                  "re-save the model with LayerwiseReranker.save") from None

    def save(self, folder: str | os.PathLike[str]) -> Path:
        return write_json_object(Path(folder) / CONFIG_FILE, self.to_dict())

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> RerankerConfig:
        from matryoshka.errors import MissingInputError

        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise MissingInputError(path, "model configuration",
                                    f"expected a folder written by LayerwiseReranker.save, with {CONFIG_FILE}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataFormatError(path, None, f"not valid JSON ({exc})", "re-save the model") from None
        if not isinstance(data, dict):
            raise DataFormatError(path, None, "expected a JSON object", "re-save the model")
        return cls.from_dict(data, source=str(path))
