"""The Pyserini flags that encode exactly as a dense model folder was trained to (pooling, normalisation, prefixes).

Pyserini 1.6 loads a local folder with these query/document encoder classes:

| pooling | search (``pyserini.search.faiss`` / hybrid ``dense``) | corpus (``pyserini.encode encoder``) |
|---|---|---|
| mean | ``--encoder-class auto --pooling mean [--l2-norm]`` | ``--encoder-class auto --pooling mean [--l2-norm]`` |
| cls | ``--encoder-class auto --pooling cls [--l2-norm]`` | ``--encoder-class auto --pooling cls [--l2-norm]`` |
| last | ``--encoder-class qwen3 [--l2-norm]`` (left padding, last token) | ``--encoder-class qwen3 [--l2-norm]`` |

(``auto`` ignores ``--pooling last``: it would silently take position 0, hence ``qwen3`` for last-token pooling.)

Traps handled here: Pyserini also picks settings from words in the model *path* (``sentence`` forces mean + L2,
``contriever`` mean without L2, ``clip``/``dse`` force L2 and crash the ``auto`` document encoder), so a path that
would change the settings is refused; and its ``qwen3`` document encoder prepends the string ``"None"`` to every
text when no ``--prefix`` is given, so an empty ``--prefix`` is always passed for it.

A model trained in ``corpus`` mode (query-side fine-tuning) searches with its own folder and encodes the corpus with
its frozen passage encoder (``<model>/passage_encoder``, :attr:`EncodingSpec.passage_dir`).

Hybrid search (``pyserini.search.hybrid``) scores ``alpha * BM25 + dense`` over the top hits of each. Its
``--normalization`` option divides by ``max - min`` of each hit list and crashes (ZeroDivisionError) on any query
for which BM25 returns a single hit (13 NFCorpus test queries), so it is off by default here. The best ``alpha``
depends on the dense model and on the collection's BM25 score scale: on NFCorpus dev, 0.08 for all-MiniLM-L6-v2 and
0.02 for its query-side fine-tune (``benchmarks/dense_pipeline.py`` picks it per model); 0.08 is the default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from matryoshka.errors import DataFormatError, MissingInputError, OptionError
from matryoshka.training.dense.config import DenseConfig, Pooling, parse_enum

PathLike = str | os.PathLike[str]
# word in the model path -> (pooling Pyserini then forces, or None; L2 normalisation it forces)
PATH_TRAPS: dict[str, tuple[Pooling | None, bool]] = {
    "sentence": (Pooling.MEAN, True), "contriever": (Pooling.MEAN, False), "clip": (None, True), "dse": (None, True)}


@dataclass(frozen=True)
class EncodingSpec:
    """How a model folder encodes (from its ``dense_config.json``, or given for a plain Hugging Face folder)."""

    model_dir: Path
    pooling: Pooling
    normalize: bool
    query_prefix: str
    passage_prefix: str
    query_max_length: int
    passage_max_length: int
    dimension: int
    passage_dir: Path | None = None  # the folder that encodes the corpus, when not model_dir (corpus mode)

    @classmethod
    def from_folder(cls, model_dir: PathLike, pooling: Pooling | str | None = None, normalize: bool = False,
                    query_prefix: str | None = None, passage_prefix: str | None = None,
                    passage_max_length: int = 0) -> EncodingSpec:
        """A dense model folder's own settings; for a plain folder (no ``dense_config.json``) ``pooling`` is
        required. Options that contradict a dense folder's settings are refused."""
        folder = Path(model_dir).resolve()
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise MissingInputError(config_file, "model config", "pass a local Hugging Face model folder")
        try:
            hidden = int(json.loads(config_file.read_text(encoding="utf-8"))["hidden_size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataFormatError(config_file, None, "no integer 'hidden_size'", "expected a transformer config") \
                from None
        if DenseConfig.exists(folder):
            saved = DenseConfig.load(folder)
            for name, given, own in (("pooling", pooling, saved.pooling.value),
                                     ("query_prefix", query_prefix, saved.query_prefix),
                                     ("passage_prefix", passage_prefix, saved.passage_prefix)):
                value = given.value if isinstance(given, Pooling) else given
                if value is not None and value != own:
                    raise OptionError(name, value, f"{own!r} as the model in {folder} was trained (or leave it out)")
            if normalize and not saved.normalize:
                raise OptionError("normalize", True, f"off: the model in {folder} was trained without it")
            passage_dir = saved.passage_folder(folder) if saved.passage_encoder else None
            spec = cls(folder, saved.pooling, saved.normalize, saved.query_prefix, saved.passage_prefix,
                       saved.query_max_length, passage_max_length or saved.passage_max_length, hidden, passage_dir)
        else:
            if pooling is None:
                raise OptionError("pooling", None, f"one of {[p.value for p in Pooling]}: {folder} has no "
                                  "dense_config.json to read it from")
            spec = cls(folder, parse_enum(Pooling, "pooling", pooling), bool(normalize), query_prefix or "",
                       passage_prefix or "", 64, passage_max_length or 256, hidden)
        spec.check_path()
        return spec

    @property
    def encoder_class(self) -> str:
        return "qwen3" if self.pooling is Pooling.LAST else "auto"

    def check_path(self) -> None:
        """Refuse a model path whose words would make Pyserini change (or crash) the encoding."""
        lower = str(self.model_dir).lower()
        for word, (pooling, l2) in PATH_TRAPS.items():
            if word not in lower:
                continue
            crash = word in ("clip", "dse") and self.encoder_class == "auto"
            changed = l2 != self.normalize or (pooling is not None and self.encoder_class == "auto"
                                               and pooling is not self.pooling)
            if crash or changed:
                raise OptionError("model", str(self.model_dir), f"a path without the word {word!r}: Pyserini "
                                  "picks encoder settings from it (copy or link the folder elsewhere)")

    def search_flags(self) -> list[str]:
        """Query-encoder flags for ``pyserini.search.faiss`` and the ``dense`` part of ``pyserini.search.hybrid``."""
        flags = ["--encoder-class", self.encoder_class, "--encoder", str(self.model_dir)]
        if self.encoder_class == "auto":
            flags += ["--pooling", self.pooling.value]
        else:
            flags += ["--max-length", str(self.query_max_length)]
        if self.normalize:
            flags.append("--l2-norm")
        if self.query_prefix:
            flags += ["--query-prefix", self.query_prefix]
        return flags

    def encode_flags(self, batch_size: int, device: str) -> list[str]:
        """The ``encoder`` part of ``python -m pyserini.encode``."""
        flags = ["--encoder", str(self.passage_dir or self.model_dir), "--encoder-class", self.encoder_class,
                 "--fields", "text",
                 "--batch-size", str(batch_size), "--max-length", str(self.passage_max_length),
                 "--dimension", str(self.dimension), "--device", device]
        if self.encoder_class == "auto":
            flags += ["--pooling", self.pooling.value]
            if self.passage_prefix:
                flags += ["--prefix", self.passage_prefix]
        else:
            flags += ["--prefix", self.passage_prefix]  # never omitted: Pyserini would prepend "None"
        if self.normalize:
            flags.append("--l2-norm")
        return flags


def faiss_search_args(spec: EncodingSpec, index: PathLike, topics: PathLike, output: PathLike,
                      hits: int = 1000) -> list[str]:
    """Arguments of ``python -m pyserini.search.faiss``."""
    return ["--index", str(index), "--topics", str(topics), "--output", str(output), "--hits", str(hits),
            *spec.search_flags()]


def hybrid_search_args(spec: EncodingSpec, dense_index: PathLike, lucene_index: PathLike, topics: PathLike,
                       output: PathLike, hits: int = 1000, alpha: float = 0.08, normalization: bool = False
                       ) -> list[str]:
    """Arguments of ``python -m pyserini.search.hybrid`` (Pyserini's own score fusion of dense and BM25 hits)."""
    words = ("dense", "sparse", "fusion", "run")
    values = [str(dense_index), str(lucene_index), str(topics), str(output), *spec.search_flags()]
    clash = next((v for v in values if v in words), None)
    if clash is not None:
        raise OptionError("hybrid argument", clash, f"a value other than {list(words)} (Pyserini's hybrid CLI "
                          "splits its command line at these words)")
    fusion = ["fusion", "--alpha", str(alpha), "--hits", str(hits)] + (["--normalization"] if normalization else [])
    return ["dense", "--index", str(dense_index), *spec.search_flags(), "sparse", "--index", str(lucene_index),
            *fusion, "run", "--topics", str(topics), "--output", str(output), "--hits", str(hits)]
