"""Checkpoint -> model folder: ONNX stages (+ full graph) per precision, each validated, and ``manifest.json``.

Everything is written into a temporary folder next to the output and moved in place only after every file passed
validation and the manifest re-loaded with its hashes verified (:func:`matryoshka.io.atomic_directory`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from matryoshka.errors import MatryoshkaError
from matryoshka.export.checkpoint import check_checkpoint, check_output, load_for_export
from matryoshka.export.errors import ExportError
from matryoshka.export.manifest_builder import build_manifest
from matryoshka.export.reference import (
    Batch,
    StageOutput,
    graph_inputs,
    make_batch,
    reference_outputs,
    segment_batch,
)
from matryoshka.export.spec import GraphSpec, full_graph_spec, stage_specs
from matryoshka.export.torch_export import MIN_OPSET, export_graph, max_opset
from matryoshka.export.validate import DEFAULT_CRITERIA, Criteria, FileReport, enforce, validate_precision
from matryoshka.export.variants import INT8_MODES, convert_fp16, optimize, quantize_int8
from matryoshka.io import atomic_directory
from matryoshka.layout import PairLayout
from matryoshka.plugin.manifest import STAGE_CONTRACTS, Manifest, load_manifest
from matryoshka.training.config import TOKENIZER_FILE
from matryoshka.training.modeling import LayerwiseReranker

logger = logging.getLogger(__name__)


@dataclass
class ExportOptions:
    int8: bool = False
    fp16: bool = False
    optimize: bool = False
    opset: int = MIN_OPSET
    full_graph: bool = True
    overwrite: bool = False
    name: str | None = None  # model name in the manifest (default: the checkpoint folder's name)
    base_model_id: str | None = None  # base model in the manifest (default: the checkpoint config's base_model)
    seed: int = 0
    #: int8 weight scales: "per-channel", "per-tensor", or "auto" (validate both, keep the smaller score error)
    int8_mode: str = "auto"
    #: keep only these exits of the checkpoint (None: all); see LayerwiseReranker.select_exits
    exits: tuple[int, ...] | None = None
    #: precisions written to the folder (None: all produced); fp32 is always produced and validated, since every
    #: variant derives from it, but can be left out of a shipped folder (``--only int8``)
    only: tuple[str, ...] | None = None
    #: the precision the plugin runs when none is asked for (None: int8 when shipped, else fp32); one of shipped()
    default_precision: str | None = None
    #: the stage contract: "pair" (a stage reads whole pairs) or "segments" (a stage encodes one query or passage and
    #: scores passages against the query's embedding; needs a checkpoint with attention="segments", readout="cosine")
    encoding: str = "pair"
    #: per-precision pass criteria; precisions not listed use DEFAULT_CRITERIA
    criteria: dict[str, Criteria] = field(default_factory=lambda: dict(DEFAULT_CRITERIA))

    def precisions(self) -> list[str]:
        out = ["fp32"]
        if self.optimize:
            out.append("optimized")
        if self.int8:
            out.append("int8")
            if self.optimize:
                out.append("optimized-int8")
        if self.fp16:
            out.append("fp16")
        return out


    def shipped(self) -> list[str]:
        """The precisions the output folder keeps."""
        produced = self.precisions()
        if self.only is None:
            return produced
        unknown = [p for p in self.only if p not in produced]
        if not self.only or unknown:
            raise ExportError(f"--only {' '.join(self.only)} is invalid: expected some of the precisions this export "
                              f"produces ({', '.join(produced)}); add --int8/--fp16/--optimize to produce them")
        return [p for p in produced if p in self.only]

    def check_default_precision(self) -> None:
        if self.default_precision is not None and self.default_precision not in self.shipped():
            raise ExportError(f"--default-precision {self.default_precision} is invalid: expected one of the "
                              f"precisions the folder keeps ({', '.join(self.shipped())})")

    def modes(self, precision: str) -> list[str | None]:
        """The int8 quantization modes tried for ``precision`` (``[None]`` for the other precisions)."""
        if precision not in ("int8", "optimized-int8"):
            return [None]
        if self.int8_mode == "auto":
            return list(INT8_MODES)
        if self.int8_mode not in INT8_MODES:
            raise ExportError(f"--int8-mode {self.int8_mode} is invalid: expected auto or one of "
                              f"{', '.join(INT8_MODES)}")
        return [self.int8_mode]


@dataclass
class ExportResult:
    folder: Path
    manifest: Manifest
    reports: list[FileReport]
    int8_modes: dict[str, str] = field(default_factory=dict)  # precision -> quantization mode kept


def passage_sizes(layout: PairLayout) -> list[int]:
    """The passage segment lengths ``P`` the layout allows (multiples of ``passage_multiple`` up to the maximum)."""
    m = layout.passage_multiple
    return list(range(m, layout.max_passage_segment + 1, m))


def _tokens_for(layout: PairLayout, segment: int) -> int:
    """Passage token count whose segment B (with its prefix/suffix ids) needs exactly ``segment`` positions."""
    extra = len(layout.passage_prefix_ids) + len(layout.passage_suffix_ids)
    return max(segment - extra, 1)


def sample_batches(layout: PairLayout, vocab_size: int, seed: int) -> tuple[Batch, list[Batch]]:
    """The export sample (batch 2, a middle passage size) and validation batches of other batch and sequence sizes:
    3 pairs at the largest passage size, 1 at the smallest, and 24 of mixed lengths and query overlaps (for rank
    correlations)."""
    sizes = passage_sizes(layout)
    mid, low, high = sizes[len(sizes) // 2], sizes[0], sizes[-1]
    if len(sizes) < 3:
        logger.warning("the layout allows only passage sizes %s: validation cannot vary the sequence length much",
                       sizes)
    sample = make_batch(layout, [_tokens_for(layout, mid), max(_tokens_for(layout, mid) - 3, 1)], vocab_size, seed)
    rng = np.random.default_rng(seed + 1)
    mixed = [int(rng.integers(1, layout.passage_budget + 1)) for _ in range(24)]
    overlaps = rng.permutation(np.linspace(0.0, 0.9, len(mixed)))
    batches = [make_batch(layout, [_tokens_for(layout, high)] + [_tokens_for(layout, low)] * 2, vocab_size, seed + 2),
               make_batch(layout, [_tokens_for(layout, low)], vocab_size, seed + 3),
               make_batch(layout, mixed, vocab_size, seed + 4, overlaps)]
    return sample, batches


def _vocab_size(model: LayerwiseReranker) -> int:
    return int(model.config.backbone_config["vocab_size"])


def export_checkpoint(checkpoint: str | Path, outdir: str | Path, options: ExportOptions | None = None,
                      progress: bool = False) -> ExportResult:
    """Export ``checkpoint`` to ``outdir`` (see the module docstring).

    Raises a :class:`~matryoshka.errors.MatryoshkaError` (bad checkpoint, bad option, output exists, a file that
    fails validation); ``outdir`` is then left as it was.
    """
    options = options or ExportOptions()
    checkpoint, outdir = Path(checkpoint), Path(outdir)
    options.modes("int8")  # checks int8_mode
    options.check_default_precision()
    shipped = options.shipped()  # checks --only
    if not MIN_OPSET <= options.opset <= max_opset():
        raise ExportError(f"--opset {options.opset} is invalid: expected >= {MIN_OPSET} and <= {max_opset()} (the "
                          f"highest opset torch {_torch_version()} exports without dynamo)")
    check_output(outdir, options.overwrite)
    raw_config = check_checkpoint(checkpoint)
    precisions = options.precisions()
    graphs_per_precision = len(options.exits or raw_config.get("exits") or []) + int(options.full_graph)
    steps = sum(len(options.modes(p)) * graphs_per_precision + 1 for p in precisions)
    bar = tqdm(total=2 + steps, desc="export", unit="step", disable=not progress)
    step: Callable[[str], None] = lambda text: (bar.set_postfix_str(text), bar.update(1))  # noqa: E731
    try:
        model = load_for_export(checkpoint)
        if options.exits is not None:
            try:
                model.select_exits(options.exits)
            except MatryoshkaError as exc:
                raise ExportError(f"--exits: {exc}") from None
        step("model loaded")
        config = model.config
        _check_encoding(model, options)
        stages = stage_specs(config.exits, _compression(model), options.encoding)
        full = (full_graph_spec(config.num_layers, _compression(model))
                if options.full_graph and options.encoding == "pair" else None)
        layout = config.pair_layout()
        sample, batches = sample_batches(layout, _vocab_size(model), options.seed)
        if options.encoding == "segments":
            sample, batches = segment_batch(model, sample), [segment_batch(model, b) for b in batches]
        reference = [(batch, reference_outputs(model, stages, batch)) for batch in batches]
        with atomic_directory(outdir, overwrite=options.overwrite) as tmp:
            shutil.copyfile(checkpoint / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
            graphs = [*stages, *([full] if full is not None else [])]
            sample_feeds = graph_inputs(model, graphs, sample)
            reports: dict[str, list[FileReport]] = {}
            modes: dict[str, str] = {}
            for precision in precisions:
                candidates = []
                for mode in options.modes(precision):
                    target = tmp if mode is None else tmp / f".{precision}-{mode}"
                    _make_precision(precision, model, graphs, sample_feeds, tmp, target, options, step, mode)
                    candidates.append((mode, target, _validate(precision, stages, full, target, reference)))
                mode, target, reports[precision] = min(candidates, key=lambda c: _relative_error(c[2]))
                if mode is not None:
                    modes[precision] = mode
                    _keep(precision, mode, target, tmp, candidates)
                enforce(reports[precision], options.criteria.get(precision, DEFAULT_CRITERIA[precision]))
                step(f"{precision} validated")
            for precision in [p for p in precisions if p not in shipped]:
                _drop(precision, stages, full, tmp)
                del reports[precision]
            manifest = build_manifest(tmp, model, checkpoint, stages, full, reports, options.name,
                                      options.base_model_id, options.encoding, options.default_precision)
            load_manifest(tmp, verify=True)
            _share(tmp)
            step("manifest written")
        all_reports = [r for precision in shipped for r in reports[precision]]
        return ExportResult(outdir, manifest, all_reports, modes)
    finally:
        bar.close()


def _check_encoding(model: LayerwiseReranker, options: ExportOptions) -> None:
    if options.encoding not in STAGE_CONTRACTS:
        raise ExportError(f"--encoding {options.encoding} is invalid: expected one of {', '.join(STAGE_CONTRACTS)}")
    config = model.config
    if options.encoding == "segments" and (config.attention != "segments" or config.readout != "cosine"
                                           or config.inference_compression is not None):
        raise ExportError(f"--encoding segments needs a checkpoint with attention='segments', readout='cosine' and "
                          f"no inference compression; got attention={config.attention!r}, readout="
                          f"{config.readout!r}, compression={config.inference_compression}; export it with "
                          "--encoding pair")
    if options.encoding == "pair" and config.query_exit != "same":
        raise ExportError(f"--encoding pair cannot export a checkpoint with query_exit={config.query_exit!r}: its "
                          "early exits read the query's final-layer embedding, which a pair stage does not have; "
                          "export it with --encoding segments")


def _torch_version() -> str:
    import torch

    return torch.__version__


def _share(folder: Path) -> None:
    """Readable by everyone, like any installed model (temporary folders and files start private)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _compression(model: LayerwiseReranker) -> dict[str, int] | None:
    comp = model.config.inference_compression
    return None if comp is None else {"layer": int(comp.layer), "ratio": int(comp.ratio)}


