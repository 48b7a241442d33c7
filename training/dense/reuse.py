"""Reuse a corpus index instead of encoding the corpus again (``encode --reuse_index``).

A model trained in ``corpus`` mode (query-side fine-tuning) keeps its passage encoder frozen, so its document
vectors are those of the index it was trained against: only the query encoder changed. :func:`reuse_index` checks
that claim, then writes the output index folder from the existing one (same ``index`` and ``docid`` files) with the
new model's search flags in ``dense_index.json``. It refuses, naming the field and the fix, when the two would not
encode the same vectors: another corpus, pooling, normalisation, passage prefix, passage length, dimension, or
passage-encoder weights (compared tensor by tensor).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from matryoshka.errors import DataFormatError, MissingInputError, OptionError
from matryoshka.io import atomic_directory
from matryoshka.io.jsonfile import read_json_object
from matryoshka.training.dense.encode import INFO_FILE, _corpus_file, check_faiss_index
from matryoshka.training.dense.pyserini_args import EncodingSpec

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
FIX = "drop --reuse_index to encode the corpus with this model"


def read_index_info(folder: PathLike) -> dict:
    """The ``dense_index.json`` of an index folder written by ``encode`` (checked for the fields reuse needs)."""
    info_file = Path(folder) / INFO_FILE
    info = read_json_object(info_file, "dense index description",
                            "--reuse_index takes a folder written by python -m matryoshka.training.dense.encode")
    needed = ("model", "corpus", "documents", "dimension", "pooling", "normalize", "passage_prefix",
              "passage_max_length")
    missing = [k for k in needed if k not in info]
    if missing:
        raise DataFormatError(info_file, None, f"missing {missing}", "re-encode that index with this version")
    return info


def same_encoder(a: PathLike, b: PathLike) -> bool:
    """Whether two Hugging Face model folders hold the same weights (the same folder, or equal tensors)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    from transformers import AutoModel

    from matryoshka.training.dense.modeling import equal_state_dicts

    return equal_state_dicts(*(AutoModel.from_pretrained(str(p)).state_dict() for p in (a, b)))


def check_reusable(spec: EncodingSpec, corpus: PathLike, source: PathLike, info: dict) -> None:
    """Raise unless ``spec`` encodes ``corpus`` into exactly the vectors of the index ``source`` (``info``)."""
    where = Path(source) / INFO_FILE
    if _corpus_file(info["corpus"]).resolve() != _corpus_file(corpus).resolve():
        raise DataFormatError(where, None, f"the index is of corpus {info['corpus']}, not {corpus}",
                              "pass the index of this --corpus, or " + FIX)
    for name, own in (("pooling", spec.pooling.value), ("normalize", spec.normalize),
                      ("passage_prefix", spec.passage_prefix), ("passage_max_length", spec.passage_max_length),
                      ("dimension", spec.dimension)):
        if info[name] != own:
            raise OptionError("reuse_index", str(source), f"an index encoded with {name}={own!r} as {spec.model_dir} "
                              f"encodes (that one has {name}={info[name]!r}); or {FIX}")
    built_by = Path(info.get("passage_encoder") or info["model"])
    if not (built_by / "config.json").is_file():
        raise MissingInputError(built_by, "encoder that built the index",
                                f"it is needed to check the weights of {source}; or {FIX}")
    mine = spec.passage_dir or spec.model_dir
    if not same_encoder(built_by, mine):
        raise OptionError("reuse_index", str(source), f"an index built by the passage encoder of {spec.model_dir} "
                          f"({mine} differs from {built_by}, which built it); {FIX}")


def reuse_index(spec: EncodingSpec, corpus: PathLike, source: PathLike, output: PathLike,
                overwrite: bool = False) -> Path:
    """Write ``output`` from the index folder ``source`` for the model of ``spec`` (see the module doc)."""
    source, output = Path(source), Path(output)
    info = read_index_info(source)
    check_reusable(spec, corpus, source, info)
    if output.resolve() == source.resolve():
        raise OptionError("output", str(output), "another folder than --reuse_index")
    with atomic_directory(output, overwrite=overwrite) as tmp:
        for name in ("index", "docid"):
            if not (source / name).is_file():
                raise MissingInputError(source / name, "Faiss index file", "re-encode that index")
            shutil.copyfile(source / name, tmp / name)
        docids = (tmp / "docid").read_text(encoding="utf-8").split("\n")[:-1]
        if len(docids) != info["documents"]:
            raise DataFormatError(source / "docid", None, f"{len(docids)} ids, the index description says "
                                  f"{info['documents']}", "re-encode that index")
        check_faiss_index(tmp, docids, spec.dimension)
        new = {**info, "model": str(spec.model_dir), "search_flags": spec.search_flags(),
               "passage_encoder": str(spec.passage_dir or spec.model_dir), "reused_from": str(source.resolve())}
        (tmp / INFO_FILE).write_text(json.dumps(new, indent=2) + "\n", encoding="utf-8")
    logger.info("reused the %d document vectors of %s", len(docids), source)
    return output
