#!/usr/bin/env bash
# Issue 16's behaviour check: `matryoshka rerank` and `matryoshka tune --dry-run` outputs of the code before the
# refactor and of the working tree, on the same model folder and inputs, compared byte for byte.
#   pass A: 7c07338 (parent of the first issue-16 commit) with the model it shipped (pair encoding, exits 3 4 6)
#   pass B: 9ae920a (before the last issue-16 commits; the first with segment encoding) with today's bundled model
# The old code runs from a git worktree through a PYTHONPATH shim that maps its folders onto `matryoshka.*`
# (asserted), in this checkout's .venv. Needs a SciFact BM25 top-100 run and index, as benchmarks/segment_eval.py
# or scripts/train_default_model.sh leave them in WORK.
# usage: bash scripts/check_refactor_identity.sh [WORK]    (default runs/recipe/work; scratch in $TMPDIR)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W=${1:-runs/recipe/work}
RUN=$W/runs/segment-eval-scifact-test-bm25-100.txt
INDEX=$(ls -d "$W"/indexes/scifact-* 2>/dev/null | head -1)
if [ ! -s "$RUN" ] || [ -z "$INDEX" ]; then
  echo "error: $W has no SciFact BM25 run ($RUN) or index: build them with" \
       "python benchmarks/segment_eval.py --datasets scifact --work $W ..., or pass the WORK folder that has them" >&2
  exit 2
fi
B=$(mktemp -d); trap 'rm -rf "$B"; git worktree prune' EXIT
head -n 1000 "$RUN" > $B/run.txt   # the first 10 queries x 100
configs=("" "--policy fixed --exit-layer FIRST" "--threshold 1.0" "--policy topk --threshold 0.8 --depth 100" "--fusion z --first-stage-weight 0.5" "--policy fixed --exit-layer 6 --depth 100")
for pass in A B; do
  if [ $pass = A ]; then C=7c07338; else C=9ae920a; fi
  O=$B/old-$pass; S=$B/shim-$pass
  rm -rf $O $S; git worktree prune
  git worktree add -f $O $C >/dev/null 2>&1 || { echo "worktree $C failed"; exit 1; }
  mkdir -p $S/matryoshka
  for f in $O/matryoshka/*; do ln -s "$f" $S/matryoshka/; done
  for d in plugin export training; do ln -s $O/$d $S/matryoshka/$d; done
  PYTHONPATH=$S .venv/bin/python -c "import os, matryoshka.plugin as p; r = os.path.realpath(p.__file__); assert r.startswith('$O/'), r" || exit 1
  if [ $pass = A ]; then MODEL=$O/plugin/default_model; else MODEL=$(pwd)/plugin/default_model; fi
  echo "== pass $pass: old code $C, model $MODEL ($(python3 -c "import json;print(json.load(open('$MODEL/manifest.json')).get('encoding','pairs'))"))"
  first=$(python3 -c "import json;print(json.load(open('$MODEL/manifest.json'))['stages'][0]['exit_layer'])")
  i=0
  for c in "${configs[@]}"; do
    i=$((i+1)); c=${c/FIRST/$first}
    for side in old new; do
      pp=""; [ $side = old ] && pp=$S
      PYTHONPATH=$pp .venv/bin/python -m matryoshka rerank --run $B/run.txt --topics $W/topics/scifact-test.tsv \
        --index $INDEX --output $B/$pass-$side-$i.txt --model $MODEL --threads 2 $c \
        2>$B/$pass-$side-$i.err || echo "rc!=0 $pass $side $i: $(tail -1 $B/$pass-$side-$i.err)"
    done
    if cmp -s $B/$pass-old-$i.txt $B/$pass-new-$i.txt && [ -s $B/$pass-new-$i.txt ]; then
      echo "rerank [$c]: identical ($(wc -l < $B/$pass-new-$i.txt) lines, sha256 $(sha256sum < $B/$pass-new-$i.txt | cut -c1-12))"
    else echo "rerank [$c]: DIFFER"; fi
  done
  for side in old new; do
    pp=""; [ $side = old ] && pp=$S
    PYTHONPATH=$pp .venv/bin/python -m matryoshka tune --model $MODEL --data data/scifact --split train --work $W \
      --queries 10 --threads 2 --dry-run --sweep-output $B/$pass-$side-sweep.json > $B/$pass-$side-tune.out 2>$B/$pass-$side-tune.err \
      || echo "tune rc!=0 $pass $side: $(tail -1 $B/$pass-$side-tune.err)"
  done
  if cmp -s $B/$pass-old-sweep.json $B/$pass-new-sweep.json && [ -s $B/$pass-new-sweep.json ]; then
    echo "tune sweep (10 train queries, dry run): identical ($(python3 -c "import json;print(len(json.load(open('$B/$pass-new-sweep.json'))['points']))") points, sha256 $(sha256sum < $B/$pass-new-sweep.json | cut -c1-12))"
  else
    # 7b34676 (issue 18) dropped the degenerate candidate@0.5 from the sweep grid on purpose: compare the rest
    python3 - $B/$pass-old-sweep.json $B/$pass-new-sweep.json <<'PY'
import json, sys
old, new = (json.load(open(p)) for p in sys.argv[1:])
drop = [p for p in old["points"] if p["policy"] == "candidate" and p["threshold"] == 0.5]
rest = [p for p in old["points"] if p not in drop]
same = rest == new["points"] and all(old[k] == new[k] for k in old if k != "points")
print(f"tune sweep: old {len(old['points'])} points, new {len(new['points'])}; without the {len(drop)} "
      f"candidate@0.5 points the old sweep is {'identical' if same else 'DIFFERENT'} to the new one")
PY
  fi
  git worktree remove --force $O
done
