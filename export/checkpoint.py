"""Checks on the checkpoint folder and the output folder, before any work, and loading the model for export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from matryoshka.export.errors import CheckpointError, ExportError
from matryoshka.training.config import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from matryoshka.training.modeling import LayerwiseReranker

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = ("encoder", "decoder")
TRAIN_HINT = "pass a folder written by LayerwiseReranker.save (python -m matryoshka train ...)"


class OutputExistsError(ExportError, FileExistsError):
    """The output folder exists and ``--overwrite`` was not given."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: output folder already exists (pass --overwrite to replace it, or choose another "
                         "folder)")


def check_checkpoint(folder: Path) -> dict:
    """Fail early, with one line, on a folder that is not a complete checkpoint of a supported family.

    Returns the raw ``matryoshka_config.json`` object.
    """
    if not folder.is_dir():
        raise CheckpointError(folder, "checkpoint folder not found", TRAIN_HINT)
    for name, what in ((CONFIG_FILE, "model configuration"), (WEIGHTS_FILE, "model weights"),
                       (TOKENIZER_FILE, "tokenizer")):
        if not (folder / name).is_file():
            raise CheckpointError(folder / name, f"{what} file missing from the checkpoint", TRAIN_HINT)
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(folder / CONFIG_FILE, f"not valid JSON ({exc})", TRAIN_HINT) from None
    if not isinstance(raw, dict):
        raise CheckpointError(folder / CONFIG_FILE, "expected a JSON object", TRAIN_HINT)
    family = raw.get("family")
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(folder / CONFIG_FILE, f"family={family!r} is not supported: expected one of "
                              f"{list(SUPPORTED_FAMILIES)}", "export an encoder (BERT-like) or decoder (Llama-like) "
                              "reranker")
    return raw


def check_output(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not overwrite:
        raise OutputExistsError(folder)
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder}: exists and is not a folder (choose another output folder)")


def load_for_export(folder: Path) -> LayerwiseReranker:
    """The checkpoint in float32, eval mode, with eager attention (the exportable, fusable attention)."""
    model = LayerwiseReranker.load(folder)
    model = model.float().eval()
    backbone_config = getattr(getattr(model, "backbone", None), "config", None)
    if backbone_config is not None and getattr(backbone_config, "_attn_implementation", "eager") != "eager":
        model.backbone.set_attn_implementation("eager")
    logger.info("loaded %s (%s, %d layers, exits %s, inference compression %s)", folder, model.config.family,
                model.config.num_layers, list(model.config.exits), model.config.inference_compression)
    return model
