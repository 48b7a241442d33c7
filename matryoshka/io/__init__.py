"""Strict, atomic readers and writers for the files IR pipelines exchange."""

from matryoshka.io.atomic import atomic_directory, atomic_write
from matryoshka.io.beir import BeirDataset, Document, load_beir, load_corpus, write_jsonl_collection
from matryoshka.io.trec import (
                                Run,
                                RunEntry,
                                read_qrels,
                                read_run,
                                read_topics,
                                sort_hits,
                                write_run,
                                write_topics,
                                write_trec_qrels,
)

__all__ = ["BeirDataset", "Document", "Run", "RunEntry", "atomic_directory", "atomic_write", "load_beir",
           "load_corpus", "read_qrels", "read_run", "read_topics", "sort_hits", "write_jsonl_collection",
           "write_run", "write_topics", "write_trec_qrels"]
