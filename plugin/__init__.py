"""The plugin: manifest schema, cascade runtime (onnxruntime + tokenizers + numpy), exit policies, Python API
(:class:`matryoshka.plugin.api.MatryoshkaReranker`), ``python -m matryoshka rerank`` and ``--reranker matryoshka``
for Pyserini's search CLIs. Importing this package imports nothing else (the start-up hook relies on that)."""
