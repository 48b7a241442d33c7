#!/usr/bin/env bash
# The README's main command: create or reuse .venv (shared with scripts/test.sh), then run BM25 + the bundled default
# matryoshka cascade on the bundled SciFact test queries through Pyserini's own CLIs, print the effectiveness and
# cost table, and write the run file, its statistics and the nDCG@10-versus-cost plot under runs/pipeline/.
#
# Default depth: BM25 top-30 reranked (about 7 minutes on 2 CPU cores; the BM25 + cascade table after about 4, the
# rest is the full-depth reference pass that the table and plot compare with). Extra arguments go to `python -m
# matryoshka pipeline` and win over these defaults, e.g. `bash scripts/main.sh --hits 100` (about 40 minutes) or
# `--no-compare` (the cascade alone).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO"
py="${MATRYOSHKA_PYTHON:-3.11}"  # 3.12: Pyserini 2.x, in a venv outside the clone (scripts/_venv.sh)
venv="$(line_venv "$py")"
ensure_venv "$venv" "$(line_extras "$py")" "$py"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$venv/bin/python" -m matryoshka pipeline --hits 30 "$@"
