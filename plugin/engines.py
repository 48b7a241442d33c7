"""Where :meth:`~matryoshka.plugin.api.MatryoshkaReranker.rerank_run` runs its queries: the one registry of engines,
read by the API's ``engine=`` argument and by ``python -m matryoshka rerank --engine``.

An engine takes the run as a stream of :class:`QueryTask` (one query each, texts already fetched and checked on the
caller's side) and returns ``{qid: {docid: score}}`` in the stream's order. Each task is reranked by
``MatryoshkaReranker._rerank_query``, the same code path whatever the engine, so the engines' run files are
identical. ``local`` runs them in this process; ``ray`` on a pool of Ray actors (:mod:`matryoshka.plugin.ray_engine`,
imported only when chosen: Ray is the optional extra ``[ray]``). Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from matryoshka.errors import MatryoshkaError, OptionError

if TYPE_CHECKING:
    from matryoshka.plugin.api import MatryoshkaReranker

DEFAULT_ENGINE = "local"

Reranked = dict[str, dict[str, float]]


@dataclass(frozen=True)
class QueryTask:
    """One query of a run, ready to score: its candidates in ranked order, the texts of those above the depth, the
    first-stage scores (None for bare docids) and the depth (None = all). Picklable: it is what a Ray task carries."""

    qid: str
    query: str
    docids: list[str]
    texts: list[str]
    first_stage: list[float] | None
    depth: int | None

    @property
    def pairs(self) -> int:
        return len(self.texts)


class MissingExtraError(MatryoshkaError):
    """An engine was asked for whose optional dependencies are not installed."""


@dataclass(frozen=True)
class Engine:
    """One engine: ``function`` is ``"module:name"``, called ``function(reranker, tasks, total, progress,
    **options)``; ``options`` are the keyword options it accepts (the CLI flag of each in ``flags``)."""

    name: str
    description: str
    function: str
    options: tuple[str, ...] = ()
    flags: Mapping[str, str] | None = None
    #: (import name, pip extra) the engine needs, checked before any work
    needs: tuple[str, str] | None = None
    #: ``"module:name"`` of ``check(threads=..., **options)``: the options checked before any work (None: none)
    preflight: str | None = None

    def _function(self, dotted: str) -> Callable[..., Any]:
        module, name = dotted.split(":")
        return getattr(importlib.import_module(module), name)

    def load(self) -> Callable[..., Reranked]:
        """The engine's function; :class:`MissingExtraError` (one line: the pip command) when its extra is absent."""
        if self.needs is not None:
            module_name, extra = self.needs
            try:
                importlib.import_module(module_name)
            except ImportError:
                raise MissingExtraError(f"--engine {self.name} needs the {extra} extra: pip install "
                                        f"'pyserini-matryoshka[{extra}]'") from None
        return self._function(self.function)

    def prepare(self, options: Mapping[str, Any], threads: int | None = None) -> None:
        """Before the model is loaded or the run read: the extra is installed, every option is one of this
        engine's, and the engine's own checks pass (the Ray cluster answers)."""
        check_engine_options(self, options)
        self.load()
        if self.preflight is not None:
            self._function(self.preflight)(threads=threads, **{k: v for k, v in options.items() if v is not None})


ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("local", "this process, one query after another", "matryoshka.plugin.engines:rerank_local"),
    Engine("ray", "a pool of Ray actors (local Ray, or a cluster with --ray-address), one query per task",
           "matryoshka.plugin.ray_engine:rerank_ray", options=("address", "workers", "on_result"),
           flags={"address": "--ray-address", "workers": "--workers"}, needs=("ray", "ray"),
           preflight="matryoshka.plugin.ray_engine:check_ray_options"),
)}


def get_engine(name: str, option: str = "engine") -> Engine:
    if name not in ENGINES:
        raise OptionError(option, name, f"one of {', '.join(ENGINES)}")
    return ENGINES[name]


def check_engine_options(engine: Engine, options: Mapping[str, Any]) -> None:
    """Options the engine does not take are refused (set ones only: None means "not given")."""
    for key, value in options.items():
        if value is not None and key not in engine.options:
            takers = [e.name for e in ENGINES.values() if key in e.options]
            flag = next((e.flags[key] for e in ENGINES.values() if e.flags and key in e.flags), key)
            raise OptionError(flag, value, f"no {flag} with engine {engine.name!r}"
                              + (f" (it is an option of --engine {', '.join(takers)})" if takers else ""))


def run_engine(name: str, reranker: MatryoshkaReranker, tasks: Iterable[QueryTask], total: int, progress: bool,
               **options: Any) -> Reranked:
    """Rerank ``tasks`` (``total`` of them) with the engine ``name``; see :func:`rerank_local` for the contract."""
    engine = get_engine(name)
    check_engine_options(engine, options)
    function = engine.load()
    return function(reranker, tasks, total, progress, **{k: v for k, v in options.items() if v is not None})


def rerank_local(reranker: MatryoshkaReranker, tasks: Iterable[QueryTask], total: int, progress: bool) -> Reranked:
    """The ``local`` engine: every task in this process, in order, into ``reranker.stats``."""
    reranked: Reranked = {}
    for task in tqdm(tasks, total=total, desc="matryoshka rerank", unit="query", disable=not progress):
        reranked[task.qid] = reranker._rerank_query(task.query, task.docids, task.texts, task.depth,
                                                    task.first_stage, task.qid)
    return reranked


def add_engine_options(parser: argparse.ArgumentParser | argparse._ActionGroup) -> None:
    """``--engine`` (choices: the registry), ``--ray-address``, ``--workers``."""
    parser.add_argument("--engine", choices=list(ENGINES), default=DEFAULT_ENGINE,
                        help="where the queries are reranked: " + "; ".join(f"{e.name}: {e.description}"
                                                                           for e in ENGINES.values())
                        + " (default: %(default)s)")
    parser.add_argument("--ray-address", metavar="ADDR", default=None,
                        help="--engine ray: the Ray cluster's head (host:port of `ray start --head`, default port "
                             "6379, or 'auto'); default: start a local Ray instance for the run")
    parser.add_argument("--workers", type=int, metavar="N", default=None,
                        help="--engine ray: reranker actors, each with --threads threads (default 1); default: as "
                             "many as the CPUs allow")


def engine_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The parsed engine options as ``run_engine`` keywords (None = not given)."""
    return {"address": ns.ray_address, "workers": ns.workers}
