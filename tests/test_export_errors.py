"""Bad input to the export: one clear error line and never a partial output folder; tampered exports rejected."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("torch")

from matryoshka.errors import MatryoshkaError  # noqa: E402
from matryoshka.export.__main__ import main as export_main  # noqa: E402
from matryoshka.export.checkpoint import OutputExistsError  # noqa: E402
from matryoshka.export.errors import CheckpointError, ExportValidationError  # noqa: E402
from matryoshka.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from matryoshka.export.validate import Criteria, round_up, spearman  # noqa: E402
from matryoshka.plugin.manifest import ManifestError, ModelIntegrityError, load_manifest  # noqa: E402
from tests.fixtures.exported import tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "encoder", None)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    out = tmp_path_factory.mktemp("exported") / "model"
    return export_checkpoint(checkpoint, out, ExportOptions(full_graph=False)).folder


def _copy_checkpoint(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    return copy


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


@pytest.mark.parametrize("missing", ["model.safetensors", "matryoshka_config.json", "tokenizer.json"])
def test_incomplete_checkpoint_fails_before_any_output(checkpoint: Path, tmp_path: Path, missing: str) -> None:
    ckpt = _copy_checkpoint(checkpoint, tmp_path)
    (ckpt / missing).unlink()
    out = tmp_path / "out" / "model"
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")) as info:
        export_checkpoint(ckpt, out)
    assert "\n" not in str(info.value) and "LayerwiseReranker.save" in str(info.value)
    assert not out.exists() and _leftovers(out.parent) == []


def test_unsupported_family_is_rejected(checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(checkpoint, tmp_path)
    config = json.loads((ckpt / "matryoshka_config.json").read_text())
    config["family"] = "seq2seq"
    (ckpt / "matryoshka_config.json").write_text(json.dumps(config))
    out = tmp_path / "model"
    with pytest.raises(CheckpointError, match=r"family='seq2seq' is not supported: expected one of"):
        export_checkpoint(ckpt, out)
    assert not out.exists()


def test_missing_checkpoint_folder_and_bad_opset(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        export_checkpoint(tmp_path / "nope", tmp_path / "model")
    with pytest.raises(MatryoshkaError, match="--opset 13 is invalid: expected >= 17"):
        export_checkpoint(checkpoint, tmp_path / "model", ExportOptions(opset=13))
    with pytest.raises(MatryoshkaError, match="--opset 99 is invalid: expected >= 17 and <= "):
        export_checkpoint(checkpoint, tmp_path / "model", ExportOptions(opset=99))
    assert _leftovers(tmp_path) == []


def test_existing_output_is_kept_without_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_checkpoint(checkpoint, out)
    assert _leftovers(out) == ["keep.txt"] and _leftovers(tmp_path) == ["model"]


def test_failed_validation_leaves_no_partial_output(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    options = ExportOptions(full_graph=False, criteria={"fp32": Criteria(max_atol=1e-12)})
    with pytest.raises(ExportValidationError, match=r"fp32/stage_1\.onnx: score differs from PyTorch by .* > "
                                                    r"allowed 1e-12"):
        export_checkpoint(checkpoint, out, options)
    assert _leftovers(tmp_path) == []


def test_failed_validation_keeps_the_previous_folder_with_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    options = ExportOptions(full_graph=False, overwrite=True, criteria={"fp32": Criteria(max_atol=1e-12)})
    with pytest.raises(ExportValidationError):
        export_checkpoint(checkpoint, out, options)
    assert _leftovers(out) == ["old.txt"] and _leftovers(tmp_path) == ["model"]


def test_cli_reports_one_line_and_status_2(checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "model"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "checkpoint folder not found" in err and len(err.splitlines()) == 1
    (tmp_path / "model").mkdir()
    assert export_main([str(checkpoint), str(tmp_path / "model"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_tampered_stage_file_is_rejected_naming_file_and_hash(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    manifest = load_manifest(copy)
    spec = manifest.stages[1].files["fp32"]
    with open(copy / spec.path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelIntegrityError) as info:
        load_manifest(copy, verify=True)
    message = str(info.value)
    assert spec.path in message and spec.sha256 in message and "\n" not in message
    load_manifest(copy, verify=False)  # the schema itself is still fine


def test_tampered_manifest_is_rejected(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    data = json.loads((copy / "manifest.json").read_text())
    real = data["stages"][0]["files"]["fp32"]["sha256"]
    data["stages"][0]["files"]["fp32"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ModelIntegrityError) as info:
        load_manifest(copy, verify=True)
    assert "stage_1.onnx" in str(info.value) and "0" * 64 in str(info.value) and real in str(info.value)
    data["stages"][0]["layers"] = [0, 3]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"stages\[0\]\.layers"):
        load_manifest(copy, verify=False)


def test_int8_mode_is_checked_and_auto_keeps_the_reported_mode(checkpoint: Path, tmp_path: Path) -> None:
    from matryoshka.export.spec import stage_specs
    from matryoshka.export.variants import INT8_MODES, quantize_int8
    from matryoshka.plugin.manifest import sha256_file

    with pytest.raises(MatryoshkaError, match="--int8-mode per-row is invalid: expected auto or one of"):
        export_checkpoint(checkpoint, tmp_path / "bad", ExportOptions(int8=True, int8_mode="per-row"))
    assert _leftovers(tmp_path) == []
    result = export_checkpoint(checkpoint, tmp_path / "model", ExportOptions(int8=True, full_graph=False))
    kept = result.int8_modes["int8"]
    assert kept in INT8_MODES
    assert sorted(p.name for p in result.folder.iterdir()) == ["fp32", "int8", "manifest.json", "tokenizer.json"]
    manifest = load_manifest(result.folder)
    for spec, stage in zip(stage_specs(manifest.exits), manifest.stages, strict=True):
        for mode in INT8_MODES:
            again = quantize_int8(result.folder / stage.files["fp32"].path, tmp_path / mode / f"{spec.name}.onnx",
                                  spec, mode=mode)
            assert (sha256_file(again) == stage.files["int8"].sha256) == (mode == kept)


def test_round_up_and_spearman() -> None:
    assert round_up(3.812e-6) == pytest.approx(3.9e-6)
    assert round_up(0.2) == pytest.approx(0.2)
    assert round_up(0.0) == 1e-7
    assert round_up(0.1591) == pytest.approx(0.16)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
