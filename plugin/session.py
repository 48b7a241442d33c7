"""onnxruntime sessions for the stages of an exported model: execution providers, threads, input feeding."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from matryoshka.checks import is_int
from matryoshka.errors import MatryoshkaError, OptionError

logger = logging.getLogger(__name__)

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "gpu": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider",
                    "dml": "DmlExecutionProvider"}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}

#: what onnxruntime raises for a file it cannot load (its pybind exception types derive from Exception directly)
ORT_ERRORS = (RuntimeError, OSError, ValueError, *(v for v in vars(_ort_state).values()
                                                 if isinstance(v, type) and issubclass(v, Exception)))


class ProviderUnavailableError(MatryoshkaError):
    """An execution provider was asked for that this onnxruntime build does not have."""


class StageLoadError(MatryoshkaError):
    """An ONNX stage file that onnxruntime cannot load, or whose inputs/outputs break the stage contract."""


def resolve_providers(providers: str | Sequence[str] | None) -> list[str]:
    """Normalise ``"cpu"``, ``"cuda,cpu"``, ``["CUDAExecutionProvider"]`` ... to onnxruntime provider names.

    None means CPU. A provider that is not available raises :class:`ProviderUnavailableError`; CPU is appended as
    the fallback for operators an accelerator does not implement.
    """
    if providers is None:
        names = ["cpu"]
    elif isinstance(providers, str):
        names = [p.strip() for p in providers.split(",") if p.strip()]
    else:
        names = [str(p).strip() for p in providers]
    if not names:
        raise OptionError("providers", providers, "a comma-separated list such as 'cpu' or 'cuda,cpu'")
    available = ort.get_available_providers()
    resolved: list[str] = []
    for name in names:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if not full.endswith("ExecutionProvider"):
            raise OptionError("providers", name, f"one of {', '.join(PROVIDER_ALIASES)} or a full onnxruntime "
                              "provider name")
        if full not in available:
            hint = ("install onnxruntime-gpu instead of onnxruntime (pip uninstall -y onnxruntime && pip install "
                    "'pyserini-matryoshka[gpu]') and check CUDA/cuDNN, or use --providers cpu"
                    if full == "CUDAExecutionProvider" else "use --providers cpu")
            raise ProviderUnavailableError(f"execution provider {full} was asked for but onnxruntime "
                                           f"{ort.__version__} only has {', '.join(available)} ({hint})")
        if full not in resolved:
            resolved.append(full)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads: int | None, option: str = "threads", minimum: int = 0) -> int | None:
    """``threads`` as given (None, or 0 with ``minimum`` 0 = onnxruntime's default), refused below ``minimum`` and
    above the CPUs this process may use: thousands of spinning threads stall the machine."""
    if threads is None:
        return None
    cpus = available_cpus()
    if not is_int(threads, minimum, cpus):
        low = "0 (onnxruntime's default)" if minimum == 0 else str(minimum)
        raise OptionError(option, threads, f"an integer from {low} to {cpus} (the CPUs available here)")
    return threads


@dataclass
class StageSession:
    """One stage's InferenceSession with its declared inputs (name -> numpy dtype) and outputs."""

    path: Path
    session: ort.InferenceSession
    inputs: dict[str, type]
    outputs: list[str]

    def run(self, feeds: Mapping[str, np.ndarray], fetch: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run with the declared inputs only (a graph may have dropped an unused one), cast to their types;
        returns ``fetch`` (default: the session's outputs)."""
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise StageLoadError(f"{self.path}: the graph needs inputs {missing} that the cascade does not provide "
                                 f"(it provides {sorted(feeds)}); re-export the model")
        arrays = {name: np.ascontiguousarray(feeds[name], dtype=dtype) for name, dtype in self.inputs.items()}
        try:
            names = list(fetch) if fetch is not None else self.outputs
            values = self.session.run(names, arrays)
        except ORT_ERRORS as err:
            first = _first_line(err)
            shapes = ", ".join(f"{name} {tuple(a.shape)}" for name, a in arrays.items())
            raise StageLoadError(f"{self.path}: onnxruntime failed on inputs {shapes} ({first}); check the "
                                 "manifest's layout (max_length within the model's positions) or re-export") from None
        return dict(zip(names, values, strict=True))


def check_search_options(hits: int, threads: int) -> None:
    """The BM25-first-stage CLIs' ``--hits`` (a positive number) and ``--threads`` (1 to the CPUs available here)."""
    if hits < 1:
        raise OptionError("--hits", hits, "a positive number of hits per query")
    check_threads(threads, "--threads", minimum=1)


def open_stage(path: Path, providers: Sequence[str], threads: int | None, allowed_inputs: Sequence[str],
               required_outputs: Sequence[str], fetch: Sequence[str] | None = None) -> StageSession:
    """Open a stage file; checks its inputs are among ``allowed_inputs`` and it has ``required_outputs``.
    ``fetch`` (default: all required outputs) are the outputs :meth:`StageSession.run` returns."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=list(providers))
    except ORT_ERRORS as err:
        first = _first_line(err)
        raise StageLoadError(f"{path}: onnxruntime cannot load this stage ({first}); re-export the model") from None
    inputs = {}
    for meta in session.get_inputs():
        if meta.name not in allowed_inputs:
            raise StageLoadError(f"{path}: unexpected graph input {meta.name!r}; a stage takes a subset of "
                                 f"{list(allowed_inputs)} (re-export the model)")
        inputs[meta.name] = _ORT_TYPES.get(meta.type, np.float32)
    outputs = [meta.name for meta in session.get_outputs()]
    missing = [name for name in required_outputs if name not in outputs]
    if missing:
        raise StageLoadError(f"{path}: graph outputs {outputs} lack {missing} (re-export the model)")
    logger.debug("opened %s with %s", path, session.get_providers())
    return StageSession(Path(path), session, inputs, list(fetch if fetch is not None else required_outputs))
