"""Parsing and checking of a manifest's JSON object against schema version 1 (no file access)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path, PurePosixPath
from typing import Any

from matryoshka.layout import QUERY_EXITS, PairLayout
from matryoshka.plugin.fusion import FUSION_EXPECTED, NORMALIZATIONS
from matryoshka.plugin.manifest_schema import (
    CALIBRATION_KINDS,
    FAMILIES,
    MANIFEST_NAME,
    POLICY_NAMES,
    PRECISIONS,
    SCHEMA_VERSION,
    STAGE_CONTRACTS,
    Calibration,
    Compression,
    ExitCalibration,
    FileSpec,
    FullGraphSpec,
    Manifest,
    ManifestError,
    ModelInfo,
    PathLike,
    PolicySpec,
    Producer,
    StageSpec,
    TokenizerSpec,
)


class _Reader:
    """Typed field access that reports the JSON path of a bad value."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> ManifestError:
        return ManifestError(self.source, f"{where}: {problem}")

    def obj(self, data: Any, where: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(where, f"expected a JSON object, got {type(data).__name__}")
        return data

    def get(self, data: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...],
            optional: bool = False, default: Any = None) -> Any:
        if key not in data:
            if optional:
                return default
            raise self.fail(f"{where}.{key}" if where else key, "required field is missing")
        value = data[key]
        if value is None and optional:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        bad_bool = isinstance(value, bool) and bool not in kinds
        if bad_bool or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.fail(f"{where}.{key}" if where else key, f"expected {names}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(f"{where}.{key}" if where else key, f"expected a finite number, got {value!r}")
        return value

    def str_list(self, data: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
        values = self.get(data, key, where, list)
        if not all(isinstance(v, str) for v in values):
            raise self.fail(f"{where}.{key}", f"expected a list of strings, got {values!r}")
        return tuple(values)

    def layer_range(self, data: dict[str, Any], where: str) -> tuple[int, int]:
        values = self.get(data, "layers", where, list)
        if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise self.fail(f"{where}.layers", f"expected [start, end] integers, got {values!r}")
        return int(values[0]), int(values[1])

    def files(self, data: dict[str, Any], where: str) -> dict[str, FileSpec]:
        raw = self.obj(self.get(data, "files", where, dict), f"{where}.files")
        if not raw:
            raise self.fail(f"{where}.files", "expected at least one precision")
        out = {}
        for precision, spec in raw.items():
            at = f"{where}.files.{precision}"
            if precision not in PRECISIONS:
                raise self.fail(at, f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
            spec = self.obj(spec, at)
            atol = self.get(spec, "validated_atol", at, (int, float), optional=True)
            if atol is not None and atol < 0:
                raise self.fail(f"{at}.validated_atol", f"expected a number >= 0, got {atol!r}")
            out[precision] = FileSpec(self.rel_path(self.get(spec, "path", at, str), f"{at}.path"),
                                      self.sha(self.get(spec, "sha256", at, str), f"{at}.sha256"),
                                      None if atol is None else float(atol))
        return out

    def rel_path(self, value: str, where: str) -> str:
        pure = PurePosixPath(value)
        if not value or pure.is_absolute() or ".." in pure.parts or "\\" in value:
            raise self.fail(where, f"expected a relative path inside the model folder, got {value!r}")
        return value

    def sha(self, value: str, where: str) -> str:
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise self.fail(where, f"expected 64 lowercase hex digits, got {value!r}")
        return value


def manifest_from_dict(data: Any, source: PathLike = MANIFEST_NAME) -> Manifest:
    """Parse and check a manifest's JSON object (no file access). Raises :class:`ManifestError`."""
    r = _Reader(Path(source))
    data = r.obj(data, "manifest")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(source, f"schema_version is {version!r}, this plugin reads schema_version "
                            f"{SCHEMA_VERSION}", "re-export the model with this version of pyserini-matryoshka, "
                            "or install the plugin version that exported it")
    prod = r.obj(r.get(data, "producer", "", dict), "producer")
    producer = Producer(**{k: str(prod.get(k, "")) for k in vars(Producer())})
    m = r.obj(r.get(data, "model", "", dict), "model")
    model = ModelInfo(r.get(m, "name", "model", str), r.get(m, "family", "model", str),
                      r.get(m, "base_model", "model", str), r.get(m, "num_layers", "model", int),
                      r.get(m, "hidden_size", "model", int))
    if model.family not in FAMILIES:
        raise r.fail("model.family", f"expected one of {', '.join(FAMILIES)}, got {model.family!r}")
    if model.num_layers < 1 or model.hidden_size < 1:
        raise r.fail("model", f"num_layers and hidden_size must be >= 1, got {model.num_layers}, {model.hidden_size}")
    t = r.obj(r.get(data, "tokenizer", "", dict), "tokenizer")
    tokenizer = TokenizerSpec(r.rel_path(r.get(t, "file", "tokenizer", str), "tokenizer.file"),
                              r.sha(r.get(t, "sha256", "tokenizer", str), "tokenizer.sha256"))
    layout = r.obj(r.get(data, "layout", "", dict), "layout")
    try:
        pair_layout = PairLayout.from_dict(layout)
    except (TypeError, ValueError) as err:
        raise r.fail("layout", f"not a valid PairLayout ({err})") from None
    if pair_layout.family != model.family:
        raise r.fail("layout.family", f"expected {model.family!r} (model.family), got {pair_layout.family!r}")
    exits = _exits(r, r.get(data, "exits", "", list), model.num_layers)
    default_precision = r.get(data, "default_precision", "", str)
    encoding = r.get(data, "encoding", "", str, optional=True, default="pair")
    if encoding not in STAGE_CONTRACTS:
        raise r.fail("encoding", f"expected one of {', '.join(STAGE_CONTRACTS)} or no field (pair), got {encoding!r}")
    if encoding == "segments" and model.family != "encoder":
        raise r.fail("encoding", f"'segments' is for encoders, got model.family {model.family!r}")
    query_exit = r.get(data, "query_exit", "", str, optional=True, default="same")
    if query_exit not in QUERY_EXITS or (query_exit != "same" and encoding != "segments"):
        raise r.fail("query_exit", f"expected one of {', '.join(QUERY_EXITS)} or no field (same), and 'same' unless "
                     f"encoding is 'segments'; got {query_exit!r} with encoding {encoding!r}")
    stages = tuple(_stage(r, raw, k, exits, encoding) for k, raw in enumerate(r.get(data, "stages", "", list)))
    if len(stages) != len(exits):
        raise r.fail("stages", f"expected {len(exits)} stages (one per exit {list(exits)}), got {len(stages)}")
    for precision in sorted({p for s in stages for p in s.files}):
        lacking = [s.index for s in stages if precision not in s.files]
        if lacking:
            raise r.fail("stages", f"precision {precision!r} has no file for stage(s) {lacking}; every stage needs "
                         "a file for each precision")
    if default_precision not in stages[0].files:
        raise r.fail("default_precision", f"{default_precision!r} has no stage files; expected one of "
                     f"{', '.join(stages[0].files)}")
    full_raw = r.get(data, "full_graph", "", dict, optional=True)
    full_graph = None
    if full_raw is not None:
        layers = r.layer_range(full_raw, "full_graph")
        if layers != (0, model.num_layers):
            raise r.fail("full_graph.layers", f"expected [0, {model.num_layers}], got {list(layers)}")
        full_graph = FullGraphSpec(layers, r.str_list(full_raw, "inputs", "full_graph"),
                                   r.str_list(full_raw, "outputs", "full_graph"), r.files(full_raw, "full_graph"))
        if "score" not in full_graph.outputs:
            raise r.fail("full_graph.outputs", f"expected an output 'score', got {list(full_graph.outputs)}")
    calibration = _calibration(r, r.obj(r.get(data, "calibration", "", dict), "calibration"), exits)
    p = r.obj(r.get(data, "policy", "", dict), "policy")
    # first_stage_weight and depth are optional (absent or null = 0.0, no fusion / every candidate): manifests
    # written before them stay valid
    policy = PolicySpec(r.get(p, "name", "policy", str), float(r.get(p, "threshold", "policy", (int, float))),
                        p.get("tuned_on"),
                        float(r.get(p, "first_stage_weight", "policy", (int, float), optional=True, default=0.0)),
                        r.get(p, "depth", "policy", int, optional=True, default=None),
                        r.get(p, "fusion", "policy", str, optional=True, default="z"))
    if policy.depth is not None and policy.depth < 1:
        raise r.fail("policy.depth", f"expected an integer >= 1 (candidates reranked per query) or no field "
                     f"(every candidate), got {policy.depth!r}")
    if policy.fusion not in NORMALIZATIONS:
        raise r.fail("policy.fusion", f"expected {FUSION_EXPECTED} or no field (z), got {policy.fusion!r}")
    if policy.name not in POLICY_NAMES:
        raise r.fail("policy.name", f"expected one of {', '.join(POLICY_NAMES)}, got {policy.name!r}")
    if not 0.0 <= policy.threshold <= 1.0:
        raise r.fail("policy.threshold", f"expected a number in [0, 1], got {policy.threshold!r}")
    if not 0.0 <= policy.first_stage_weight <= 1.0:
        raise r.fail("policy.first_stage_weight", f"expected a number in [0, 1] (the weight of the first-stage "
                     f"score; 0 = no fusion), got {policy.first_stage_weight!r}")
    return Manifest(producer, model, tokenizer, layout, exits, default_precision, stages, calibration, policy,
                    full_graph, version, encoding, query_exit)


def _exits(r: _Reader, values: list[Any], num_layers: int) -> tuple[int, ...]:
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise r.fail("exits", f"expected a non-empty list of layer counts, got {values!r}")
    if values[0] < 1 or any(b <= a for a, b in itertools.pairwise(values)):
        raise r.fail("exits", f"expected strictly ascending layer counts >= 1, got {values!r}")
    if values[-1] != num_layers:
        raise r.fail("exits", f"the last exit must be model.num_layers={num_layers}, got {values!r}")
    return tuple(values)


def _stage(r: _Reader, raw: Any, k: int, exits: tuple[int, ...], encoding: str = "pair") -> StageSpec:
    where = f"stages[{k}]"
    raw = r.obj(raw, where)
    index = r.get(raw, "index", where, int)
    if index != k:
        raise r.fail(f"{where}.index", f"expected {k}, got {index}")
    if k >= len(exits):
        raise r.fail("stages", f"expected {len(exits)} stages (one per exit {list(exits)}), got more")
    layers = r.layer_range(raw, where)
    expected = (exits[k - 1] if k else 0, exits[k])
    if layers != expected:
        raise r.fail(f"{where}.layers", f"expected {list(expected)} (from exits {list(exits)}), got {list(layers)}")
    exit_layer = r.get(raw, "exit_layer", where, int)
    if exit_layer != exits[k]:
        raise r.fail(f"{where}.exit_layer", f"expected {exits[k]}, got {exit_layer}")
    inputs, outputs = r.str_list(raw, "inputs", where), r.str_list(raw, "outputs", where)
    first_inputs, state_inputs, want_out = STAGE_CONTRACTS[encoding]
    want_in = first_inputs if k == 0 else state_inputs
    if set(inputs) != set(want_in) or len(inputs) != len(want_in):
        raise r.fail(f"{where}.inputs", f"expected {list(want_in)}, got {list(inputs)}")
    if set(outputs) != set(want_out) or len(outputs) != len(want_out):
        raise r.fail(f"{where}.outputs", f"expected {list(want_out)}, got {list(outputs)}")
    comp_raw = r.get(raw, "compression", where, dict, optional=True)
    compression = None
    if comp_raw is not None:
        layer = r.get(comp_raw, "layer", f"{where}.compression", int)
        ratio = r.get(comp_raw, "ratio", f"{where}.compression", int)
        if not layers[0] < layer <= layers[1] or ratio < 2:
            raise r.fail(f"{where}.compression", f"expected layer in ({layers[0]}, {layers[1]}] and ratio >= 2, got "
                         f"{comp_raw!r}")
        compression = Compression(layer, ratio)
    cost = float(r.get(raw, "relative_cost", where, (int, float)))
    if cost <= 0:
        raise r.fail(f"{where}.relative_cost", f"expected a number > 0, got {cost!r}")
    return StageSpec(index, layers, exit_layer, inputs, outputs, r.files(raw, where), compression, cost)


def _calibration(r: _Reader, raw: dict[str, Any], exits: tuple[int, ...]) -> Calibration:
    kind = r.get(raw, "kind", "calibration", str)
    if kind not in CALIBRATION_KINDS:
        raise r.fail("calibration.kind", f"expected one of {', '.join(CALIBRATION_KINDS)}, got {kind!r}")
    in_graph = r.get(raw, "in_graph", "calibration", bool)
    per_raw = r.obj(r.get(raw, "per_exit", "calibration", dict), "calibration.per_exit")
    if sorted(per_raw) != sorted(str(e) for e in exits):
        raise r.fail("calibration.per_exit", f"expected one entry per exit {[str(e) for e in exits]}, got "
                     f"{sorted(per_raw)}")
    per_exit = {}
    for key, entry in per_raw.items():
        at = f"calibration.per_exit.{key}"
        entry = r.obj(entry, at)
        values = [float(r.get(entry, name, at, (int, float))) for name in ("scale", "bias", "residual_std")]
        if values[2] < 0:
            raise r.fail(f"{at}.residual_std", f"expected a number >= 0, got {values[2]!r}")
        per_exit[int(key)] = ExitCalibration(*values)
    return Calibration(kind, in_graph, {e: per_exit[e] for e in exits})
