"""The bi-encoder trainer CLI on a tiny model: resume replays an uninterrupted run exactly, distillation and custom
mode, corpus mode (query-side fine-tuning against a fixed index), a saved model that loads, and bad input
(one-line errors, exit status 2, no partial output)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from matryoshka.errors import MissingInputError
from tests.fixtures.dense import (
    make_tiny_beir,
    make_tiny_dense_base,
    make_tiny_training_set,
    tiny_corpus,
    write_flat_index,
)


def train(*args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matryoshka.training.dense", *map(str, args)], check=check,
                          capture_output=True, text=True)


def encode(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matryoshka.training.dense.encode", *map(str, args)], check=False,
                          capture_output=True, text=True)


def train_error(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """The one-line error of a training run that must fail before training, run in this process (the CLI's
    ``main``, exit status 2; a subprocess per case would spend seconds importing torch each time)."""
    from matryoshka.training.dense.__main__ import main as dense_main

    capsys.readouterr()
    assert dense_main([str(a) for a in args]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def last_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {"base": make_tiny_dense_base(root / "base", "bert"), "root": root,
            "train": make_tiny_training_set(root / "train", teacher_file=root / "teacher.tsv"),
            "teacher": root / "teacher.tsv", "beir": make_tiny_beir(root / "beir")}


def test_resume_replays_the_uninterrupted_run(tiny: dict[str, Path], tmp_path: Path) -> None:
    common = ["--base_model", tiny["base"], "--normalize", "--train_sets", tiny["train"], "--group_size", 3,
              "--per_device_batch_size", 4, "--max_steps", 3, "--logging_steps", 1, "--passage_max_length", 16]
    train(*common, "--output_dir", tmp_path / "full")
    stopped = train(*common, "--output_dir", tmp_path / "resumed", "--stop_after_steps", 2, "--save_steps", 1)
    assert "stopped after step 2 of 3" in stopped.stdout
    assert not (tmp_path / "resumed" / "model").exists()
    train(*common, "--output_dir", tmp_path / "resumed", "--resume", "--save_steps", 1)
    full, resumed = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("full", "resumed"))
    assert full["weight_digests"] == resumed["weight_digests"]
    logs = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]
    saved = json.loads((tmp_path / "full" / "model" / "dense_config.json").read_text())
    assert saved["pooling"] == "mean" and saved["normalize"] and saved["passage_max_length"] == 16


def test_distillation_and_custom_mode(tiny: dict[str, Path], tmp_path: Path) -> None:
    proc = train("--base_model", tiny["base"], "--train_sets", tiny["train"], "--teacher_files", tiny["teacher"],
                 "--teacher_weight", 0.5, "--mode", "custom", "--pooling", "cls", "--group_size", 4,
                 "--per_device_batch_size", 4, "--max_steps", 2, "--logging_steps", 1, "--sub_batch_size", 5,
                 "--query_prefix", "query:", "--output_dir", tmp_path / "kd")
    assert "kl/teacher" in proc.stdout
    record = json.loads((tmp_path / "kd" / "log.jsonl").read_text().splitlines()[-1])
    assert record["terms"]["kl/teacher"] > 0 and record["terms"]["ce/contrastive"] > 0
    assert record["loss"] == pytest.approx(record["terms"]["ce/contrastive"] + 0.5 * record["terms"]["kl/teacher"],
                                           rel=1e-5)
    saved = json.loads((tmp_path / "kd" / "model" / "dense_config.json").read_text())
    assert (saved["mode"], saved["pooling"], saved["query_prefix"]) == ("custom", "cls", "query:")


def test_trainer_bad_input(tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--train_sets", tiny["train"], "--output_dir", tmp_path / "out"]
    # the command itself exits with status 2 and a one-line error
    assert "base_model=''" in last_error(train(*common, check=False))
    assert "base model config not found" in train_error(capsys, "--base_model", tmp_path / "none", *common)
    line = train_error(capsys, "--base_model", tiny["base"], "--mode", "custom", "--negatives_cross_device", *common)
    assert "negatives_cross_device=True is invalid" in line
    bad_teacher = tmp_path / "teacher.tsv"
    bad_teacher.write_text("q0\td0\t1.0\n")
    line = train_error(capsys, "--base_model", tiny["base"], "--teacher_files", bad_teacher, *common)
    assert "has no teacher score for documents" in line and str(bad_teacher) in line
    assert not (tmp_path / "out" / "model").exists()


def test_encoder_cli_bad_input_leaves_no_output(tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "faiss"
    line = last_error(encode("--model", tiny["base"], "--corpus", tiny["beir"], "--output", out))
    assert "pooling=None is invalid" in line and "dense_config.json" in line
    trap = tmp_path / "sentence-model"  # Pyserini would force mean pooling + L2 for this path
    shutil.copytree(tiny["base"], trap)
    line = last_error(encode("--model", trap, "--pooling", "cls", "--corpus", tiny["beir"], "--output", out))
    assert "without the word 'sentence'" in line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"_id": "d 1", "title": "", "text": "cat"}) + "\n")
    line = last_error(encode("--model", tiny["base"], "--pooling", "mean", "--corpus", bad, "--output", out))
    assert "document id 'd 1'" in line
    line = last_error(encode("--model", tiny["base"], "--pooling", "mean", "--corpus", tmp_path / "nothing",
                             "--output", out))
    assert "corpus file not found" in line
    assert not out.exists() and not list(tmp_path.glob(".faiss*"))


@pytest.fixture(scope="module")
def corpus_mode(tiny: dict[str, Path]) -> dict[str, Path]:
    """A dropout-free base (so the first logged loss is exactly the base model's) and a Faiss index made with it."""
    root = tiny["root"] / "corpus-mode"
    base = make_tiny_dense_base(root / "base", "bert", dropout=0.0)
    return {"base": base, "index": write_flat_index(root / "index", base)}


def test_corpus_mode_trains_the_query_encoder_against_the_fixed_index(tiny: dict[str, Path],
                                                                      corpus_mode: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    import torch

    from matryoshka.training.dense.corpus import read_faiss_vectors
    from matryoshka.training.dense.losses import corpus_loss
    from matryoshka.training.dense.modeling import BiEncoder
    from matryoshka.training.dense.pyserini_args import EncodingSpec
    from tests.fixtures.dense import tiny_queries

    base, index = corpus_mode["base"], corpus_mode["index"]
    proc = train("--base_model", base, "--normalize", "--mode", "corpus", "--passage_indexes", index,
                 "--train_sets", tiny["train"], "--group_size", 2, "--per_device_batch_size", 16, "--num_epochs", 4,
                 "--learning_rate", 1e-3, "--warmup_ratio", 0, "--similarity_temperature", 0.1, "--logging_steps", 1,
                 "--passage_max_length", 32, "--output_dir", tmp_path / "out")
    assert "ce/corpus" in proc.stdout
    logs = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    # step 1's loss is computed before any update: the base model's softmax over all 24 documents
    start = BiEncoder.build(base, pooling="mean", normalize=True)
    queries = tiny_queries(16)
    docids, vectors = read_faiss_vectors(index)
    targets = torch.zeros(16, len(docids))
    for i, query in enumerate(queries):
        targets[i, docids.index(next(iter(query.positives)))] = 1.0
    expected = corpus_loss(start.encode_texts([q.query for q in queries], "query"), vectors, targets, 0.1).mean()
    assert logs[0]["loss"] == pytest.approx(float(expected), rel=1e-4)
    assert logs[0]["terms"]["ce/corpus"] == logs[0]["loss"]
    assert logs[-1]["loss"] < logs[0]["loss"]

    model_dir = tmp_path / "out" / "model"
    saved = json.loads((model_dir / "dense_config.json").read_text())
    assert (saved["mode"], saved["passage_encoder"]) == ("corpus", "passage_encoder")
    tuned = BiEncoder.load(model_dir)
    frozen, trained = tuned.passage_model().backbone.state_dict(), tuned.backbone.state_dict()
    original = start.backbone.state_dict()
    assert all(torch.equal(frozen[k], original[k]) for k in original)
    assert not torch.equal(trained["embeddings.word_embeddings.weight"], original["embeddings.word_embeddings.weight"])
    # documents are encoded by the frozen encoder: the index still matches; queries by the trained one
    contents = [d.contents for d in tiny_corpus().values()]
    assert torch.allclose(tuned.encode_texts(contents, "passage"), vectors, atol=1e-5)
    assert not torch.allclose(tuned.encode_texts(["a b"], "query"), start.encode_texts(["a b"], "query"), atol=1e-3)
    spec = EncodingSpec.from_folder(model_dir)
    assert spec.encode_flags(8, "cpu")[:2] == ["--encoder", str(model_dir.resolve() / "passage_encoder")]
    assert spec.search_flags()[:4] == ["--encoder-class", "auto", "--encoder", str(model_dir.resolve())]
    shutil.rmtree(model_dir / "passage_encoder")
    with pytest.raises(MissingInputError, match="frozen passage encoder"):
        EncodingSpec.from_folder(model_dir)
    with pytest.raises(MissingInputError, match="frozen passage encoder"):
        BiEncoder.load(model_dir)


def test_corpus_mode_bad_input(tiny: dict[str, Path], corpus_mode: dict[str, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    base, index = corpus_mode["base"], corpus_mode["index"]
    common = ["--base_model", base, "--normalize", "--train_sets", tiny["train"], "--group_size", 2,
              "--output_dir", tmp_path / "out"]
    line = train_error(capsys, *common, "--mode", "corpus")
    assert "passage_indexes=[] is invalid" in line
    line = train_error(capsys, *common, "--passage_indexes", index)
    assert "none outside corpus mode" in line
    line = train_error(capsys, *common, "--mode", "corpus", "--passage_indexes", index, index)
    assert "one Faiss index folder per training set (1)" in line
    line = train_error(capsys, *common, "--mode", "corpus", "--passage_indexes", index, "--teacher_files",
                       tiny["teacher"])
    assert "none in corpus mode" in line
    corpus = tiny_corpus()
    del corpus["d3"]  # the positive of q3
    partial = write_flat_index(tmp_path / "partial", base, corpus)
    line = train_error(capsys, *common, "--mode", "corpus", "--passage_indexes", partial)
    assert "1 positives of training set" in line and "'d3'" in line and str(partial / "docid") in line
    other = write_flat_index(tmp_path / "other", base, prefix="red")  # documents encoded with a passage prefix
    line = train_error(capsys, *common, "--mode", "corpus", "--passage_indexes", other)
    assert "differ from the passage encoder's" in line and str(other / "index") in line
    line = train_error(capsys, *common, "--mode", "corpus", "--passage_indexes", tmp_path / "missing")
    assert "Faiss index folder not found" in line
    assert not (tmp_path / "out" / "model").exists()
