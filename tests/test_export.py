"""Export of tiny random BERT and Llama rerankers: every stage and the chained cascade checked against PyTorch.

The ONNX scores are compared with ``LayerwiseReranker.forward`` (the model's own full pass, not the export's
reference code) on batches of other batch and sequence sizes than the export sample.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from matryoshka.export.__main__ import main as export_main  # noqa: E402
from matryoshka.export.pipeline import sample_batches  # noqa: E402
from matryoshka.export.reference import make_batch  # noqa: E402
from matryoshka.export.variants import MAX_IR_VERSION  # noqa: E402
from matryoshka.plugin.manifest import FIRST_STAGE_INPUTS, STAGE_OUTPUTS, STATE_INPUTS, load_manifest  # noqa: E402
from matryoshka.training.modeling import LayerwiseReranker  # noqa: E402
from tests.fixtures.exported import tiny_checkpoint, tiny_exported_model  # noqa: E402

COMPRESSION = {"layer": 2, "ratio": 2}
CASES = {
    # name: (family, compression, extra precisions, readout); the compressed encoder reads the token mean, over the
    # pooled mask after the compression layer
    "encoder": ("encoder", None, ("int8",), "token"),
    "encoder_compressed": ("encoder", COMPRESSION, ("fp16", "optimized"), "mean"),
    "decoder_compressed": ("decoder", COMPRESSION, ("int8",), "token"),
    # segment attention + cosine readout (a bi-encoder-initialised reranker)
    "encoder_segments": ("encoder", None, ("int8",), "cosine"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (model folder, checkpoint folder); the plain decoder goes through the CLI."""
    out = {}
    for name, (family, compression, extra, readout) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        folder = tiny_exported_model(root, family, compression, int8="int8" in extra, fp16="fp16" in extra,
                                     optimize="optimized" in extra, readout=readout)
        out[name] = (folder, next(root.glob("checkpoint_*")))
    root = tmp_path_factory.mktemp("decoder_cli")
    checkpoint = tiny_checkpoint(root, "decoder", None)
    assert export_main([str(checkpoint), str(root / "model"), "--quiet", "--opset", "18", "--no-full-graph",
                        "--base-model-id", "org/tiny-llama"]) == 0
    out["decoder"] = (root / "model", checkpoint)
    return out


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_chain(folder: Path, precision: str, batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    manifest = load_manifest(folder)
    feed, outputs = batch, []
    for path, stage in zip(manifest.stage_paths(folder, precision), manifest.stages, strict=True):
        sess = _session(path)
        names = [o.name for o in sess.get_outputs()]
        result = dict(zip(names, sess.run(None, {n: feed[n] for n in stage.inputs}), strict=True))
        outputs.append(result)
        feed = {n.removesuffix("_out"): v for n, v in result.items() if n.endswith("_out")}
    return outputs


def _torch_scores(checkpoint: Path, batch: dict[str, np.ndarray]) -> np.ndarray:
    model = LayerwiseReranker.load(checkpoint).eval()
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        scores = model(**tensors, compression=model.config.inference_compression)
    return scores.calibrated.numpy()


def _new_batch(folder: Path, seed: int, lengths: list[int]) -> dict[str, np.ndarray]:
    manifest = load_manifest(folder)
    vocab = 30522 if manifest.model.family == "encoder" else 300
    return make_batch(manifest.pair_layout(), lengths, vocab, seed)


@pytest.mark.parametrize("name", ["encoder", "encoder_compressed", "decoder", "decoder_compressed",
                                  "encoder_segments"])
def test_fp32_chain_matches_pytorch_forward_at_every_exit(exported: dict, name: str) -> None:
    folder, checkpoint = exported[name]
    batch = _new_batch(folder, seed=123, lengths=[1, 7, 30, 4, 11])  # batch 5, unseen lengths
    want = _torch_scores(checkpoint, batch)
    chain = _run_chain(folder, "fp32", batch)
    manifest = load_manifest(folder)
    assert len(chain) == len(manifest.exits) == want.shape[0]
    for k, (outputs, stage) in enumerate(zip(chain, manifest.stages, strict=True)):
        np.testing.assert_allclose(outputs["score"], want[k], atol=1e-4, rtol=0)
        atol = stage.files["fp32"].validated_atol
        assert atol is not None and 0 < atol <= 1e-4
    if manifest.full_graph is not None:
        sess = _session(folder / manifest.full_graph.files["fp32"].path)
        (score,) = sess.run(["score"], {n: batch[n] for n in manifest.full_graph.inputs})
        np.testing.assert_allclose(score, want[-1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["encoder_compressed", "decoder_compressed"])
def test_compression_happens_inside_the_stage_that_crosses_its_layer(exported: dict, name: str) -> None:
    folder, _ = exported[name]
    manifest = load_manifest(folder)
    layout = manifest.pair_layout()
    batch = _new_batch(folder, seed=7, lengths=[9, 21])
    seq = batch["input_ids"].shape[1]
    passage = seq - layout.query_length - layout.suffix_length
    chain = _run_chain(folder, "fp32", batch)
    lengths = [out["hidden_states_out"].shape[1] for out in chain]
    compressed = [s.index for s in manifest.stages if s.compression is not None]
    assert compressed == [1]  # exits [1, 2, 4], compression after layer 2: stage 2 runs layers [1, 2)
    assert manifest.stages[1].compression.layer == 2 and manifest.stages[1].compression.ratio == 2
    assert lengths == [seq, seq - passage // 2, seq - passage // 2]
    assert [out["attention_mask_out"].shape for out in chain][-1] == (2, seq - passage // 2)
    # the compressed stages run fewer tokens, so the stages after compression cost less per layer
    costs = [s.relative_cost for s in manifest.stages]
    assert sum(costs) == pytest.approx(1.0, abs=1e-5)
    assert costs[2] / 2 < costs[0]


def test_stage_interface_is_the_manifest_contract(exported: dict) -> None:
    for name, (folder, _) in exported.items():
        manifest = load_manifest(folder)
        for stage in manifest.stages:
            for spec in stage.files.values():
                model = onnx.load(str(folder / spec.path), load_external_data=False)
                want_inputs = FIRST_STAGE_INPUTS if stage.index == 0 else STATE_INPUTS
                assert [i.name for i in model.graph.input] == list(want_inputs), (name, spec.path)
                assert [o.name for o in model.graph.output] == list(STAGE_OUTPUTS), (name, spec.path)
                assert model.ir_version <= MAX_IR_VERSION
                opset = {o.domain: o.version for o in model.opset_import}[""]
                assert opset == (18 if name == "decoder" else 17)
                batch_dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[:2]]
                assert batch_dims == ["batch", "sequence"]


def test_int8_variants_are_quantized_and_agree_by_rank(exported: dict) -> None:
    from matryoshka.export.validate import spearman

    for name in ("encoder", "decoder_compressed"):
        folder, checkpoint = exported[name]
        manifest = load_manifest(folder)
        assert manifest.default_precision == "int8"
        batch = _new_batch(folder, seed=99, lengths=[3, 40, 12, 25, 8, 33, 17, 2, 29, 14, 6, 37])
        want = _torch_scores(checkpoint, batch)
        chain = _run_chain(folder, "int8", batch)
        for k, stage in enumerate(manifest.stages):
            ops = {n.op_type for n in onnx.load(str(folder / stage.files["int8"].path)).graph.node}
            assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
            recorded = stage.files["int8"].validated_atol
            assert recorded > stage.files["fp32"].validated_atol
            assert spearman(chain[k]["score"], want[k]) > 0.8, (name, k)


def test_fp16_and_optimized_variants(exported: dict) -> None:
    folder, checkpoint = exported["encoder_compressed"]
    manifest = load_manifest(folder)
    assert set(manifest.precisions) == {"fp32", "fp16", "optimized"}
    assert manifest.default_precision == "fp32"
    initializers = onnx.load(str(folder / manifest.stages[1].files["fp16"].path)).graph.initializer
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in initializers)
    fused = {n.op_type for n in onnx.load(str(folder / manifest.stages[1].files["optimized"].path)).graph.node}
    assert "SkipLayerNormalization" in fused
    assert not fused & {"Attention", "EmbedLayerNormalization"}  # they assume right padding (see variants.optimize)
    batch = _new_batch(folder, seed=5, lengths=[2, 19, 33])
    want = _torch_scores(checkpoint, batch)
    for precision, atol in (("optimized", 1e-4), ("fp16", 0.1)):
        chain = _run_chain(folder, precision, batch)
        for k in range(len(chain)):
            np.testing.assert_allclose(chain[k]["score"], want[k], atol=atol, rtol=0)


def test_manifest_records_calibration_and_producer(exported: dict) -> None:
    folder, checkpoint = exported["decoder_compressed"]
    manifest = load_manifest(folder)
    model = LayerwiseReranker.load(checkpoint)
    for exit_layer in manifest.exits:
        cal = manifest.exit_calibration(exit_layer)
        assert cal.scale == pytest.approx(float(model.compensation[str(exit_layer)].scale.detach()))
        assert cal.bias == pytest.approx(float(model.compensation[str(exit_layer)].bias.detach()))
    assert manifest.producer.onnxruntime == ort.__version__
    assert manifest.layout == model.config.layout
    assert (folder / manifest.tokenizer.file).read_bytes() == (checkpoint / "tokenizer.json").read_bytes()


def test_the_base_model_is_recorded_as_given(exported: dict) -> None:  # issue 16: not a scratch folder name
    assert load_manifest(exported["decoder"][0]).model.base_model == "org/tiny-llama"
    folder, checkpoint = exported["decoder_compressed"]
    assert load_manifest(folder).model.base_model == LayerwiseReranker.load(checkpoint).config.base_model


def test_sample_batches_differ_from_the_export_sample_in_batch_and_sequence() -> None:
    from matryoshka.layout import PairLayout

    layout = PairLayout("encoder", 64, 12, 2, 0, prefix_ids=(101,), query_suffix_ids=(102,),
                        passage_suffix_ids=(102,))
    sample, batches = sample_batches(layout, 30522, seed=0)
    shapes = {b["input_ids"].shape for b in batches}
    assert sample["input_ids"].shape not in shapes
    assert {s[0] for s in shapes} - {sample["input_ids"].shape[0]} == {s[0] for s in shapes}
    assert {s[1] for s in shapes} - {sample["input_ids"].shape[1]}


def test_exits_subset_and_only_int8_ship_a_small_folder_with_unchanged_scores(tmp_path: Path) -> None:
    """``--exits`` leaves an exit out (the kept exits' scores are those of the full checkpoint) and ``--only int8``
    ships int8 files only, described by the manifest, after fp32 was validated."""
    checkpoint = tiny_checkpoint(tmp_path, "encoder", None, exits=(1, 2, 4))
    out = tmp_path / "model"
    argv = [str(checkpoint), str(out), "--quiet", "--int8", "--only", "int8", "--exits", "2", "4", "--no-full-graph"]
    assert export_main(argv) == 0
    manifest = load_manifest(out, verify=True)
    assert manifest.exits == (2, 4)
    assert manifest.precisions == ("int8",) and manifest.default_precision == "int8"
    assert [s.layers for s in manifest.stages] == [(0, 2), (2, 4)]
    assert not (out / "fp32").exists() and sorted(p.name for p in (out / "int8").iterdir()) == [
        "stage_1.onnx", "stage_2.onnx"]
    assert set(manifest.calibration.per_exit) == {2, 4}
    batch = _new_batch(out, seed=7, lengths=[3, 17, 9])
    want = _torch_scores(checkpoint, batch)  # exits 1, 2, 4 of the whole checkpoint
    chain = _run_chain(out, "int8", batch)
    for k, row in ((0, 1), (1, 2)):
        got = chain[k]["score"]
        assert spearman_like(got, want[row]) > 0.9
        assert np.max(np.abs(got - want[row])) < 0.5 * np.std(want[row]) + 1e-3


def test_default_precision_names_what_the_plugin_runs(tmp_path: Path) -> None:
    """``--default-precision fp32`` keeps int8 files beside fp32 but makes fp32 the precision run by default."""
    checkpoint = tiny_checkpoint(tmp_path, "encoder", None, exits=(2, 4))
    out = tmp_path / "model"
    assert export_main([str(checkpoint), str(out), "--quiet", "--int8", "--no-full-graph",
                        "--default-precision", "fp32"]) == 0
    manifest = load_manifest(out, verify=True)
    assert manifest.precisions == ("fp32", "int8") and manifest.default_precision == "fp32"
    from matryoshka.plugin.cascade import Cascade

    assert Cascade(out).precision == "fp32" and Cascade(out, precision="int8").precision == "int8"


def spearman_like(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("argv_extra, message", [
    (["--exits", "1", "2"], "ending with"),
    (["--exits", "3", "4"], "not exits"),
    (["--only", "fp16"], "--only fp16 is invalid"),
    (["--int8", "--only", "int8", "--default-precision", "fp32"], "--default-precision fp32 is invalid"),
])
def test_bad_exits_or_only_fail_before_any_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  argv_extra: list[str], message: str) -> None:
    checkpoint = tiny_checkpoint(tmp_path, "encoder", None, exits=(1, 2, 4))
    out = tmp_path / "model"
    assert export_main([str(checkpoint), str(out), "--quiet", "--no-full-graph", *argv_extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".model*"))
