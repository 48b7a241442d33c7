#!/usr/bin/env bash
# The README's test command: create or reuse .venv (everything: runtime, training, export, dev tools) and run the
# unit and integration tests. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO"
ensure_venv "$REPO/.venv" "train,export,dev"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$REPO/.venv/bin/python" -m pytest tests integration_tests -q -p no:cacheprovider "$@"
