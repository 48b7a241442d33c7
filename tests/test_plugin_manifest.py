"""manifest.json schema: round trip, and the errors for tampered/missing files, tampered manifests, bad versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from matryoshka.errors import MatryoshkaError, MissingInputError
from matryoshka.layout import PairLayout
from matryoshka.plugin.manifest import (
    FIRST_STAGE_INPUTS,
    MANIFEST_NAME,
    STAGE_OUTPUTS,
    STATE_INPUTS,
    Calibration,
    ExitCalibration,
    FileSpec,
    Manifest,
    ManifestError,
    ModelInfo,
    ModelIntegrityError,
    PolicySpec,
    Producer,
    StageSpec,
    TokenizerSpec,
    load_manifest,
    sha256_file,
    write_manifest,
)

EXITS = (2, 4, 6)


def _layout() -> PairLayout:
    return PairLayout("encoder", 64, 16, 1, 0, prefix_ids=(1,), query_suffix_ids=(2,), passage_suffix_ids=(2,))


def make_folder(root: Path) -> Manifest:
    """A model folder whose 'ONNX files' are placeholder bytes: enough for the schema and hash checks."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    stages = []
    for k, exit_layer in enumerate(EXITS):
        files = {}
        for precision in ("fp32", "int8"):
            rel = f"{precision}/stage_{k + 1}.onnx"
            (root / precision).mkdir(exist_ok=True)
            (root / rel).write_bytes(f"graph {precision} {k}".encode())
            files[precision] = FileSpec.from_file(root, rel, 1e-5 if precision == "fp32" else 0.05)
        stages.append(StageSpec(k, (EXITS[k - 1] if k else 0, exit_layer), exit_layer,
                                FIRST_STAGE_INPUTS if k == 0 else STATE_INPUTS, STAGE_OUTPUTS, files,
                                None, round(2 / 6, 4)))
    manifest = Manifest(Producer(version="0.1.0"), ModelInfo("tiny", "encoder", "none", 6, 8),
                        TokenizerSpec("tokenizer.json", sha256_file(root / "tokenizer.json")), _layout().to_dict(),
                        EXITS, "int8", tuple(stages),
                        Calibration("affine", True, {e: ExitCalibration(1.0, 0.0, 0.5) for e in EXITS}),
                        PolicySpec("candidate", 0.9, None))
    write_manifest(root, manifest)
    return manifest


