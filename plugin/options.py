"""Reranker options shared by ``python -m matryoshka rerank`` (``--model`` ...) and the Pyserini integration
(``--matryoshka.model`` ...), and the run-file reranking both CLIs do."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matryoshka.errors import DataFormatError, MissingInputError, OptionError
from matryoshka.io.atomic import NotRegularFileError, check_regular_target
from matryoshka.io.trec import read_run, read_topics, write_run
from matryoshka.plugin.api import MatryoshkaReranker, MissingDocumentError
from matryoshka.plugin.docs import CorpusDocs, DocumentSource, LuceneIndexDocs, check_lucene_index
from matryoshka.plugin.engines import DEFAULT_ENGINE
from matryoshka.plugin.fusion import NORMALIZATIONS, check_first_stage_weight
from matryoshka.plugin.manifest import POLICY_NAMES
from matryoshka.plugin.policies import (
    DEFAULT_TOP_K,
    POLICY_DEFAULT_THRESHOLD,
    check_depth,
    check_threshold,
    policy_help,
)
from matryoshka.plugin.session import check_threads


def add_model_options(group: argparse._ActionGroup | argparse.ArgumentParser, prefix: str = "") -> None:
    """Options of the reranker itself, as ``--{prefix}model`` etc. (dest names without the prefix)."""
    def opt(name: str, **kwargs: object) -> None:
        group.add_argument(f"--{prefix}{name}", dest=name.replace("-", "_"), **kwargs)

    opt("model", metavar="DIR", default=None,
        help="exported model folder (manifest.json + ONNX stages); default: the bundled default model")
    opt("policy", choices=POLICY_NAMES, default=None,
        help=f"early-exit policy: {policy_help(f'--{prefix}exit-layer')}; default: the model's tuned policy")
    opt("threshold", type=float, metavar="T", default=None,
        help="exit threshold in [0, 1]; 1.0 never exits early (= full depth); default: the model's tuned value "
             f"(for another policy than the tuned one: {POLICY_DEFAULT_THRESHOLD})")
    opt("first-stage-weight", type=float, metavar="W", default=None,
        help="interpolate with the first stage: final = (1-W) * n(reranker) + W * n(first-stage score), "
             f"normalised per query by --{prefix}fusion; W in [0, 1], 0 = reranker scores only; default: the "
             "model's tuned value (manifest policy.first_stage_weight, 0 if absent)")
    opt("fusion", choices=list(NORMALIZATIONS), default=None,
        help="per-query normalisation n of that interpolation: z (mean 0, std 1) or minmax (to [0, 1]); default: "
             "the model's (manifest policy.fusion, z if absent)")
    opt("depth", type=int, metavar="N", default=None,
        help="rerank only the top N candidates of each query; the rest keep their order below; 0 = all "
             "(default: the model's tuned depth, manifest policy.depth; all when it has none)")
    opt("top-k", type=int, metavar="K", default=DEFAULT_TOP_K, help="K of the topk policy (default: %(default)s)")
    opt("exit-layer", type=int, metavar="L", default=None,
        help="exit layer of the fixed policy (one of the model's exits; default: the last = full depth)")
    opt("precision", metavar="NAME", default=None,
        help="which stage files to run (e.g. fp32, int8; default: the manifest's default_precision)")
    opt("batch-size", type=int, metavar="N", default=32,
        help="pairs per batch (default: %(default)s; int8 stages always run one pair per call)")
    opt("threads", type=int, metavar="N", default=None,
        help="onnxruntime intra-op threads (default: onnxruntime's choice)")
    opt("providers", metavar="LIST", default="cpu",
        help="onnxruntime execution providers, e.g. cpu or cuda,cpu (default: %(default)s)")
    opt("stats", metavar="FILE", default=None,
        help="also write the run statistics (exit histogram, mean layers, cost, speed) as JSON to FILE")


def build_reranker(ns: argparse.Namespace, prefix: str = "") -> MatryoshkaReranker:
    """A reranker from parsed options; option errors name the command-line flag."""
    if ns.threshold is not None:
        check_threshold(ns.threshold, option=f"--{prefix}threshold")
    if ns.first_stage_weight is not None:
        check_first_stage_weight(ns.first_stage_weight, option=f"--{prefix}first-stage-weight")
    check_depth(ns.depth, option=f"--{prefix}depth")
    check_threads(ns.threads, option=f"--{prefix}threads")
    for name, minimum in (("batch_size", 1), ("top_k", 1)):
        value = getattr(ns, name)
        if value is not None and value < minimum:
            raise OptionError(f"--{prefix}{name.replace('_', '-')}", value, f"an integer >= {minimum}")
    if ns.model is not None and not Path(ns.model).is_dir():
        raise MissingInputError(ns.model, "model folder", f"--{prefix}model must be an exported model folder "
                                "(with manifest.json)")
    try:
        return MatryoshkaReranker(ns.model, policy=ns.policy, threshold=ns.threshold, providers=ns.providers,
                                  threads=ns.threads, batch_size=ns.batch_size, precision=ns.precision,
                                  top_k=ns.top_k, exit_layer=ns.exit_layer,
                                  first_stage_weight=ns.first_stage_weight, depth=ns.depth, fusion=ns.fusion)
    except OptionError as err:
        if err.option in ("exit_layer", "precision", "providers"):
            raise OptionError(f"--{prefix}{err.option.replace('_', '-')}", err.value,
                              str(err).split("expected ", 1)[-1]) from None
        raise


def document_source(index: str | None, corpus: str | None, index_flag: str, corpus_flag: str) -> DocumentSource:
    if index and corpus:
        raise OptionError(f"{index_flag}/{corpus_flag}", f"{index} and {corpus}", "only one document source")
    if corpus:
        return CorpusDocs(corpus)
    if index:
        return LuceneIndexDocs(index)
    raise OptionError(f"{index_flag}/{corpus_flag}", None, f"a Lucene index with stored raw documents "
                      f"({index_flag} DIR) or a corpus file ({corpus_flag} FILE) to read passage texts from")


def check_source_path(index: str | None, corpus: str | None, index_flag: str, corpus_flag: str) -> None:
    """Fail early (before any search) when a document source path does not exist."""
    if index:
        check_lucene_index(Path(index), f"{index_flag} must be a local index built with -storeRaw")
    if corpus and not Path(corpus).exists():
        raise MissingInputError(corpus, "corpus file", f"{corpus_flag} must be a BEIR corpus.jsonl or a Pyserini "
                                "JsonCollection .jsonl")


def check_outputs(outputs: Sequence[tuple[str, str | os.PathLike[str] | None]],
                  inputs: Sequence[tuple[str, str | os.PathLike[str] | None]]) -> None:
    """Before any search or rerank: every output (flag, path) is a regular file or new, in a folder that is (or can
    be made) writable, and resolves to no input and to no other output. One :class:`OptionError` names the flag."""
    seen: dict[str, str] = {os.path.realpath(path): flag for flag, path in inputs if path}
    for flag, path in outputs:
        if not path:
            continue
        target = Path(path)
        try:
            check_regular_target(target)
        except NotRegularFileError as err:
            raise OptionError(flag, str(path), f"a regular file or a new path ({err})") from None
        ancestor = target.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OptionError(flag, str(path), f"a path in a folder, but {ancestor} is a file")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise OptionError(flag, str(path), f"a path in a writable folder ({ancestor} is not writable)")
        real = os.path.realpath(target)
        if real in seen:
            raise OptionError(flag, str(path), f"a path of its own: it is also {seen[real]} (it would be "
                              "overwritten)")
        seen[real] = flag


def _line_of(run_path: str | os.PathLike[str], qid: str, docid: str | None = None) -> int | None:
    with open(run_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if len(fields) >= 3 and fields[0] == qid and (docid is None or fields[2] == docid):
                return number
    return None


def rerank_file(reranker: MatryoshkaReranker, run_path: str | os.PathLike[str],
                topics_path: str | os.PathLike[str], source: DocumentSource, output: str | os.PathLike[str],
                tag: str, depth: int | None, stats_path: str | os.PathLike[str] | None,
                run_label: str | None = None, engine: str = DEFAULT_ENGINE,
                engine_options: Mapping[str, Any] | None = None) -> None:
    """Rerank a TREC run file and write the result atomically (then the statistics JSON, if asked for).
    ``run_label`` replaces the run's path in error messages (the Pyserini integration reads a temporary file);
    ``engine`` / ``engine_options``: where the queries run (:mod:`matryoshka.plugin.engines`)."""
    if not tag or any(ch.isspace() for ch in tag):
        raise OptionError("--tag", tag, "a non-empty word without spaces")
    run = read_run(run_path)
    topics = read_topics(topics_path)
    for qid in run.queries:
        if qid not in topics:
            raise DataFormatError(run_label or run_path, _line_of(run_path, qid), f"query {qid!r} is not in the "
                                  f"topics file {topics_path}", "pass the topics the run was made from")
    try:
        reranked = reranker.rerank_run(run, topics, source, depth=depth, progress=True, engine=engine,
                                       **(engine_options or {}))
    except MissingDocumentError as err:
        raise DataFormatError(run_label or run_path, _line_of(run_path, err.qid, err.docid),
                              f"document {err.docid!r} of query {err.qid!r} is not in {source.describe()}",
                              "pass the index/corpus the run was retrieved from") from None
    write_run(output, reranked, tag)
    print(reranker.stats.summary(), file=sys.stderr)
    if stats_path:
        reranker.stats.write_json(stats_path)
