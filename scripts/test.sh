#!/usr/bin/env bash
# The README's test command: create or reuse .venv (everything: runtime, training, export, dev tools) and run the
# unit and integration tests. Arguments, if any, replace the default test paths (e.g. a file or -k EXPR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO"
ensure_venv "$REPO/.venv" "train,export,bench,dev"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$#" -eq 0 ]; then set -- tests integration_tests; fi
exec "$REPO/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
