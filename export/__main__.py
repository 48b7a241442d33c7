"""``python -m matryoshka.export CHECKPOINT OUTDIR [--int8] [--fp16] [--optimize] [--exits L ...] [--only P ...]``

Exports a checkpoint written by ``LayerwiseReranker.save`` to a model folder the plugin runs: one ONNX graph per
stage (and the full-depth graph) per precision, each validated against PyTorch, plus ``manifest.json`` and
``tokenizer.json``. The folder appears only once everything passed (written to a temporary folder first).
Exit status: 0 on success, 2 on bad input or a failed validation (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.errors import cli_main  # noqa: E402
from matryoshka.plugin.manifest_schema import STAGE_CONTRACTS  # noqa: E402

if TYPE_CHECKING:
    from matryoshka.export.pipeline import ExportResult



@dataclass
class ExportArgs:
    checkpoint: Path
    outdir: Path
    int8: bool = False
    int8_mode: str = "auto"
    fp16: bool = False
    optimize: bool = False
    opset: int = 17
    full_graph: bool = True
    overwrite: bool = False
    exits: list[int] | None = None
    only: list[str] | None = None
    default_precision: str | None = None
    name: str | None = None
    base_model_id: str | None = None
    encoding: str = "pair"
    quiet: bool = False
    verbose: bool = False


def parse_args(argv: Sequence[str] | None = None) -> ExportArgs:
    parser = argparse.ArgumentParser(prog="python -m matryoshka.export", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="checkpoint folder (matryoshka_config.json, model.safetensors, "
                        "tokenizer.json)")
    parser.add_argument("outdir", type=Path, help="model folder to create")
    parser.add_argument("--int8", action="store_true", help="also write int8 (dynamic quantization, CPU) stages")
    parser.add_argument("--int8-mode", choices=["auto", "per-channel", "per-tensor"], default="auto",
                        help="int8 weight scales; auto (default) validates both and keeps the smaller score error")
    parser.add_argument("--fp16", action="store_true", help="also write fp16 stages (for the CUDA provider)")
    parser.add_argument("--optimize", action="store_true", help="also write onnxruntime-optimized (fused) stages "
                        "('optimized', and 'optimized-int8' with --int8)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    parser.add_argument("--no-full-graph", dest="full_graph", action="store_false",
                        help="skip the single full-depth graph (the baseline the cascade is compared with)")
    parser.add_argument("--encoding", choices=list(STAGE_CONTRACTS), default="pair",
                        help="stage contract: pair (a stage reads whole pairs; default) or segments (a stage encodes "
                             "one query or passage, so each query is encoded once per stage, not once per candidate; "
                             "checkpoints trained with attention='segments' and readout='cosine'; no full graph)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTDIR if it exists")
    parser.add_argument("--exits", type=int, nargs="+", default=None, metavar="LAYER",
                        help="export only these exits of the checkpoint (ascending, ending with the last layer), "
                        "e.g. to leave out an exit that did not learn (default: all)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PRECISION",
                        help="precisions the folder keeps (default: all produced), e.g. '--int8 --only int8' for a "
                        "small CPU model; fp32 is still exported and validated first")
    parser.add_argument("--default-precision", default=None, metavar="PRECISION",
                        help="the precision the plugin runs unless asked for another (default: int8 when kept, else "
                        "fp32)")
    parser.add_argument("--name", default=None, help="model name in the manifest (default: the checkpoint's name)")
    parser.add_argument("--base-model-id", default=None, metavar="ID",
                        help="the base model as the manifest records it, e.g. its Hugging Face id (default: the "
                        "checkpoint's base_model, often a local path)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.add_argument("--verbose", action="store_true", help="log every step")
    return ExportArgs(**vars(parser.parse_args(argv)))


def summary(result: ExportResult) -> str:
    """A markdown table of what every file reached."""
    lines = ["| file | score max abs diff | validated_atol | Spearman |", "|---|---|---|---|"]
    for rep in result.reports:
        lines.append(f"| {rep.precision}/{rep.graph}.onnx | {rep.score_atol:.3g} | {rep.validated_atol:g} | "
                     f"{rep.spearman:.4f} |")
    return "\n".join(lines)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("matryoshka").setLevel(logging.INFO if args.verbose else logging.WARNING)
    from matryoshka.export.pipeline import ExportOptions, export_checkpoint

    options = ExportOptions(int8=args.int8, int8_mode=args.int8_mode, fp16=args.fp16, optimize=args.optimize,
                            opset=args.opset, full_graph=args.full_graph, overwrite=args.overwrite, name=args.name,
                            base_model_id=args.base_model_id, encoding=args.encoding,
                            exits=tuple(args.exits) if args.exits else None,
                            only=tuple(args.only) if args.only else None,
                            default_precision=args.default_precision)
    result = export_checkpoint(args.checkpoint, args.outdir, options, progress=not args.quiet)
    if not args.quiet:
        print(summary(result))
        modes = "".join(f", {p} {m}" for p, m in result.int8_modes.items())
        print(f"exported {args.checkpoint} -> {result.folder} (precisions {', '.join(options.shipped())}, "
              f"default {result.manifest.default_precision}{modes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
