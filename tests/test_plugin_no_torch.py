"""The plugin runtime, API and CLIs must not import torch or transformers (onnxruntime + tokenizers + numpy)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import matryoshka.plugin.manifest, matryoshka.plugin.cascade, matryoshka.plugin.policies, matryoshka.plugin.session
import matryoshka.plugin.stats, matryoshka.plugin.docs, matryoshka.plugin.api, matryoshka.plugin.options
import matryoshka.plugin.rerank_cli, matryoshka.plugin.pyserini_cli
from matryoshka.plugin.pyserini_cli import reranker_help
assert "--matryoshka.model" in reranker_help()
assert "onnxruntime" in sys.modules and "tokenizers" in sys.modules
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("heavy:", heavy)
sys.exit(1 if heavy else 0)
"""


def test_runtime_imports_neither_torch_nor_transformers() -> None:
    proc = subprocess.run([sys.executable, "-c", CODE], check=True, capture_output=True, text=True)
    assert proc.stdout.strip() == "heavy: []"


def test_rerank_cli_runs_without_torch() -> None:
    code = ("import runpy, sys\nsys.argv = ['matryoshka', 'rerank', '--help']\n"
            "try:\n    runpy.run_module('matryoshka', run_name='__main__')\nexcept SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "--matryoshka" not in proc.stdout and "--threshold" in proc.stdout and "--corpus" in proc.stdout