def _edit(root: Path, change) -> None:
    data = json.loads((root / MANIFEST_NAME).read_text())
    change(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def test_round_trip(tmp_path: Path) -> None:
    written = make_folder(tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded == written
    assert loaded.precisions == ("fp32", "int8")
    assert loaded.pair_layout() == _layout()
    assert [p.name for p in loaded.stage_paths(tmp_path)] == ["stage_1.onnx", "stage_2.onnx", "stage_3.onnx"]
    assert loaded.exit_calibration(4).residual_std == 0.5


def test_tampered_stage_file_names_file_and_both_hashes(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path)
    target = tmp_path / "int8" / "stage_2.onnx"
    target.write_bytes(b"changed")
    with pytest.raises(ModelIntegrityError) as info:
        load_manifest(tmp_path)
    message = str(info.value)
    assert str(target) in message and manifest.stages[1].files["int8"].sha256 in message
    assert sha256_file(target) in message and "re-export" in message and "\n" not in message
    # only the fp32 files are checked when only fp32 is asked for
    assert load_manifest(tmp_path, precisions=["fp32"]).exits == EXITS
    assert load_manifest(tmp_path, verify=False).exits == EXITS


def test_tampered_tokenizer(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelIntegrityError, match="tokenizer.json"):
        load_manifest(tmp_path, precisions=[])


def test_missing_file(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "fp32" / "stage_3.onnx").unlink()
    with pytest.raises(MissingInputError, match=r"stage_3\.onnx.*not found"):
        load_manifest(tmp_path)


def test_missing_folder_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="model folder"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(MissingInputError, match="manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_schema_version(tmp_path: Path, version: object) -> None:
    make_folder(tmp_path)
    _edit(tmp_path, lambda d: d.__setitem__("schema_version", version))
    with pytest.raises(ManifestError, match=f"schema_version is {version!r}, this plugin reads schema_version 1"):
        load_manifest(tmp_path)


def _set_hash(data: dict) -> None:
    data["stages"][0]["files"]["fp32"]["sha256"] = "0" * 64


@pytest.mark.parametrize(("change", "pattern"), [
    (lambda d: d.__setitem__("exits", [2, 2, 6]), "exits: expected strictly ascending"),
    (lambda d: d.__setitem__("exits", [2, 4, 5]), "last exit must be model.num_layers=6"),
    (lambda d: d["stages"][1].__setitem__("layers", [2, 5]), r"stages\[1\].layers: expected \[2, 4\]"),
    (lambda d: d["stages"][1].__setitem__("exit_layer", 3), r"stages\[1\].exit_layer: expected 4"),
    (lambda d: d["stages"].pop(), "expected 3 stages"),
    (lambda d: d["stages"][0].__setitem__("inputs", ["input_ids"]), r"stages\[0\].inputs"),
    (lambda d: d["stages"][2]["files"].__setitem__("fp64", d["stages"][2]["files"]["fp32"]), "unknown precision"),
    (lambda d: d["stages"][2]["files"].pop("int8"), "precision 'int8' has no file for stage"),
    (lambda d: d["stages"][0]["files"]["fp32"].__setitem__("path", "../x.onnx"), "relative path inside"),
    (lambda d: d.__setitem__("default_precision", "fp16"), "default_precision"),
    (lambda d: d["calibration"]["per_exit"].pop("4"), "one entry per exit"),
    (lambda d: d["policy"].__setitem__("threshold", 1.5), r"policy.threshold: expected a number in \[0, 1\]"),
    (lambda d: d["policy"].__setitem__("name", "greedy"), "policy.name"),
    (lambda d: d["policy"].__setitem__("depth", 0), r"policy.depth: expected an integer >= 1"),
    (lambda d: d["policy"].__setitem__("depth", 2.5), r"policy.depth: expected int"),
    (lambda d: d["policy"].__setitem__("depth", True), r"policy.depth: expected int"),
    (lambda d: d["model"].pop("num_layers"), "model.num_layers: required field is missing"),
    (lambda d: d["model"].__setitem__("hidden_size", "8"), "model.hidden_size: expected int"),
    (lambda d: d["layout"].__setitem__("family", "decoder"), "layout"),
    (lambda d: d["stages"][1].__setitem__("compression", {"layer": 3, "ratio": 1}),
     r"stages\[1\].compression: expected layer in \(2, 4\] and ratio >= 2"),
    (lambda d: d["stages"][1].__setitem__("compression", {"layer": 5, "ratio": 2}), r"stages\[1\].compression"),
    (_set_hash, "sha256"),
])
def test_tampered_manifest(tmp_path: Path, change, pattern: str) -> None:
    make_folder(tmp_path)
    _edit(tmp_path, change)
    with pytest.raises(MatryoshkaError, match=pattern) as info:
        load_manifest(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_depth_is_optional_and_round_trips(tmp_path: Path) -> None:
    import dataclasses

    manifest = make_folder(tmp_path)
    assert "depth" not in json.loads((tmp_path / MANIFEST_NAME).read_text())["policy"]
    assert load_manifest(tmp_path).policy.depth is None
    write_manifest(tmp_path, dataclasses.replace(manifest, policy=dataclasses.replace(manifest.policy, depth=40)))
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["policy"]["depth"] == 40
    assert load_manifest(tmp_path).policy.depth == 40


def test_invalid_json_names_line(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{\n"schema_version": 1,\n oops\n}')
    with pytest.raises(MatryoshkaError, match=r"manifest.json:3: invalid JSON"):
        load_manifest(tmp_path)


def test_write_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    manifest = make_folder(tmp_path)
    before = (tmp_path / MANIFEST_NAME).read_bytes()
    bad = Manifest(manifest.producer, manifest.model, manifest.tokenizer, manifest.layout, (2, 6),
                   manifest.default_precision, manifest.stages, manifest.calibration, manifest.policy)
    with pytest.raises(ManifestError):
        write_manifest(tmp_path, bad)
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before
