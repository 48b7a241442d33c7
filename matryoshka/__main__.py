"""``python -m matryoshka <command>``: one entry point for the project's command-line tools.

Each command lives in its own module with ``main(argv=None) -> int``; they are imported only when chosen, so
``rerank`` never pulls in torch. The table names those modules as data (dotted paths for :mod:`importlib`), so the
dispatcher itself imports none of ``matryoshka.plugin``, ``matryoshka.export`` or ``matryoshka.training``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "bm25": ("matryoshka.plugin.bm25_cli", "index a BEIR folder, run Pyserini BM25 on a split and evaluate it"),
    "pipeline": ("matryoshka.plugin.pipeline_cli",
                 "BM25 + the matryoshka cascade on a BEIR split: run file, table, plot"),
    "rerank": ("matryoshka.plugin.rerank_cli", "rerank an existing TREC run with the matryoshka cascade"),
    "tune": ("matryoshka.plugin.tune_cli", "pick the policy and threshold on a dev split, store it in the manifest"),
    "train": ("matryoshka.training.__main__", "train a layer-wise (matryoshka) reranker"),
    "export": ("matryoshka.export.__main__", "export a checkpoint to ONNX stages and a manifest"),
}


def usage() -> str:
    lines = ["usage: python -m matryoshka <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_module, help_text) in COMMANDS.items()]
    lines += ["", "Run 'python -m matryoshka <command> --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
