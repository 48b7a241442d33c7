"""The schema of an exported model folder's ``manifest.json`` (schema version 1), owned by the plugin.

A model folder holds ``manifest.json``, ``tokenizer.json`` and one ONNX file per stage and precision. The export
writes the manifest with :func:`write_manifest`; the runtime reads it with :func:`load_manifest`, which checks the
schema version, every required field and its type, that the exits are ascending and agree with the stages (stage k
runs layers ``[exits[k-1], exits[k])``, stage 0 from layer 0), that the stage inputs/outputs follow the stage
contract, the precision names, and (``verify=True``) that every referenced file exists inside the folder and has
the recorded sha256. Every problem is one :class:`ManifestError` line naming the field or file, the expected and the
found value, and the fix (re-export).

Building a manifest (the export side)::

    stages = [StageSpec(k, (start, end), end, FIRST_STAGE_INPUTS if k == 0 else STATE_INPUTS, STAGE_OUTPUTS,
                        {"fp32": FileSpec.from_file(folder, f"fp32/stage_{k + 1}.onnx", atol)}, None, cost), ...]
    write_manifest(folder, Manifest(Producer(...), ModelInfo(...), TokenizerSpec("tokenizer.json",
                   sha256_file(folder / "tokenizer.json")), layout.to_dict(), exits, "fp32", tuple(stages),
                   Calibration("affine", True, {e: ExitCalibration(a, b, std) for e in exits}),
                   PolicySpec("candidate", 0.95, None), full_graph=None))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from matryoshka.errors import DataFormatError, MissingInputError
from matryoshka.io.atomic import atomic_write
from matryoshka.plugin.manifest_parse import manifest_from_dict
from matryoshka.plugin.manifest_schema import (
    CALIBRATION_KINDS,
    FAMILIES,
    FIRST_STAGE_INPUTS,
    MANIFEST_NAME,
    POLICY_NAMES,
    PRECISIONS,
    REEXPORT,
    SCHEMA_VERSION,
    SEGMENT_FIRST_INPUTS,
    SEGMENT_OUTPUTS,
    SEGMENT_STATE_INPUTS,
    STAGE_CONTRACTS,
    STAGE_OUTPUTS,
    STATE_INPUTS,
    Calibration,
    Compression,
    ExitCalibration,
    FileSpec,
    FullGraphSpec,
    Manifest,
    ManifestError,
    ModelInfo,
    ModelIntegrityError,
    PathLike,
    PolicySpec,
    Producer,
    StageSpec,
    TokenizerSpec,
    sha256_file,
)

__all__ = ["CALIBRATION_KINDS", "FAMILIES", "FIRST_STAGE_INPUTS", "MANIFEST_NAME", "POLICY_NAMES", "PRECISIONS",
           "SCHEMA_VERSION", "SEGMENT_FIRST_INPUTS", "SEGMENT_OUTPUTS", "SEGMENT_STATE_INPUTS", "STAGE_CONTRACTS",
           "STAGE_OUTPUTS", "STATE_INPUTS", "Calibration", "Compression", "ExitCalibration",
           "FileSpec", "FullGraphSpec", "Manifest", "ManifestError", "ModelInfo", "ModelIntegrityError", "PolicySpec",
           "Producer", "StageSpec", "TokenizerSpec", "load_manifest", "manifest_from_dict", "sha256_file",
           "verify_files", "write_manifest"]

logger = logging.getLogger(__name__)


def _check_file(folder: Path, manifest_path: Path, rel: str, expected: str, what: str) -> None:
    path = folder / rel
    real_root = folder.resolve()
    if path.exists() and not path.resolve().is_relative_to(real_root):  # a symlink out of the folder
        raise ModelIntegrityError(path, f"{what} listed in {manifest_path.name} resolves to {path.resolve()}, outside "
                                  f"the model folder {real_root} (copy the file into the folder instead of linking)")
    if not path.is_file():
        raise MissingInputError(path, f"{what} listed in {manifest_path}",
                                f"the model folder is incomplete; {REEXPORT}")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelIntegrityError(path, f"sha256 is {actual} but {manifest_path.name} expects {expected} (the file "
                                  "was changed after export)")


def verify_files(folder: PathLike, manifest: Manifest, precisions: Iterable[str] | None = None) -> None:
    """Check that the tokenizer and the stage (and full-graph) files of ``precisions`` (default: all) exist inside
    ``folder`` with their recorded sha256."""
    root = Path(folder)
    manifest_path = root / MANIFEST_NAME
    wanted = set(precisions) if precisions is not None else None
    _check_file(root, manifest_path, manifest.tokenizer.file, manifest.tokenizer.sha256, "tokenizer file")
    groups = [(f"stage {s.index + 1}", s.files) for s in manifest.stages]
    if manifest.full_graph is not None:
        groups.append(("full graph", manifest.full_graph.files))
    for what, files in groups:
        for precision, spec in files.items():
            if wanted is None or precision in wanted:
                _check_file(root, manifest_path, spec.path, spec.sha256, f"{what} {precision} file")


def load_manifest(folder: PathLike, verify: bool = True, precisions: Iterable[str] | None = None) -> Manifest:
    """Read and check ``folder/manifest.json``; with ``verify`` also every referenced file (see :func:`verify_files`).
    """
    root = Path(folder)
    if not root.is_dir():
        raise MissingInputError(root, "model folder", "pass the folder that holds manifest.json (an exported model)")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise MissingInputError(path, "model manifest", f"{root} is not an exported model folder; {REEXPORT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ManifestError(path, f"not valid UTF-8 ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise DataFormatError(path, err.lineno, f"invalid JSON ({err.msg} at column {err.colno})", REEXPORT) from None
    manifest = manifest_from_dict(data, path)
    if verify:
        verify_files(root, manifest, precisions)
    logger.debug("loaded %s (%d stages, exits %s)", path, len(manifest.stages), list(manifest.exits))
    return manifest


def write_manifest(folder: PathLike, manifest: Manifest) -> Path:
    """Check ``manifest`` against the schema and write ``folder/manifest.json`` atomically. Returns its path."""
    path = Path(folder) / MANIFEST_NAME
    data = manifest.to_dict()
    manifest_from_dict(json.loads(json.dumps(data)), path)  # the same checks a reader makes
    with atomic_write(path) as handle:
        handle.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path
