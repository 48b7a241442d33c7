"""Training side of pyserini-matryoshka: the layer-wise reranker model, compression, losses, compensation, data and
the training loop. Import the submodules (``matryoshka.training.modeling`` etc.); this package imports nothing heavy.
"""
