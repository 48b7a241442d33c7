"""pyserini-matryoshka: a layer-wise early-exit reranker for Pyserini."""

__version__ = "0.1.0"
