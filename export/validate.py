"""Validation of exported graphs against the PyTorch model, and the agreement metrics the report and manifest use.

Every graph is run with onnxruntime on batches whose batch size and sequence length differ from the export sample:
- per stage, fed the PyTorch state of the previous stage (isolates each stage's error);
- chained, each stage fed the previous ONNX stage's outputs (the error the cascade really sees);
- the full graph, against the PyTorch score of the last exit.
The score error of a file is the larger of its isolated and chained errors; integer outputs (mask, positions) must
match exactly. Scores of quantized variants are also compared by Spearman correlation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matryoshka.export.errors import ExportValidationError
from matryoshka.export.reference import Batch, StageOutput, stage_feed, state_feed
from matryoshka.export.spec import GraphSpec


@dataclass(frozen=True)
class Criteria:
    """When a precision passes: score ``max |onnx - torch| <= max_atol`` (absolute), ``<= max_rel_std`` times the
    std of the PyTorch scores (relative to the score scale), and Spearman correlation >= ``min_spearman``."""

    max_atol: float | None = None
    max_rel_std: float | None = None
    min_spearman: float | None = None


#: fp32 must match PyTorch within 1e-4; reduced precisions are judged by score agreement (ranking preserved)
DEFAULT_CRITERIA: dict[str, Criteria] = {
    "fp32": Criteria(max_atol=1e-4),
    "optimized": Criteria(max_atol=1e-4),
    "fp16": Criteria(max_rel_std=0.1, min_spearman=0.99),
    "int8": Criteria(max_rel_std=1.0, min_spearman=0.9),
    "optimized-int8": Criteria(max_rel_std=1.0, min_spearman=0.9),
}


@dataclass
class FileReport:
    """What one graph file reached."""

    graph: str
    precision: str
    score_atol: float = 0.0  # max |score_onnx - score_torch| over isolated and chained runs
    hidden_atol: float = 0.0  # max |hidden_states_out| error, stages run in isolation
    spearman: float = 1.0
    score_std: float = 0.0  # std of the PyTorch scores: the scale the errors compare with
    scores_onnx: list[np.ndarray] = field(default_factory=list, repr=False)
    scores_torch: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def validated_atol(self) -> float:
        return round_up(self.score_atol)


def round_up(value: float, floor: float = 1e-7) -> float:
    """``value`` rounded up to two significant digits (at least ``floor``): the tolerance recorded as reached."""
    if value <= floor:
        return floor
    exponent = math.floor(math.log10(value)) - 1
    return float(f"{math.ceil(value / 10 ** exponent * (1 - 1e-9)) * 10 ** exponent:.3g}")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 1.0 when both are constant."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb else 0.0
    return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def session(path: Path, threads: int = 1):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_integers(report: str, name: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or not np.array_equal(got, want):
        raise ExportValidationError(report, f"output {name} differs from PyTorch (shape {got.shape} vs "
                                    f"{want.shape})", "the graph baked in a shape of the export sample; check "
                                    "the model code for Python ints derived from tensor shapes")


def _score_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0


def validate_precision(precision: str, stages: Sequence[GraphSpec], stage_files: Sequence[Path],
                       batches: Sequence[tuple[Batch, list[StageOutput]]], full: GraphSpec | None = None,
                       full_file: Path | None = None) -> list[FileReport]:
    """Run one precision's stage files (and full graph) on every batch; return one report per file."""
    sessions = [session(p) for p in stage_files]
    reports = [FileReport(s.name, precision) for s in stages]
    full_report = FileReport(full.name, precision) if full is not None and full_file is not None else None
    full_session = session(full_file) if full_report is not None and full_file is not None else None
    for inputs, reference in batches:
        chained: dict[str, np.ndarray] = inputs
        for spec, sess, rep, ref in zip(stages, sessions, reports, reference, strict=True):
            isolated_in = inputs if spec.first else state_feed(reference[spec.index - 1].arrays)
            iso = dict(zip(spec.output_names, sess.run(spec.output_names, stage_feed(spec, isolated_in, inputs)),
                           strict=True))
            where = f"{precision}/{spec.name}.onnx"
            for name in ("attention_mask_out", "position_ids_out"):
                _check_integers(where, name, iso[name], ref.arrays[name])
            hidden_ref = ref.arrays["hidden_states_out"]
            if iso["hidden_states_out"].shape != hidden_ref.shape:
                raise ExportValidationError(where, f"hidden_states_out has shape {iso['hidden_states_out'].shape}, "
                                            f"PyTorch {hidden_ref.shape}", "check the compression reshape")
            rep.hidden_atol = max(rep.hidden_atol, _score_error(iso["hidden_states_out"], hidden_ref),
                                  *([_score_error(iso["embedding"], ref.arrays["embedding"])] if spec.segments else []))
            chain = dict(zip(spec.output_names, sess.run(spec.output_names, stage_feed(spec, chained, inputs)),
                             strict=True))
            rep.score_atol = max(rep.score_atol, _score_error(iso["score"], ref.arrays["score"]),
                                 _score_error(chain["score"], ref.arrays["score"]))
            rep.scores_onnx.append(chain["score"])
            rep.scores_torch.append(ref.arrays["score"])
            chained = state_feed(chain)
        if full_session is not None and full_report is not None and full is not None:
            (score,) = full_session.run(["score"], {name: inputs[name] for name in full.input_names})
            want = reference[-1].arrays["score"]
            full_report.score_atol = max(full_report.score_atol, _score_error(score, want))
            full_report.scores_onnx.append(score)
            full_report.scores_torch.append(want)
    out = reports + ([full_report] if full_report is not None else [])
    for rep in out:
        torch_scores = np.concatenate(rep.scores_torch)
        rep.spearman = spearman(np.concatenate(rep.scores_onnx), torch_scores)
        rep.score_std = float(torch_scores.std())
    return out


def enforce(reports: Sequence[FileReport], criteria: Criteria) -> None:
    """Raise :class:`ExportValidationError` for the first file that misses ``criteria``."""
    for rep in reports:
        where = f"{rep.precision}/{rep.graph}.onnx"
        if criteria.max_atol is not None and not rep.score_atol <= criteria.max_atol:
            raise ExportValidationError(where, f"score differs from PyTorch by {rep.score_atol:.3g} > allowed "
                                        f"{criteria.max_atol:g}", "the export is wrong for this model; report it "
                                        "with the checkpoint's matryoshka_config.json")
        if criteria.max_rel_std is not None and not rep.score_atol <= criteria.max_rel_std * rep.score_std:
            raise ExportValidationError(where, f"score differs from PyTorch by {rep.score_atol:.3g}, more than "
                                        f"{criteria.max_rel_std:g} x the spread of the PyTorch scores (std "
                                        f"{rep.score_std:.3g}) on the validation pairs", f"skip the {rep.precision} "
                                        "variant for this model; a std near 0 means this exit scores every pair "
                                        "alike (check the checkpoint)")
        if criteria.min_spearman is not None and rep.spearman < criteria.min_spearman:
            raise ExportValidationError(where, f"score Spearman correlation with PyTorch is {rep.spearman:.4f} < "
                                        f"required {criteria.min_spearman}", f"skip the {rep.precision} variant "
                                        "for this model")
