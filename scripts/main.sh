#!/usr/bin/env bash
# The README's main command: create or reuse .venv (shared with scripts/test.sh) and run the main job on the
# bundled default data. Extra arguments go to `python -m matryoshka pipeline`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO"
ensure_venv "$REPO/.venv" "train,export,dev"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$REPO/.venv/bin/python" -m matryoshka bm25 "$@"
