"""The bi-encoder's settings and the ``dense_config.json`` sidecar of a saved dense model folder.

A saved dense model is a plain Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer files) that
``transformers.AutoModel`` and Pyserini load directly, plus ``dense_config.json``: pooling, L2 normalisation, the
query/passage prefixes (instructions), the maximum lengths, the training temperature and the package versions, and
``passage_encoder``: ``""`` when queries and passages share the weights, ``"passage_encoder"`` when the model was
trained in ``corpus`` mode (query-side fine-tuning) and its frozen passage encoder is that subfolder.

Text formatting follows the Pyserini encoder class each pooling maps to, so the texts a model is trained on are the
texts Pyserini encodes at search time:

- ``mean`` / ``cls`` -> ``--encoder-class auto --pooling mean|cls`` (``AutoQueryEncoder`` / ``AutoDocumentEncoder``):
  a prefix is joined with one space (``f"{prefix} {text}"``);
- ``last`` -> ``--encoder-class qwen3`` (last-token pooling, left padding): the prefix is glued on
  (``f"{prefix}{text}"``), e.g. ``"Instruct: ...\\nQuery: "``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from matryoshka.checks import is_int
from matryoshka.errors import DataFormatError, MatryoshkaError, MissingInputError
from matryoshka.io.jsonfile import read_json_object, write_json_object

DENSE_CONFIG_FILE = "dense_config.json"
#: subfolder of a dense model that holds its frozen passage encoder (``corpus`` mode), a plain Hugging Face folder
PASSAGE_ENCODER_DIR = "passage_encoder"
SCHEMA_VERSION = 1


class DenseConfigError(MatryoshkaError, ValueError):
    """A dense model setting that cannot be used."""


class Pooling(StrEnum):
    """How token states become one vector: the last real token (decoders), the masked mean or [CLS] (encoders)."""

    LAST = "last"
    MEAN = "mean"
    CLS = "cls"


class TrainingMode(StrEnum):
    """The seed's two modes: ``normal`` scores each query against every passage of the batch (in-batch and, with
    cross-device negatives, every rank's passages); ``custom`` scores a query against its own group only.

    ``corpus`` is query-side fine-tuning: the passage encoder stays frozen (saved in the model's
    ``passage_encoder/`` subfolder) and each query is scored against every document vector of a Faiss index made with
    it (a softmax over the whole corpus, the graded positives as the target)."""

    NORMAL = "normal"
    CUSTOM = "custom"
    CORPUS = "corpus"


def parse_enum(enum: type[Enum], name: str, value: Any) -> Any:
    """``enum(value)`` with a one-line error naming the option and the allowed values."""
    if isinstance(value, enum):
        return value
    try:
        return enum(value)
    except ValueError:
        raise DenseConfigError(f"{name}={value!r} is invalid: expected one of "
                               f"{[m.value for m in enum]}") from None


def format_text(prefix: str, text: str, pooling: Pooling) -> str:
    """The text as the matching Pyserini encoder class builds it (see the module docstring)."""
    text = text.strip()
    if not prefix:
        return text
    return f"{prefix}{text}" if pooling is Pooling.LAST else f"{prefix} {text}"


@dataclass
class DenseConfig:
    """Everything besides the weights that encoding with a trained bi-encoder needs."""

    pooling: Pooling
    normalize: bool
    query_prefix: str = ""
    passage_prefix: str = ""
    query_max_length: int = 64
    passage_max_length: int = 256
    temperature: float = 1.0
    mode: TrainingMode = TrainingMode.NORMAL
    model_type: str = ""
    base_model: str = ""
    hidden_size: int = 0
    passage_encoder: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.pooling = parse_enum(Pooling, "pooling", self.pooling)
        self.mode = parse_enum(TrainingMode, "mode", self.mode)
        for name in ("query_max_length", "passage_max_length"):
            value = getattr(self, name)
            if not is_int(value, 2):
                raise DenseConfigError(f"{name}={value!r} is invalid: expected an integer >= 2 (tokens)")
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            raise DenseConfigError(f"temperature={self.temperature!r} is invalid: expected a number > 0")
        if not isinstance(self.query_prefix, str) or not isinstance(self.passage_prefix, str):
            raise DenseConfigError("query_prefix and passage_prefix must be strings (use '' for none)")
        if self.passage_encoder not in ("", PASSAGE_ENCODER_DIR):
            raise DenseConfigError(f"passage_encoder={self.passage_encoder!r} is invalid: expected '' (queries and "
                                   f"passages share the weights) or {PASSAGE_ENCODER_DIR!r} (a frozen passage encoder "
                                   "in that subfolder)")

    @property
    def compensation(self) -> None:
        """Bi-encoders have no per-exit score compensation (the shared trainer records this in its summary)."""
        return None

    def passage_folder(self, folder: str | os.PathLike[str]) -> Path:
        """The folder that encodes passages for the dense model saved in ``folder``: itself, or its frozen passage
        encoder's subfolder (which must hold a model)."""
        if not self.passage_encoder:
            return Path(folder)
        sub = Path(folder) / self.passage_encoder
        if not (sub / "config.json").is_file():
            raise MissingInputError(sub / "config.json", "frozen passage encoder",
                                    "the model was trained in corpus mode: copy its whole folder, subfolders included")
        return sub

    @property
    def pyserini_encoder_class(self) -> str:
        return "qwen3" if self.pooling is Pooling.LAST else "auto"

    def query_text(self, text: str) -> str:
        return format_text(self.query_prefix, text, self.pooling)

    def passage_text(self, text: str) -> str:
        return format_text(self.passage_prefix, text, self.pooling)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["pooling"], data["mode"] = self.pooling.value, self.mode.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> DenseConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataFormatError(source, None, f"unknown keys {unknown}", f"expected a subset of {sorted(known)}")
        if "pooling" not in data or "normalize" not in data:
            raise DataFormatError(source, None, "missing 'pooling' or 'normalize'", "re-save the dense model")
        if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise DataFormatError(source, None, f"schema_version {data.get('schema_version')!r} is not supported",
                                  f"expected {SCHEMA_VERSION}")
        try:
            return cls(**data)
        except DenseConfigError as err:
            raise DataFormatError(source, None, str(err)) from None

    def save(self, folder: str | os.PathLike[str]) -> Path:
        return write_json_object(Path(folder) / DENSE_CONFIG_FILE, self.to_dict())

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> DenseConfig:
        path = Path(folder) / DENSE_CONFIG_FILE
        data = read_json_object(path, "dense model config",
                                "expected a folder saved by `python -m matryoshka.training.dense`")
        return cls.from_dict(data, str(path))

    @classmethod
    def exists(cls, folder: str | os.PathLike[str]) -> bool:
        return (Path(folder) / DENSE_CONFIG_FILE).is_file()
