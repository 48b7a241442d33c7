"""The token layout of a (query, passage) pair: one definition, used by training, export and the plugin.

A pair is three segments, so that token compression (pooling passage tokens by a ratio) is a static reshape:

    segment A  (fixed length ``query_length``)  prefix + query tokens + query_suffix, right-padded
    segment B  (length P, a multiple of ``passage_multiple``)  passage_prefix + passage tokens + passage_suffix, padded
    segment C  (fixed length ``len(suffix_ids)``)  suffix (decoders: the instruction; its last token is scored)

Encoder (BERT-like): A = ``[CLS] query [SEP]``, B = ``passage [SEP]``, C empty; token types 0 for A, 1 for B and C;
the score is read at position 0 ([CLS]).
Decoder (Llama-like): A = ``<bos>? "A: " query``, B = ``"\\nB: " passage``, C = ``"\\nPredict whether passage B
contains an answer to query A."``; the score is read at the last position (always a real token); position ids are
``cumsum(mask) - 1`` so padding in the middle does not shift positions.

P is the smallest multiple of ``passage_multiple`` that holds the longest passage segment of the batch, capped so
that the whole pair fits ``max_length``. Only numpy and ``tokenizers`` are needed (the plugin runtime uses this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from matryoshka.errors import ModelConfigError

Family = Literal["encoder", "decoder"]
#: segment-encoded (cosine readout) models: which query embedding an early exit scores a passage against, the
#: query's at that same exit ("same") or at the final exit ("final"; a query is encoded once per call and a passage
#: once per candidate, so the final query costs next to nothing). Read by the model config and the manifest.
QUERY_EXITS = ("same", "final")
DECODER_QUERY_PREFIX = "A: "
DECODER_PASSAGE_PREFIX = "\nB: "
DECODER_PROMPT = "\nPredict whether passage B contains an answer to query A."


@dataclass(frozen=True)
class PairLayout:
    family: Family
    max_length: int
    query_length: int
    passage_multiple: int
    pad_id: int
    prefix_ids: tuple[int, ...] = ()
    query_suffix_ids: tuple[int, ...] = ()
    passage_prefix_ids: tuple[int, ...] = ()
    passage_suffix_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()
    template: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in ("encoder", "decoder"):
            raise ValueError(f"family must be 'encoder' or 'decoder', got {self.family!r}")
        if self.passage_multiple < 1:
            raise ValueError(f"passage_multiple must be >= 1, got {self.passage_multiple}")
        if self.query_length <= len(self.prefix_ids) + len(self.query_suffix_ids):
            raise ValueError(f"query_length={self.query_length} leaves no room for query tokens")
        if self.family == "decoder" and not self.suffix_ids:
            raise ValueError("a decoder layout needs suffix_ids (the scored prompt)")
        if self.passage_budget < 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for passage tokens")

    # ------------------------------------------------------------------------------------------------ geometry
    @property
    def query_budget(self) -> int:
        return self.query_length - len(self.prefix_ids) - len(self.query_suffix_ids)

    @property
    def max_passage_segment(self) -> int:
        """The largest P: a multiple of ``passage_multiple`` with A + P + C <= max_length."""
        room = self.max_length - self.query_length - len(self.suffix_ids)
        return (room // self.passage_multiple) * self.passage_multiple

    @property
    def passage_budget(self) -> int:
        return self.max_passage_segment - len(self.passage_prefix_ids) - len(self.passage_suffix_ids)

    @property
    def suffix_length(self) -> int:
        return len(self.suffix_ids)

    # ------------------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairLayout:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown layout fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)

    # ------------------------------------------------------------------------------------------------ encode
    def assemble(self, query_ids: Sequence[Sequence[int]], passage_ids: Sequence[Sequence[int]]
                 ) -> dict[str, np.ndarray]:
        """Build padded model inputs from token ids (without special tokens). Truncates queries and passages.

        Returns int64 arrays ``input_ids``, ``attention_mask``, ``token_type_ids`` and (decoders) ``position_ids``,
        all of shape [batch, query_length + P + suffix_length].
        """
        if len(query_ids) != len(passage_ids):
            raise ValueError(f"got {len(query_ids)} queries but {len(passage_ids)} passages")
        if not query_ids:
            raise ValueError("cannot assemble an empty batch")
        n = len(query_ids)
        segments_b = [self.passage_segment(p) for p in passage_ids]
        longest = max(len(s) for s in segments_b)
        p_len = min(-(-longest // self.passage_multiple) * self.passage_multiple, self.max_passage_segment)
        total = self.query_length + p_len + self.suffix_length
        ids = np.full((n, total), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, total), dtype=np.int64)
        types = np.zeros((n, total), dtype=np.int64)
        types[:, self.query_length:] = 1
        for row, (q, seg_b) in enumerate(zip(query_ids, segments_b, strict=True)):
            seg_a = self.query_segment(q)
            ids[row, : len(seg_a)] = seg_a
            mask[row, : len(seg_a)] = 1
            start = self.query_length
            ids[row, start: start + len(seg_b)] = seg_b
            mask[row, start: start + len(seg_b)] = 1
            if self.suffix_length:
                ids[row, total - self.suffix_length:] = self.suffix_ids
                mask[row, total - self.suffix_length:] = 1
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if self.family == "decoder":
            out["position_ids"] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        return out

    def query_segment(self, query_ids: Sequence[int]) -> list[int]:
        """Segment A without its padding: prefix + the query cut to :attr:`query_budget` + query suffix."""
        return list(self.prefix_ids) + list(query_ids[: self.query_budget]) + list(self.query_suffix_ids)

    def passage_segment(self, passage_ids: Sequence[int]) -> list[int]:
        """Segment B without its padding: passage prefix + the passage cut to :attr:`passage_budget` + suffix."""
        return (list(self.passage_prefix_ids) + list(passage_ids[: self.passage_budget])
                + list(self.passage_suffix_ids))

    def assemble_segments(self, segments: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """One segment per row (from :meth:`query_segment` / :meth:`passage_segment`), right-padded to the longest:
        int64 ``input_ids`` and ``attention_mask`` ``[batch, longest]``. The input of a model whose segments are
        encoded apart (attention ``"segments"``), where a segment alone gives the states it has inside a pair."""
        if not segments:
            raise ValueError("cannot assemble an empty batch")
        longest = max(len(s) for s in segments)
        ids = np.full((len(segments), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(segments), longest), dtype=np.int64)
        for row, seg in enumerate(segments):
            ids[row, : len(seg)] = seg
            mask[row, : len(seg)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, tokenizer: Any, queries: Sequence[str], passages: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenize with a ``tokenizers.Tokenizer`` (no special tokens; truncation here) and :meth:`assemble`."""
        q_enc = tokenizer.encode_batch(list(queries), add_special_tokens=False)
        p_enc = tokenizer.encode_batch(list(passages), add_special_tokens=False)
        return self.assemble([e.ids for e in q_enc], [e.ids for e in p_enc])


