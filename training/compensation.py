"""Per-exit compensation: put every early exit's score on the final exit's scale, then measure what is left.

Why: the cascade (plugin) stops a candidate at exit ``l`` when its score there is confident enough, with ONE
threshold for all exits, and merges scores from different exits into one ranking. That only works if a score of 3.0
means the same at layer 2 as at layer 6. Layer-wise training (CE / self-distillation) makes each exit rank well but
leaves each on its own scale. FlagEmbedding's compensation (a ``tmp_model`` copied around) is dead code; this one is
small, explicit and trained on its own phase.

What: for each exit ``l`` except the last, with ``h`` the exit hidden state ([CLS] or normed last token) and
``head_l`` the exit's linear head,

    s'_l = scale_l * (head_l(h) + adapter_l(h)) + bias_l

``adapter_l`` is a residual 2-layer MLP (hidden -> 64 -> 1, GELU) whose output layer is zero-initialised, and
``scale_l = 1``, ``bias_l = 0`` at start, so an untrained compensation is exactly the identity. The final exit is
the reference (``s_L``): its compensation stays the identity and is never trained (if the reference moved, the gap
target would chase itself, and CE alone grows any scale without bound).

How (the COMPENSATION phase, :mod:`matryoshka.training.objective`): :func:`freeze_for_compensation` freezes the
backbone, the heads and the final exit; only :func:`compensation_parameters` train, on CE at every exit plus
``lambda * ||s'_l - s_L||^2`` (``s_L`` detached). CE keeps each exit's ranking; the gap term moves its scale and
offset onto the final exit's.

Afterwards :func:`measure_residuals` records, per exit, the std of ``s'_l - s_L`` on held-out batches into
``model.config.compensation`` (with each exit's scale and bias); the plugin uses it for its top-k policy (how far
an early score may still move by the final exit). The export bakes the compensation into each stage's ``score``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from matryoshka.errors import MatryoshkaError

if TYPE_CHECKING:
    from matryoshka.training.modeling import LayerwiseReranker

logger = logging.getLogger(__name__)

COMPENSATION_KIND = "residual_adapter+affine"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class ExitCompensation(nn.Module):
    """``s' = scale * (raw + adapter(h)) + bias``; the identity at initialisation (see the module docstring)."""

    def __init__(self, hidden_size: int, adapter_hidden: int = 64) -> None:
        super().__init__()
        self.adapter = nn.Sequential(nn.Linear(hidden_size, adapter_hidden), nn.GELU(), nn.Linear(adapter_hidden, 1))
        nn.init.zeros_(self.adapter[2].weight)
        nn.init.zeros_(self.adapter[2].bias)
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: Tensor, raw: Tensor) -> Tensor:
        return self.scale * (raw + self.adapter(hidden).squeeze(-1)) + self.bias


def is_identity(module: ExitCompensation) -> bool:
    """True while the compensation is still its initial identity (scale 1, bias 0, zero adapter output layer)."""
    out = module.adapter[2]
    return (float(module.scale.detach()) == 1.0 and float(module.bias.detach()) == 0.0
            and not bool(out.weight.detach().any()) and not bool(out.bias.detach().any()))


def trainable_exits(model: LayerwiseReranker) -> tuple[int, ...]:
    """The exits whose compensation trains: all but the final (reference) exit."""
    return tuple(model.config.exits[:-1])


def compensation_parameters(model: LayerwiseReranker) -> list[nn.Parameter]:
    """The parameters the COMPENSATION phase trains (adapters, scales and biases of the non-final exits)."""
    return [p for e in trainable_exits(model) for p in model.compensation[str(e)].parameters()]


def freeze_for_compensation(model: LayerwiseReranker) -> list[nn.Parameter]:
    """Freeze everything except :func:`compensation_parameters`; return those (give them to the optimizer)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    params = compensation_parameters(model)
    for parameter in params:
        parameter.requires_grad_(True)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    logger.info("compensation phase: %d trainable parameters, %d frozen", sum(p.numel() for p in params), frozen)
    return params


def _model_inputs(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    missing = [k for k in ("input_ids", "attention_mask") if k not in batch]
    if missing:
        raise MatryoshkaError(f"measure_residuals: batch has no {missing}: expected the collator's model inputs "
                              f"({', '.join(MODEL_INPUTS)})")
    return {k: batch[k].to(device) for k in MODEL_INPUTS if batch.get(k) is not None}


@torch.no_grad()
def measure_residuals(model: LayerwiseReranker, batches: Iterable[Mapping[str, Tensor]]) -> dict[int, float]:
    """Std of ``s'_l - s_L`` per exit over ``batches`` (model inputs, as the collator makes them).

    Runs with the config's ``inference_compression`` (what the plugin runs), in eval mode, and stores the result,
    with each exit's scale and bias, in ``model.config.compensation``. Returns ``{exit: residual_std}``; the final
    exit's residual is 0 by definition.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    residuals: dict[int, list[Tensor]] = {e: [] for e in model.config.exits}
    try:
        for batch in batches:
            scores = model(**_model_inputs(batch, device), compression=model.config.inference_compression)
            final = scores.calibrated[-1]
            for index, exit_layer in enumerate(scores.exits):
                residuals[exit_layer].append((scores.calibrated[index] - final).double().cpu())
    finally:
        model.train(was_training)
    if not residuals[model.config.exits[-1]]:
        raise MatryoshkaError("measure_residuals got no batches: expected at least one batch of held-out pairs")
    out: dict[int, float] = {}
    for exit_layer, parts in residuals.items():
        values = torch.cat(parts)
        out[exit_layer] = float(values.std(unbiased=values.numel() > 1)) if values.numel() else 0.0
        if not math.isfinite(out[exit_layer]):
            raise MatryoshkaError(f"measure_residuals: exit {exit_layer} has a non-finite residual std: "
                                  "check the model's scores for NaN/inf")
    record_compensation(model, residual_std=out, measured_on=int(torch.cat(residuals[exit_layer]).numel()))
    return out


def record_compensation(model: LayerwiseReranker, residual_std: Mapping[int, float] | None = None,
                        measured_on: int | None = None) -> dict:
    """Write each exit's current scale/bias (and, when given, residual std) into ``model.config.compensation``."""
    previous = model.config.compensation.get("per_exit", {}) if model.config.compensation else {}
    per_exit = {}
    for exit_layer in model.config.exits:
        module = model.compensation[str(exit_layer)]
        entry = {"scale": float(module.scale.detach()), "bias": float(module.bias.detach())}
        if residual_std is not None:
            entry["residual_std"] = float(residual_std[exit_layer])
        elif "residual_std" in previous.get(str(exit_layer), {}):
            entry["residual_std"] = previous[str(exit_layer)]["residual_std"]
        per_exit[str(exit_layer)] = entry
    info = dict(model.config.compensation or {})
    info.update({"kind": COMPENSATION_KIND, "adapter_hidden": model.config.adapter_hidden, "per_exit": per_exit,
                 "trained": not all(is_identity(model.compensation[str(e)]) for e in model.config.exits)})
    if measured_on is not None:
        info["residuals_measured_on"] = measured_on
    model.config.compensation = info
    return info
