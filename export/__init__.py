"""Checkpoint -> ONNX model folder: one graph per stage (between two exits) and the full-depth graph, per precision
(fp32, int8, fp16, optimized), each validated against the PyTorch model, described by ``manifest.json``.

Entry points: :func:`matryoshka.export.pipeline.export_checkpoint` and ``python -m matryoshka.export`` (the tests
build tiny exported models with ``tests/fixtures/exported.py``). Importing this package imports nothing heavy.
"""