@dataclass(frozen=True)
class Compression:
    """Pool passage segment B by ``ratio`` right after (1-based) layer ``layer``: the one definition used by the
    training config, the export and the manifest (``{"layer": l, "ratio": r}`` in both files)."""

    layer: int
    ratio: int

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ModelConfigError(f"compression layer={self.layer!r} is invalid: expected an integer >= 1")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int) or self.ratio < 2:
            raise ModelConfigError(f"compression ratio={self.ratio!r} is invalid: expected an integer >= 2 "
                                   "(a ratio of 1 means no compression: pass None instead)")

    def to_dict(self) -> dict[str, int]:
        return {"layer": self.layer, "ratio": self.ratio}

    @classmethod
    def from_value(cls, value: Compression | dict[str, Any] | None) -> Compression | None:
        if value is None or isinstance(value, Compression):
            return value
        if not isinstance(value, dict) or set(value) != {"layer", "ratio"}:
            raise ModelConfigError(f"inference_compression={value!r} is invalid: expected "
                                   "{'layer': <int>, 'ratio': <int>} or null")
        return cls(layer=value["layer"], ratio=value["ratio"])


def lcm_of(values: Sequence[int]) -> int:
    result = 1
    for v in values:
        result = int(np.lcm(result, int(v)))
    return result


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Switch off the truncation/padding a ``tokenizer.json`` may carry: the layout does both itself."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def encoder_layout(tokenizer: Any, max_length: int, query_length: int, passage_multiple: int = 1) -> PairLayout:
    """An encoder layout from a BERT/MPNet/XLM-R ``tokenizers.Tokenizer`` (special tokens looked up by name)."""
    def token_id(*names: str) -> int:
        for name in names:
            tid = tokenizer.token_to_id(name)
            if tid is not None:
                return int(tid)
        raise ValueError(f"tokenizer has none of the tokens {names}")

    cls_id = token_id("[CLS]", "<s>")
    sep_id = token_id("[SEP]", "</s>")
    pad_id = token_id("[PAD]", "<pad>")
    return PairLayout("encoder", max_length, query_length, passage_multiple, pad_id,
                      prefix_ids=(cls_id,), query_suffix_ids=(sep_id,), passage_suffix_ids=(sep_id,))


def decoder_layout(tokenizer: Any, max_length: int, query_length: int, passage_multiple: int = 1,
                   bos_id: int | None = None, pad_id: int | None = None) -> PairLayout:
    """A decoder layout with the decoder prompt (:data:`DECODER_QUERY_PREFIX`, :data:`DECODER_PASSAGE_PREFIX`,
    :data:`DECODER_PROMPT`: "A: {query}" / "B: {passage}" / "Predict whether ...")."""
    enc = tokenizer.encode
    prefix = ((bos_id,) if bos_id is not None else ()) + tuple(enc(DECODER_QUERY_PREFIX, add_special_tokens=False).ids)
    passage_prefix = tuple(enc(DECODER_PASSAGE_PREFIX, add_special_tokens=False).ids)
    suffix = tuple(enc(DECODER_PROMPT, add_special_tokens=False).ids)
    pad = pad_id if pad_id is not None else (bos_id if bos_id is not None else 0)
    return PairLayout("decoder", max_length, query_length, passage_multiple, int(pad),
                      prefix_ids=prefix, passage_prefix_ids=passage_prefix, suffix_ids=suffix,
                      template={"query": DECODER_QUERY_PREFIX + "{query}",
                                "passage": DECODER_PASSAGE_PREFIX + "{passage}", "prompt": DECODER_PROMPT})
