"""Dense retrieval: a bi-encoder trained with the shared training loop, saved as a Hugging Face folder that
Pyserini's dense search loads, and a corpus encoder that writes a Faiss index with Pyserini's own encoder.

- :mod:`~matryoshka.training.dense.config`: pooling / mode enums, ``dense_config.json`` sidecar;
- :mod:`~matryoshka.training.dense.modeling`: :class:`BiEncoder` (last-token / mean / [CLS] pooling, L2 norm,
  sub-batch encoding, save/load);
- :mod:`~matryoshka.training.dense.losses`: InfoNCE with in-batch / cross-device negatives, custom mode, KL
  distillation;
- :mod:`~matryoshka.training.dense.trainer`: :class:`DenseTrainer` (the shared :class:`Trainer` loop);
- :mod:`~matryoshka.training.dense.pyserini_args`: the Pyserini flags that reproduce a model's encoding;
- :mod:`~matryoshka.training.dense.encode`: ``python -m matryoshka.training.dense.encode`` (Faiss index).

Train with ``python -m matryoshka.training.dense`` (``--help`` lists the options).
"""
