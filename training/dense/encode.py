"""``python -m matryoshka.training.dense.encode``: encode a BEIR corpus into a Faiss index with Pyserini's own
``python -m pyserini.encode`` (offline, from the local model folder), in the layout ``FaissSearcher`` reads
(``index`` + ``docid``), so ``python -m pyserini.search.faiss`` and ``python -m pyserini.search.hybrid`` search it
directly with the flags this tool prints (and records in ``dense_index.json``).

Each document is encoded as its ``title text`` (the same contents as the Lucene index and the training passages),
with the model's passage prefix, pooling and normalisation (:mod:`matryoshka.training.dense.pyserini_args`); a
model trained in ``corpus`` mode (query-side fine-tuning) encodes the corpus with its frozen passage encoder
(``<model>/passage_encoder``) and searches with its own folder.
Pyserini's progress bar is shown while it runs; the index folder appears complete or not at all, and is checked
(one vector per document, the model's dimension) before it does::

    python -m matryoshka.training.dense.encode --model runs/dense-train/model --corpus data/scifact \
        --output runs/dense/faiss-scifact
    # a plain Hugging Face folder needs its pooling:
    python -m matryoshka.training.dense.encode --model <all-MiniLM-L6-v2 dir> --pooling mean --normalize ...
    # query-side fine-tuned: its frozen passage encoder wrote the base model's index, so reuse its vectors
    python -m matryoshka.training.dense.encode --model runs/dense-query/model --corpus data/scifact \
        --reuse_index runs/dense/faiss-scifact --output runs/dense/faiss-scifact-query
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matryoshka.errors import DataFormatError, OptionError, cli_main
from matryoshka.io import atomic_directory, load_corpus
from matryoshka.pipeline import PyseriniCommandError
from matryoshka.training.dense.pyserini_args import EncodingSpec, faiss_search_args, hybrid_search_args

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
INFO_FILE = "dense_index.json"


@dataclass
class EncodeArguments:
    model: str = field(metadata={"help": "dense model folder (or a plain HF folder with --pooling)"})
    corpus: str = field(metadata={"help": "BEIR folder (corpus.jsonl inside) or a BEIR corpus.jsonl"})
    output: str = field(metadata={"help": "Faiss index folder to write (index + docid)"})
    pooling: str | None = field(default=None, metadata={"help": "last | mean | cls (plain HF folders only)"})
    normalize: bool = field(default=False, metadata={"help": "L2-normalise (plain HF folders only)"})
    query_prefix: str | None = field(default=None, metadata={"help": "query prefix (plain HF folders only)"})
    passage_prefix: str | None = field(default=None, metadata={"help": "passage prefix (plain HF folders only)"})
    max_length: int = field(default=0, metadata={"help": "passage tokens (0 = the model's passage_max_length)"})
    batch_size: int = field(default=32, metadata={"help": "documents per encoder batch"})
    device: str = field(default="cpu", metadata={"help": "torch device of the encoder (cpu, cuda:0, ...)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    skip_empty: bool = field(default=False, metadata={
        "help": "leave documents without text out of the index (default: an error naming the first one)"})
    reuse_index: str | None = field(default=None, metadata={
        "help": "an index folder of this corpus written by this command whose encoder has the same weights as this "
                "model's passage encoder (query-side fine-tuning): its vectors are reused, nothing is encoded"})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise OptionError("batch_size", self.batch_size, ">= 1")
        if self.max_length < 0:
            raise OptionError("max_length", self.max_length, ">= 0 (0 = the model's own)")


def _corpus_file(path: PathLike) -> Path:
    p = Path(path)
    return p / "corpus.jsonl" if p.is_dir() else p


def write_dense_collection(corpus_path: PathLike, out_file: PathLike, skip_empty: bool = False) -> list[str]:
    """``{"id", "text"}`` lines (text = title + text) for ``pyserini.encode --fields text``; returns the docids.
    A document without text is an error, or left out of the index with ``skip_empty`` (a warning names them)."""
    corpus = load_corpus(_corpus_file(corpus_path))
    if not corpus:
        raise DataFormatError(_corpus_file(corpus_path), None, "the corpus has no documents")
    docids, skipped = [], []
    with open(out_file, "w", encoding="utf-8") as handle:
        for doc in corpus.values():
            if not doc.docid or any(c.isspace() for c in doc.docid):
                raise DataFormatError(_corpus_file(corpus_path), None, f"document id {doc.docid!r} is empty or has "
                                      "whitespace", "Faiss docid files and TREC runs need one token per id")
            text = doc.contents.strip()
            if not text and skip_empty:
                skipped.append(doc.docid)
                continue
            if not text:
                raise DataFormatError(_corpus_file(corpus_path), None, f"document {doc.docid!r} has no text",
                                      "drop it, give it a title or text, or pass --skip_empty to leave such "
                                      "documents out of the index")
            handle.write(json.dumps({"id": doc.docid, "text": text}, ensure_ascii=False) + "\n")
            docids.append(doc.docid)
    if skipped:
        logger.warning("%d documents without text left out of the index: %s", len(skipped),
                       " ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if not docids:
        raise DataFormatError(_corpus_file(corpus_path), None, "no document has text")
    return docids


def run_streaming(module: str, args: Sequence[str]) -> None:
    """``python -m module args``, its output (progress bar) passed through to stderr; a failure raises with the
    last lines."""
    cmd = [sys.executable, "-m", module, *args]
    logger.info("running %s", " ".join(cmd))
    tail = b""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-8000:]
        code = proc.wait()
    if code != 0:
        lines = tail.decode("utf-8", "replace").replace("\r", "\n").strip().splitlines()[-12:]
        raise PyseriniCommandError(f"{module} failed with exit code {code}:\n" + "\n".join(lines))


def check_faiss_index(folder: PathLike, docids: Sequence[str], dimension: int) -> None:
    import faiss

    folder = Path(folder)
    index = faiss.read_index(str(folder / "index"))
    written = (folder / "docid").read_text(encoding="utf-8").split("\n")[:-1]
    if index.ntotal != len(docids) or written != list(docids) or index.d != dimension:
        raise PyseriniCommandError(f"{folder}: pyserini.encode wrote {index.ntotal} vectors of dimension {index.d} "
                                   f"and {len(written)} docids: expected {len(docids)} of dimension {dimension}")


def encode_corpus(spec: EncodingSpec, corpus: PathLike, output: PathLike, batch_size: int = 32,
                  device: str = "cpu", overwrite: bool = False, skip_empty: bool = False) -> Path:
    """Encode ``corpus`` with Pyserini into the Faiss index folder ``output`` (atomically); see the module doc."""
    output = Path(output)
    with atomic_directory(output, overwrite=overwrite) as tmp, \
            tempfile.TemporaryDirectory(prefix=".dense-collection-", dir=tmp.parent) as scratch:
        collection = Path(scratch) / "docs.jsonl"
        docids = write_dense_collection(corpus, collection, skip_empty)
        logger.info("encoding %d documents of %s with %s", len(docids), corpus, spec.model_dir)
        run_streaming("pyserini.encode", ["input", "--corpus", str(collection), "--fields", "text",
                                          "output", "--embeddings", str(tmp), "--to-faiss",
                                          "encoder", *spec.encode_flags(batch_size, device)])
        check_faiss_index(tmp, docids, spec.dimension)
        info = {"model": str(spec.model_dir), "passage_encoder": str(spec.passage_dir or spec.model_dir),
                "corpus": str(Path(corpus).resolve()), "documents": len(docids),
                "dimension": spec.dimension, "pooling": spec.pooling.value, "normalize": spec.normalize,
                "passage_prefix": spec.passage_prefix, "passage_max_length": spec.passage_max_length,
                "search_flags": spec.search_flags()}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return output


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from matryoshka.training.arguments import parse_arguments

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = parse_arguments((EncodeArguments,), argv, prog="python -m matryoshka.training.dense.encode")
    spec = EncodingSpec.from_folder(args.model, args.pooling, args.normalize, args.query_prefix,
                                    args.passage_prefix, args.max_length)
    if args.reuse_index:
        from matryoshka.training.dense.reuse import reuse_index

        out = reuse_index(spec, args.corpus, args.reuse_index, args.output, args.overwrite)
    else:
        out = encode_corpus(spec, args.corpus, args.output, args.batch_size, args.device, args.overwrite,
                            args.skip_empty)
    faiss_cmd = shlex.join(["python", "-m", "pyserini.search.faiss", *faiss_search_args(spec, out, "TOPICS", "RUN")])
    hybrid_cmd = shlex.join(["python", "-m", "pyserini.search.hybrid",
                             *hybrid_search_args(spec, out, "LUCENE_INDEX", "TOPICS", "RUN")])
    print(f"Faiss index written to {out}\nsearch it with:\n  {faiss_cmd}\n  {hybrid_cmd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
