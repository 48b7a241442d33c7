#!/usr/bin/env bash
# The README's test command. With no arguments: the whole suite on Python 3.11 + Pyserini 1.6 (.venv in the clone),
# then the integration tests of the reranker path on Python 3.12 + Pyserini 2.x (a venv outside the clone, built on
# first use: see scripts/_venv.sh). Arguments, if any, replace the default test paths (e.g. a file or -k EXPR) and run
# on one line only: MATRYOSHKA_PYTHON=3.12 picks the 2.x line. MATRYOSHKA_SECOND_LINE=0 skips the 3.12 pass.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# The reranker path through Pyserini's own CLIs (lucene, the shim, faiss, hybrid, trec_eval) and `matryoshka rerank`,
# what must work on both Pyserini lines, is marked `both_lines` (pyproject.toml) in integration_tests/.

run_line() {  # run_line PYTHON PYTEST-ARGS...
  local py="$1" venv
  shift
  venv="$(line_venv "$py")"
  ensure_venv "$venv" "$(line_extras "$py")" "$py"
  echo "== Python $py, Pyserini $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("pyserini"))'): pytest $*" >&2
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
}

py="${MATRYOSHKA_PYTHON:-3.11}"
if [ "$#" -gt 0 ]; then
  run_line "$py" "$@"
  exit $?
fi
status=0
run_line 3.11 tests integration_tests || status=$?
if [ "${MATRYOSHKA_SECOND_LINE:-1}" = "0" ]; then
  echo "NOTE: MATRYOSHKA_SECOND_LINE=0: the Python 3.12 + Pyserini 2.x pass was skipped" >&2
elif pick_python 3.12 >/dev/null 2>&1; then
  run_line 3.12 -m both_lines integration_tests || status=$?
else
  echo "WARNING: no Python 3.12 found: the Pyserini 2.x line was NOT tested (install Python 3.12, e.g. with pyenv)" >&2
fi
exit "$status"
