"""``torch.onnx.export`` of one graph (a stage or the full graph), with the settings that work on this stack.

- ``dynamo=False`` (the TorchScript exporter): its graphs fuse under onnxruntime's transformer optimizer and
  quantize with ``quantize_dynamic``; the dynamo graphs did neither on this stack.
- the backbone runs with ``attn_implementation="eager"`` (set when the model is loaded for export);
- inputs are positional tensors in the declared order, mapped to keyword arguments by
  :class:`~matryoshka.export.reference.GraphModule` (transformers 5 changed positional argument orders);
- every input/output and dynamic axis comes from the :class:`~matryoshka.export.spec.GraphSpec`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from matryoshka.export.reference import Batch, GraphModule, to_tensors
from matryoshka.export.spec import GraphSpec
from matryoshka.export.variants import finalize_graph, save
from matryoshka.training.modeling import LayerwiseReranker

logger = logging.getLogger(__name__)

MIN_OPSET = 17


def max_opset() -> int:
    """The highest opset the TorchScript exporter of the installed torch writes."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", MIN_OPSET))


@torch.inference_mode(False)
def export_graph(model: LayerwiseReranker, spec: GraphSpec, sample: Batch, path: Path, opset: int) -> Path:
    """Export ``spec`` of ``model`` traced on ``sample`` to ``path`` (float32), with the declared interface."""
    module = GraphModule(model, spec).eval()
    args = to_tensors(spec, sample)
    raw = path.with_suffix(".raw.onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python values; validation at other shapes decides
        torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), external_data=False)
    try:
        model_proto = finalize_graph(onnx.load(str(raw)), spec)
        save(model_proto, path)
    finally:
        raw.unlink(missing_ok=True)
    logger.debug("exported %s (layers %d-%d) to %s", spec.name, spec.start, spec.end, path)
    return path