def _drop(precision: str, stages: Sequence[GraphSpec], full: GraphSpec | None, folder: Path) -> None:
    """Remove the (validated) files of a precision the folder does not ship."""
    for spec in [*stages, *([full] if full is not None else [])]:
        (folder / spec.file(precision)).unlink()
    directory = folder / precision
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def _relative_error(reports: Sequence[FileReport]) -> float:
    """The largest score error relative to the score spread, over the files of one precision."""
    return max(r.score_atol / max(r.score_std, 1e-12) for r in reports)


def _keep(precision: str, mode: str, chosen: Path, folder: Path,
          candidates: Sequence[tuple[str | None, Path, list[FileReport]]]) -> None:
    """Move the chosen int8 files into ``folder/precision`` and drop the other candidates."""
    errors = ", ".join(f"{m}: {_relative_error(r):.3g}" for m, _, r in candidates)
    logger.info("%s: kept %s quantization (max score error / score std: %s)", precision, mode, errors)
    shutil.move(str(chosen / precision), str(folder / precision))
    for _, scratch, _ in candidates:
        shutil.rmtree(scratch, ignore_errors=True)


def _make_precision(precision: str, model: LayerwiseReranker, graphs: Sequence[GraphSpec], feeds: dict[str, Batch],
                    source: Path, folder: Path, options: ExportOptions, step: Callable[[str], None],
                    mode: str | None = None) -> None:
    """Write the files of ``precision`` for every graph into ``folder`` (variants derive from the fp32 or optimized
    files in ``source``)."""
    config = model.config
    backbone = config.backbone_config
    for spec in graphs:
        target = folder / spec.file(precision)
        if precision == "fp32":
            export_graph(model, spec, feeds[spec.name], target, options.opset)
        elif precision == "optimized":
            optimize(source / spec.file("fp32"), target, spec, config.family, int(backbone["num_attention_heads"]),
                     int(config.hidden_size))
        elif precision == "int8":
            quantize_int8(source / spec.file("fp32"), target, spec, mode=mode or INT8_MODES[0])
        elif precision == "optimized-int8":
            quantize_int8(source / spec.file("optimized"), target, spec, fused=True, mode=mode or INT8_MODES[0])
        elif precision == "fp16":
            convert_fp16(source / spec.file("fp32"), target, spec)
        else:
            raise ExportError(f"precision {precision!r} is not produced by the export: expected one of "
                              "fp32, optimized, int8, optimized-int8, fp16")
        step(spec.file(precision) + (f" ({mode})" if mode else ""))


def _validate(precision: str, stages: Sequence[GraphSpec], full: GraphSpec | None, folder: Path,
              reference: Sequence[tuple[Batch, list[StageOutput]]]) -> list[FileReport]:
    reports = validate_precision(precision, stages, [folder / s.file(precision) for s in stages], reference,
                                 full, folder / full.file(precision) if full is not None else None)
    for rep in reports:
        logger.info("%s/%s: score max|diff| %.3g (score std %.3g), hidden max|diff| %.3g, Spearman %.4f", precision,
                    rep.graph, rep.score_atol, rep.score_std, rep.hidden_atol, rep.spearman)
    return reports
