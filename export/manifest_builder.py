"""``manifest.json`` of an exported folder, written through the plugin's schema (``matryoshka.plugin.manifest``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace

from matryoshka.export.cost import ModelDims, relative_costs
from matryoshka.export.spec import GraphSpec
from matryoshka.export.validate import FileReport
from matryoshka.plugin.manifest import (
    Calibration,
    Compression,
    ExitCalibration,
    FileSpec,
    FullGraphSpec,
    Manifest,
    ModelInfo,
    PolicySpec,
    Producer,
    StageSpec,
    TokenizerSpec,
    sha256_file,
    write_manifest,
)
from matryoshka.training.config import TOKENIZER_FILE
from matryoshka.training.modeling import LayerwiseReranker

logger = logging.getLogger(__name__)

#: the precision the plugin runs by default, in order of preference among those exported
DEFAULT_PRECISION_ORDER = ("int8", "fp32")


def producer() -> Producer:
    import onnx
    import onnxruntime
    import torch
    import transformers

    import matryoshka

    return Producer(version=matryoshka.__version__, torch=torch.__version__, transformers=transformers.__version__,
                    onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)


def calibration(model: LayerwiseReranker) -> Calibration:
    """Per exit: the compensation's affine scale and bias (baked into each stage's score) and, when the checkpoint
    measured it, the residual std of the compensated score against the final exit."""
    recorded = (model.config.compensation or {}).get("per_exit", {})
    per_exit = {}
    for exit_layer in model.config.exits:
        module = model.compensation[str(exit_layer)]
        residual = recorded.get(str(exit_layer), {}).get("residual_std")
        per_exit[int(exit_layer)] = ExitCalibration(float(module.scale.detach()), float(module.bias.detach()),
                                                    float(residual) if residual is not None else 0.0)
    return Calibration("affine", True, per_exit)


def _files(folder: Path, spec: GraphSpec, reports: Mapping[str, Sequence[FileReport]]) -> dict[str, FileSpec]:
    files = {}
    for precision, reps in reports.items():
        (rep,) = [r for r in reps if r.graph == spec.name]
        files[precision] = FileSpec.from_file(folder, spec.file(precision), rep.validated_atol)
    return files


def build_manifest(folder: Path, model: LayerwiseReranker, checkpoint: Path, stages: Sequence[GraphSpec],
                   full: GraphSpec | None, reports: Mapping[str, Sequence[FileReport]], name: str | None,
                   base_model_id: str | None = None, encoding: str = "pair",
                   default_precision: str | None = None) -> Manifest:
    """Describe every file in ``folder`` (hashes, validated tolerances) and write ``folder/manifest.json``."""
    config = model.config
    layout = config.pair_layout()
    dims = ModelDims.from_hf_config(SimpleNamespace(**config.backbone_config))
    compression = config.inference_compression
    costs = relative_costs(config.exits, layout, dims, None if compression is None else compression.to_dict())
    stage_entries = []
    for spec, cost in zip(stages, costs, strict=True):
        comp = Compression(spec.compression["layer"], spec.compression["ratio"]) if spec.compression else None
        stage_entries.append(StageSpec(spec.index, (spec.start, spec.end), spec.exit_layer, tuple(spec.input_names),
                                       tuple(spec.output_names), _files(folder, spec, reports), comp, round(cost, 6)))
    full_entry = None
    if full is not None:
        full_entry = FullGraphSpec((full.start, full.end), tuple(full.input_names), tuple(full.output_names),
                                   _files(folder, full, reports))
    default = default_precision or next((p for p in DEFAULT_PRECISION_ORDER if p in reports), next(iter(reports)))
    manifest = Manifest(
        producer=producer(),
        model=ModelInfo(name or checkpoint.name, config.family, base_model_id or config.base_model, config.num_layers,
                        config.hidden_size),
        tokenizer=TokenizerSpec(TOKENIZER_FILE, sha256_file(folder / TOKENIZER_FILE)),
        layout=layout.to_dict(),
        exits=tuple(config.exits),
        default_precision=default,
        stages=tuple(stage_entries),
        calibration=calibration(model),
        policy=PolicySpec(),
        full_graph=full_entry,
        encoding=encoding,
        query_exit=config.query_exit,
    )
    path = write_manifest(folder, manifest)
    logger.info("wrote %s (%d stages, precisions %s, default %s)", path, len(stage_entries), list(reports), default)
    return manifest
