"""ONNX-level steps after the torch export: fix-ups every graph gets, and the derived variants (int8 dynamic
quantization for CPU, fp16 for CUDA, the onnxruntime transformer optimizer).

Every variant keeps the graph's float32/int64 inputs and outputs, so the stages of any precision chain the same way.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import onnx

from matryoshka.export.spec import GraphSpec, TensorSpec

logger = logging.getLogger(__name__)

#: onnxruntime 1.32 reads models up to this IR version (onnx 1.23 writes 14 by default)
MAX_IR_VERSION = 13
_ELEM = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT}
#: fused operators the transformer optimizer may produce (counted in the log and the report)
FUSED_OPS = ("Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization",
             "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization",
             "BiasGelu", "FastGelu", "Gelu", "RotaryEmbedding", "GroupQueryAttention")


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    dims = [a if isinstance(a, int) else None for a in spec.axes]
    info = onnx.helper.make_tensor_value_info(spec.name, _ELEM[spec.dtype], dims)
    for dim, axis in zip(info.type.tensor_type.shape.dim, spec.axes, strict=True):
        if isinstance(axis, str):
            dim.dim_param = axis
    return info


def finalize_graph(model: onnx.ModelProto, spec: GraphSpec, check: bool = True) -> onnx.ModelProto:
    """Give the graph exactly the declared inputs (in order) and outputs, and an IR version onnxruntime reads.

    ``torch.onnx.export`` drops inputs the model does not read (decoders ignore ``token_type_ids``, BERT's full graph
    ``position_ids``) and the transformer optimizer prunes them again; the stage contract keeps them, so they are
    added back as unused inputs. ``check=False`` for graphs with onnxruntime-only operators (the optimizer's fused
    ops, which the onnx checker does not know; onnxruntime loads and validates them instead).
    """
    present = {i.name: i for i in model.graph.input}
    extra = [name for name in present if name not in spec.input_names]
    if extra:
        raise RuntimeError(f"exported graph {spec.name} has undeclared inputs {extra}; declared {spec.input_names}")
    missing = [name for name in spec.input_names if name not in present]
    if missing:
        logger.debug("%s: adding unused declared inputs %s", spec.name, missing)
    ordered = [present[t.name] if t.name in present else _value_info(t) for t in spec.inputs]
    del model.graph.input[:]
    model.graph.input.extend(ordered)
    outputs = [o.name for o in model.graph.output]
    if outputs != spec.output_names:
        raise RuntimeError(f"exported graph {spec.name} has outputs {outputs}; declared {spec.output_names}")
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    _sort_nodes(model.graph)
    imported = {o.domain for o in model.opset_import}
    for domain in sorted({n.domain for n in model.graph.node} - imported - {"", "ai.onnx"}):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    if check:
        onnx.checker.check_model(model)
    return model


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Topologically sort the nodes (the fp16 converter appends its input casts at the end of the node list)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise RuntimeError(f"graph {graph.name!r} has a cycle or an undefined input near node {pending[0].name!r}")
        ready_ids = {id(n) for n in ready}
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save_model(model, str(path))
    return path


def op_counts(path: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """onnxruntime's quantizer logs every skipped tensor (INFO) and advises pre-processing (WARNING; on MiniLM it
    changed neither the int8 error nor the speed); the optimizer's shape inference warns about every shape it cannot
    decide. They log on the root and module loggers: mute WARNING and below while they run (errors still show)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


#: int8 weight scales: one per output channel, or one per tensor (the export validates both and keeps the better)
INT8_MODES = ("per-channel", "per-tensor")


def quantize_int8(src: Path, dst: Path, spec: GraphSpec, fused: bool = False, mode: str = "per-channel") -> Path:
    """Dynamic int8 quantization (uint8 activations x int8 weights: the VNNI path on x86) of the transformer MatMul
    weights and of the embedding tables (Gather: a quarter of the size; on MiniLM it moved the stage-1 hidden states
    by 0.1180 instead of 0.1167 mean abs).

    The exit heads and the compensation (Gemm, a few hundred weights that set the score directly) stay float32.
    ``mode``: see :data:`INT8_MODES`; per-channel halved MiniLM's stage-1 hidden-state error (0.054 vs 0.118 mean
    abs), but was worse on tiny random models.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if mode not in INT8_MODES:
        raise ValueError(f"int8 mode={mode!r} is invalid: expected one of {INT8_MODES}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT} if fused else None
    with _quiet_onnxruntime():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Attention", "Gather"],
                         weight_type=QuantType.QInt8, per_channel=mode == "per-channel", reduce_range=False,
                         extra_options=extra)
    return save(finalize_graph(onnx.load(str(dst)), spec, check=not fused), dst)


def convert_fp16(src: Path, dst: Path, spec: GraphSpec) -> Path:
    """fp16 weights and compute, float32 inputs/outputs (``keep_io_types``), for the CUDA execution provider."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    # Normalisations, softmax inputs and the score head stay float32 for accuracy where the converter allows.
    converted = convert_float_to_float16(model, keep_io_types=True)
    return save(finalize_graph(converted, spec), dst)


def optimize(src: Path, dst: Path, spec: GraphSpec, family: str, num_heads: int, hidden_size: int
             ) -> Counter[str]:
    """onnxruntime's transformer optimizer: layer-norm / skip-layer-norm / gelu fusions where its patterns match
    (decoders: RMSNorm as SimplifiedLayerNormalization). Returns the fused operators it produced.

    Attention and EmbedLayerNormalization fusions are switched off: the fused Attention turns the mask into
    per-row key lengths (right padding), while the pair layout pads inside the sequence (segment A). Measured on a
    MiniLM stage whose mask was rewritten to the pattern the fusion matches: scores off by 0.13 with padding inside
    the sequence (2e-7 with right padding only), and no speed gain at batch 32 x 256 (2 threads of a Xeon with
    VNNI: 0.57 s fused vs 0.55 s unfused per call).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False
    options.enable_embed_layer_norm = False
    with _quiet_onnxruntime():
        optimized = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   optimization_options=options, opt_level=0, use_gpu=False)
    model = finalize_graph(optimized.model, spec, check=False)
    save(model, dst)
    fused = Counter(n.op_type for n in model.graph.node if n.op_type in FUSED_OPS)
    logger.info("%s: fused %s (%s)", dst.name, dict(fused) or "nothing", family)
    return fused
