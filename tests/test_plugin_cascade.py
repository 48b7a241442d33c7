"""The cascade runtime on a synthetic model folder (TEST FIXTURE graphs that follow the stage contract exactly):
batching and order restoration, early exits feeding the right rows on, threshold edge cases, truncation."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from matryoshka.errors import MatryoshkaError, OptionError
from matryoshka.plugin.cascade import Cascade
from matryoshka.plugin.manifest import Calibration, ExitCalibration, ModelIntegrityError, load_manifest, write_manifest
from matryoshka.plugin.policies import make_policy
from matryoshka.plugin.session import ProviderUnavailableError, resolve_providers
from tests.fixtures.synthetic_model import build_synthetic_model

DATA = Path(__file__).resolve().parent.parent / "data" / "scifact-mini"


def corpus_texts(limit: int = 120) -> list[str]:
    with (DATA / "corpus.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line)["text"] for _, line in zip(range(limit), handle, strict=False)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # compression after layer 3 (ratio 2): stage 2 shrinks the sequence axis, as a compressed export does
    return build_synthetic_model(tmp_path_factory.mktemp("synthetic"), corpus_texts(), compression=(3, 2))


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list[str], np.ndarray]:
    texts = corpus_texts()
    # passages of very different lengths (cut at 5..120 words) so batches get different sequence lengths
    passages = [" ".join(t.split()[: 5 + (i * 37) % 115]) for i, t in enumerate(texts[:60])]
    queries = ["what causes breast cancer"] * 25 + ["vitamin d and bone density"] * 20 + ["gene expression"] * 15
    groups = np.array([0] * 25 + [1] * 20 + [2] * 15)
    return queries, passages, groups


@pytest.fixture(scope="module")
def cascade(model_dir: Path) -> Cascade:
    return Cascade(model_dir, batch_size=8, threads=1)


def fixed(cascade: Cascade, pairs: tuple, layer: int | None = None) -> np.ndarray:
    queries, passages, groups = pairs
    return cascade.run(queries, passages, make_policy("fixed", None, cascade.exits, 0.9, exit_layer=layer), groups)


def test_order_is_restored_and_batching_does_not_change_scores(model_dir: Path, cascade: Cascade, pairs) -> None:
    queries, passages, groups = pairs
    reference = fixed(cascade, pairs).scores
    permutation = np.random.default_rng(1).permutation(len(queries))
    shuffled = cascade.run([queries[i] for i in permutation], [passages[i] for i in permutation],
                           make_policy("fixed", None, cascade.exits, 0.9), groups[permutation])
    np.testing.assert_allclose(shuffled.scores, reference[permutation], rtol=0, atol=1e-5)
    for batch_size in (1, 64):
        other = Cascade(model_dir, batch_size=batch_size, threads=1, verify=False)
        np.testing.assert_allclose(fixed(other, pairs).scores, reference, rtol=0, atol=1e-5)
    assert len(set(np.round(reference, 4))) > 40  # the pairs really get different scores


def test_threshold_one_reproduces_fixed_full_depth_exactly(cascade: Cascade, pairs) -> None:
    queries, passages, groups = pairs
    full = fixed(cascade, pairs)
    assert (full.exit_layer == 6).all()
    for name in ("candidate", "query", "topk"):
        result = cascade.run(queries, passages, make_policy(name, 1.0, cascade.exits, 0.5, top_k=3), groups)
        assert np.array_equal(result.scores, full.scores), name
        assert (result.exit_layer == 6).all()


def test_threshold_zero_exits_everyone_at_the_first_exit(cascade: Cascade, pairs) -> None:
    queries, passages, groups = pairs
    result = cascade.run(queries, passages, make_policy("candidate", 0.0, cascade.exits, 0.5), groups)
    assert (result.exit_layer == 2).all()
    assert np.array_equal(result.scores, fixed(cascade, pairs, 2).scores)


def test_exited_candidates_keep_the_score_of_their_exit(cascade: Cascade, pairs) -> None:
    queries, passages, groups = pairs
    per_exit = {layer: fixed(cascade, pairs, layer).scores for layer in cascade.exits}
    p = 1.0 / (1.0 + np.exp(-per_exit[2]))
    threshold = float(np.quantile(np.maximum(p, 1 - p), 0.5))  # about half exit at the first exit
    result = cascade.run(queries, passages, make_policy("candidate", threshold, cascade.exits, 0.5), groups)
    counts = np.bincount(result.exit_stage, minlength=3)
    assert counts[0] > 0 and counts[1:].sum() > 0, counts
    # the first stage sees the same batches in both runs: the exit rule holds exactly
    first = result.exit_stage == 0
    assert np.array_equal(np.maximum(p, 1 - p)[first] > threshold, np.ones(first.sum(), bool))
    assert not (np.maximum(p, 1 - p)[~first] > threshold).any()
    # later stages run on shrunk, re-chunked batches: each candidate still gets its own hidden state
    for k, layer in enumerate(cascade.exits):
        rows = result.exit_stage == k
        np.testing.assert_allclose(result.scores[rows], per_exit[layer][rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("policy", "thresholds"), [("candidate", (1.0, 0.999, 0.9, 0.6)),
                                                    # softmax over 15-25 candidates: probabilities are small
                                                    ("query", (1.0, 0.5, 0.1, 0.02)),
                                                    ("topk", (1.0, 0.999, 0.9, 0.6))])
def test_lower_threshold_means_fewer_layers(cascade: Cascade, pairs, policy: str, thresholds: tuple) -> None:
    queries, passages, groups = pairs
    means = [cascade.run(queries, passages, make_policy(policy, t, cascade.exits, 0.5, top_k=3), groups)
             .exit_layer.mean() for t in thresholds]
    assert means[0] == 6.0
    assert all(b <= a for a, b in itertools.pairwise(means)), means
    assert means[-1] < means[0], means


def test_query_policy_exits_queries_whole(cascade: Cascade, pairs) -> None:
    queries, passages, groups = pairs
    first = fixed(cascade, pairs, 2).scores
    max_prob = {}
    for g in np.unique(groups):
        s = first[groups == g]
        max_prob[int(g)] = float(np.exp(s - s.max()).max() / np.exp(s - s.max()).sum())
    low, high = sorted(max_prob.values())[:2]
    threshold = (low + high) / 2  # the query with the most peaked softmax exits at the first exit, the others not
    result = cascade.run(queries, passages, make_policy("query", threshold, cascade.exits, 0.5), groups)
    for g, prob in max_prob.items():
        stages = set(result.exit_stage[groups == g].tolist())
        assert len(stages) == 1
        assert (stages == {0}) == (prob > threshold), (g, prob, threshold, stages)
    assert len(set(result.exit_stage.tolist())) > 1


def test_long_passages_are_truncated_to_the_layout_budget(cascade: Cascade) -> None:
    budget = cascade.layout.passage_budget
    words = " ".join(corpus_texts(40)).split()
    ids = cascade.tokenizer.encode(" ".join(words), add_special_tokens=False)
    assert len(ids.ids) > 3 * budget
    cut = " ".join(words)[: ids.offsets[budget - 1][1]]  # exactly the first `budget` tokens
    long_text, short_text = " ".join(words), cut
    policy = make_policy("fixed", None, cascade.exits, 0.9)
    result = cascade.run(["cancer"] * 3, [long_text, short_text, "cancer risk"], policy)
    assert result.truncated == 1
    assert result.scores[0] == pytest.approx(result.scores[1], abs=1e-6)
    assert result.scores[0] != pytest.approx(result.scores[2], abs=1e-6)


def test_empty_call(cascade: Cascade) -> None:
    result = cascade.run([], [], make_policy("candidate", 0.5, cascade.exits, 0.5))
    assert len(result) == 0


def test_calibration_outside_the_graph_is_applied(tmp_path: Path, model_dir: Path, cascade: Cascade, pairs) -> None:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    manifest = load_manifest(folder)
    calibration = Calibration("affine", False, {e: ExitCalibration(2.0, 1.0, 0.5) for e in manifest.exits})
    write_manifest(folder, manifest.__class__(**{**manifest.__dict__, "calibration": calibration}))
    scores = fixed(Cascade(folder, batch_size=8, threads=1), pairs).scores
    np.testing.assert_allclose(scores, 2.0 * fixed(cascade, pairs).scores + 1.0, rtol=0, atol=1e-5)


def test_tampered_stage_is_refused(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    with (folder / "fp32" / "stage_2.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelIntegrityError, match=r"stage_2\.onnx: sha256 is [0-9a-f]{64} but manifest.json expects"):
        Cascade(folder)


def test_unloadable_stage_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "fp32" / "stage_1.onnx").write_bytes(b"not an onnx graph")
    with pytest.raises(MatryoshkaError, match=r"stage_1\.onnx: onnxruntime cannot load this stage"):
        Cascade(folder, verify=False)


def test_options(model_dir: Path) -> None:
    with pytest.raises(OptionError, match="batch_size=0"):
        Cascade(model_dir, batch_size=0)
    with pytest.raises(OptionError, match="threads=-1"):
        Cascade(model_dir, threads=-1)
    with pytest.raises(OptionError, match="precision='int8' is invalid: expected one of this model's precisions fp32"):
        Cascade(model_dir, precision="int8")
    with pytest.raises(OptionError, match="providers='warp'"):
        resolve_providers("warp")
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_asked_for_but_not_available() -> None:
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider was asked for but onnxruntime"):
        resolve_providers("cuda")


def test_a_stage_that_fails_at_run_time_is_one_clear_error(model_dir: Path, pairs) -> None:  # issue 17 #10
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    broken = Cascade(model_dir, threads=1)

    class Failing:
        def run(self, *_: object) -> None:
            raise ort_state.InvalidArgument("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : indices element out of data "
                                            "bounds, idx=1023 must be within the inclusive range [-512,511]\nmore")

    broken.stages[0].session = Failing()
    queries, passages, groups = pairs
    with pytest.raises(MatryoshkaError, match=r"stage_1\.onnx: onnxruntime failed on inputs .*indices element out "
                                              r"of data bounds.*max_length within the model's positions"):
        broken.run(queries, passages, make_policy("fixed", None, broken.exits, 0.9), groups)


def test_a_stage_file_that_links_outside_the_folder_is_refused(tmp_path: Path, model_dir: Path) -> None:  # #13
    folder, outside = tmp_path / "model", tmp_path / "elsewhere.onnx"
    shutil.copytree(model_dir, folder)
    stage = folder / "fp32" / "stage_2.onnx"
    shutil.move(stage, outside)
    stage.symlink_to(outside)  # the same bytes, so the sha256 matches: only the real path tells
    with pytest.raises(ModelIntegrityError, match=r"stage_2\.onnx: stage 2 fp32 file listed in manifest.json resolves"
                                                  r" to .*elsewhere.onnx, outside the model folder"):
        Cascade(folder)
    stage.unlink()
    (folder / "fp32").rename(tmp_path / "fp32-outside")
    (folder / "fp32").symlink_to(tmp_path / "fp32-outside")  # a linked sub-folder escapes the same way
    with pytest.raises(ModelIntegrityError, match="outside the model folder"):
        Cascade(folder)
