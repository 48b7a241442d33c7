"""The Pyserini search CLIs ``--reranker matryoshka`` attaches to: the one source of their names and of where the
reranker finds its arguments in each. A new first-stage CLI is one entry here. Imports nothing (the start-up hook
reads it at every interpreter start)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FirstStageCli:
    """One ``python -m <package>`` search CLI."""

    package: str
    #: sub-command holding ``--output``/``--topics`` ("" = the command line itself)
    run_segment: str = ""
    #: sub-command whose ``--index`` is a Lucene index with the passage texts (None: no such index, e.g. faiss)
    index_segment: str | None = None
    #: the CLI's sub-commands, which split its argument list (as its own ``__main__`` splits it)
    subcommands: tuple[str, ...] = ()

    @property
    def main_module(self) -> str:
        return f"{self.package}.__main__"

    @property
    def index_flag(self) -> str:
        return "--index" if not self.index_segment else f"{self.index_segment} --index"


FIRST_STAGES: dict[str, FirstStageCli] = {cli.package: cli for cli in (
    FirstStageCli("pyserini.search.lucene", index_segment=""),
    FirstStageCli("pyserini.search.faiss"),
    FirstStageCli("pyserini.search.hybrid", run_segment="run", index_segment="sparse",
                  subcommands=("dense", "sparse", "fusion", "run")),
)}
