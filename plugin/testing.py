"""TEST FIXTURE, not a model: a synthetic exported-model folder that follows the ONNX stage contract exactly.

The runtime tests need stage graphs before (and independently of) the real export. :func:`build_synthetic_model`
writes, with ``onnx.helper`` (``onnx`` is needed here, never by the runtime), a folder with ``manifest.json``,
``tokenizer.json`` (a word-level tokenizer fitted on the given texts) and one ``fp32/stage_k.onnx`` per exit. Each
"layer" is a small random mixing step (``h = (h + 0.5 * tanh((h + masked_mean(h)) @ W)) * mask``), each exit head
``score = a_k * (h[:, 0] @ v_k) + b_k``, and an optional token compression pools passage segment B by a ratio
(mask-weighted mean, the compressed mask is the max, the position id the first of each group), which shrinks the
sequence axis between stages as the real compression does. Inputs, outputs, dtypes and dynamic axes are those of
the contract in ARCHITECTURE.md. Scores mean nothing: use it to test plumbing, never quality.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from matryoshka.layout import PairLayout
from matryoshka.plugin.manifest import (
    FIRST_STAGE_INPUTS,
    STAGE_OUTPUTS,
    STATE_INPUTS,
    Calibration,
    Compression,
    ExitCalibration,
    FileSpec,
    Manifest,
    ModelInfo,
    PolicySpec,
    Producer,
    StageSpec,
    TokenizerSpec,
    sha256_file,
    write_manifest,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
OPSET, IR_VERSION = 17, 8


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                                   show_progress=False))
    return tok


class _Graph:
    def __init__(self, prefix: str) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.prefix, self.count = prefix, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, output: str | None = None,
           **attrs: object) -> str:
        out = output or self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def _layer(g: _Graph, h: str, mask3: str, weight: np.ndarray) -> str:
    summed = g.op("ReduceSum", [g.op("Mul", [h, mask3]), g.const(np.array([1], np.int64))], keepdims=1)
    count = g.op("Max", [g.op("ReduceSum", [mask3, g.const(np.array([1], np.int64))], keepdims=1),
                         g.const(np.array(1.0, np.float32))])
    mixed = g.op("Tanh", [g.op("MatMul", [g.op("Add", [h, g.op("Div", [summed, count])]), g.const(weight, "w")])])
    updated = g.op("Add", [h, g.op("Mul", [mixed, g.const(np.array(0.5, np.float32))])])
    return g.op("Mul", [updated, mask3])


def _compress(g: _Graph, h: str, mask: str, pos: str, query_length: int, ratio: int, hidden: int
              ) -> tuple[str, str, str]:
    def split(x: str) -> tuple[str, str]:
        axes = g.const(np.array([1], np.int64))
        a = g.op("Slice", [x, g.const(np.array([0], np.int64)), g.const(np.array([query_length], np.int64)), axes])
        b = g.op("Slice", [x, g.const(np.array([query_length], np.int64)),
                           g.const(np.array([np.iinfo(np.int64).max], np.int64)), axes])
        return a, b

    (h_a, h_b), (m_a, m_b), (p_a, p_b) = split(h), split(mask), split(pos)
    grouped = g.const(np.array([0, -1, ratio], np.int64))
    m_groups = g.op("Reshape", [m_b, grouped])                                        # [B, P/r, r]
    m_f = g.op("Unsqueeze", [g.op("Cast", [m_groups], to=TensorProto.FLOAT), g.const(np.array([3], np.int64))])
    h_groups = g.op("Reshape", [h_b, g.const(np.array([0, -1, ratio, hidden], np.int64))])
    h_sum = g.op("ReduceSum", [g.op("Mul", [h_groups, m_f]), g.const(np.array([2], np.int64))], keepdims=0)
    n = g.op("Max", [g.op("ReduceSum", [m_f, g.const(np.array([2], np.int64))], keepdims=0),
                     g.const(np.array(1.0, np.float32))])
    h_new = g.op("Concat", [h_a, g.op("Div", [h_sum, n])], axis=1)
    m_new = g.op("Concat", [m_a, g.op("ReduceMax", [m_groups], axes=[2], keepdims=0)], axis=1)
    p_first = g.op("Squeeze", [g.op("Slice", [g.op("Reshape", [p_b, grouped]), g.const(np.array([0], np.int64)),
                                              g.const(np.array([1], np.int64)), g.const(np.array([2], np.int64))]),
                               g.const(np.array([2], np.int64))])
    p_new = g.op("Concat", [p_a, p_first], axis=1)
    return h_new, m_new, p_new


def _stage_model(k: int, rng: np.random.Generator, vocab: int, hidden: int, max_length: int, layers: range,
                 query_length: int, compression: Compression | None, scale: float, bias: float,
                 embeddings: dict[str, np.ndarray]) -> onnx.ModelProto:
    g = _Graph(f"s{k}_")
    int_in = ["batch", "sequence"]
    if k == 0:
        inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, int_in) for n in FIRST_STAGE_INPUTS]
        h = g.op("Add", [g.op("Gather", [g.const(embeddings["word"], "E"), "input_ids"]),
                         g.op("Gather", [g.const(embeddings["type"], "T"), "token_type_ids"])])
        clipped = g.op("Clip", ["position_ids", g.const(np.array(0, np.int64)),
                                g.const(np.array(max_length - 1, np.int64))])
        h = g.op("Add", [h, g.op("Gather", [g.const(embeddings["position"], "P"), clipped])])
    else:
        inputs = [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [*int_in, hidden])]
        inputs += [helper.make_tensor_value_info(n, TensorProto.INT64, int_in) for n in STATE_INPUTS[1:]]
        h = "hidden_states"
    mask, pos = "attention_mask", "position_ids"
    for layer in layers:
        mask3 = g.op("Unsqueeze", [g.op("Cast", [mask], to=TensorProto.FLOAT), g.const(np.array([2], np.int64))])
        h = _layer(g, h, mask3, rng.normal(0.0, 1.0 / np.sqrt(hidden), (hidden, hidden)).astype(np.float32))
        if compression is not None and compression.layer == layer + 1:
            h, mask, pos = _compress(g, h, mask, pos, query_length, compression.ratio, hidden)
    cls = g.op("Gather", [h, g.const(np.array(0, np.int64))], axis=1)
    head = rng.normal(0.0, 1.0 / np.sqrt(hidden), (hidden, 1)).astype(np.float32)
    raw = g.op("Reshape", [g.op("MatMul", [cls, g.const(head, "v")]), g.const(np.array([-1], np.int64))])
    g.op("Add", [g.op("Mul", [raw, g.const(np.array(scale, np.float32))]), g.const(np.array(bias, np.float32))],
         output="score")
    g.op("Identity", [h], output="hidden_states_out")
    g.op("Identity", [mask], output="attention_mask_out")
    g.op("Identity", [pos], output="position_ids_out")
    outputs = [helper.make_tensor_value_info("hidden_states_out", TensorProto.FLOAT, ["batch", "sequence_out", hidden]),
               helper.make_tensor_value_info("attention_mask_out", TensorProto.INT64, ["batch", "sequence_out"]),
               helper.make_tensor_value_info("position_ids_out", TensorProto.INT64, ["batch", "sequence_out"]),
               helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])]
    assert tuple(o.name for o in outputs) == STAGE_OUTPUTS
    graph = helper.make_graph(g.nodes, f"synthetic_stage_{k + 1}", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="synthetic")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_synthetic_model(folder: str | os.PathLike[str], texts: Iterable[str], exits: Sequence[int] = (2, 4, 6),
                          hidden: int = 16, max_length: int = 128, query_length: int = 24,
                          compression: tuple[int, int] | None = None, scale: float = 3.0, seed: int = 0,
                          residual_std: float = 0.5, threshold: float = 0.9) -> Path:
    """Write a synthetic model folder (TEST FIXTURE) and return its path. ``compression=(layer, ratio)``."""
    root = Path(folder)
    (root / "fp32").mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts)
    tokenizer.save(str(root / "tokenizer.json"))
    ids = {name: tokenizer.token_to_id(name) for name in SPECIALS}
    ratio = compression[1] if compression else 1
    layout = PairLayout("encoder", max_length, query_length, ratio, ids["[PAD]"], prefix_ids=(ids["[CLS]"],),
                        query_suffix_ids=(ids["[SEP]"],), passage_suffix_ids=(ids["[SEP]"],))
    comp = Compression(*compression) if compression else None
    rng = np.random.default_rng(seed)
    vocab = tokenizer.get_vocab_size()
    embeddings = {"word": rng.normal(0, 1, (vocab, hidden)).astype(np.float32),
                  "type": rng.normal(0, 1, (2, hidden)).astype(np.float32),
                  "position": rng.normal(0, 0.1, (max_length, hidden)).astype(np.float32)}
    stages, per_exit = [], {}
    for k, exit_layer in enumerate(exits):
        start = exits[k - 1] if k else 0
        stage_comp = comp if comp and start < comp.layer <= exit_layer else None
        bias = float(rng.normal(0, 0.5))
        model = _stage_model(k, rng, vocab, hidden, max_length, range(start, exit_layer), query_length, stage_comp,
                             scale, bias, embeddings)
        rel = f"fp32/stage_{k + 1}.onnx"
        onnx.save(model, root / rel)
        stages.append(StageSpec(k, (start, exit_layer), exit_layer, FIRST_STAGE_INPUTS if k == 0 else STATE_INPUTS,
                                STAGE_OUTPUTS, {"fp32": FileSpec.from_file(root, rel, 0.0)}, stage_comp,
                                round((exit_layer - start) / exits[-1], 6)))
        per_exit[exit_layer] = ExitCalibration(scale, bias, residual_std if k < len(exits) - 1 else 0.0)
    manifest = Manifest(Producer(version="synthetic-test-fixture", onnx=onnx.__version__),
                        ModelInfo("synthetic-test-fixture", "encoder", "none (random)", exits[-1], hidden),
                        TokenizerSpec("tokenizer.json", sha256_file(root / "tokenizer.json")), layout.to_dict(),
                        tuple(exits), "fp32", tuple(stages), Calibration("affine", True, per_exit),
                        PolicySpec("candidate", threshold, None))
    write_manifest(root, manifest)
    return root
