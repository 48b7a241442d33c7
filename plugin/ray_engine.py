"""The ``ray`` engine (:mod:`matryoshka.plugin.engines`): a run's queries reranked by a pool of Ray actors.

Imported only when ``--engine ray`` / ``engine="ray"`` is chosen (Ray is the optional extra ``[ray]``). Contract:

* **Cluster.** No address: a local Ray instance is started for the run and shut down after it. An address
  (``host[:port]`` of ``ray start --head``, default port 6379; ``ray://host[:port]`` for Ray Client; ``auto``): it
  must answer a TCP connect within :data:`CONNECT_TIMEOUT_S`, else :class:`RayClusterError` names it before any
  work. A Ray connection the caller opened already (``ray.init()`` before the API call) is used and left open.
* **Workers.** ``workers`` actors (default: as many as the CPUs allow), each reserving ``threads`` CPUs (the
  reranker's ``threads``, 1 when it has none) and rebuilding the reranker from ``reranker.options`` with the model
  folder verified (every file's sha256) on its own machine. A user error there, or a ``manifest.json`` that differs
  from the driver's, fails the run before any task: :class:`RayWorkerError`, one line naming the node.
* **Tasks.** One query each (:class:`~matryoshka.plugin.engines.QueryTask`), reranked by the same
  ``MatryoshkaReranker._rerank_query`` as the local engine, at most :data:`IN_FLIGHT` queued per actor (the texts
  of a huge run are never all in memory). A killed worker process is restarted (``max_restarts``) and its unfinished
  tasks run again (``max_task_retries``); tasks are idempotent and results are keyed by qid (the first result of a
  query counts), so nothing is lost or duplicated. The result comes back in the tasks' order, and each query's
  statistics are merged into ``reranker.stats`` in that order: the run file and the statistics' counts are the
  local engine's.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from tqdm import tqdm

from matryoshka.errors import USER_ERRORS, MatryoshkaError, OptionError
from matryoshka.plugin.api import MatryoshkaReranker
from matryoshka.plugin.engines import QueryTask, Reranked
from matryoshka.plugin.manifest import MANIFEST_NAME, sha256_file
from matryoshka.plugin.session import available_cpus, check_threads
from matryoshka.plugin.stats import RunStats

logger = logging.getLogger(__name__)

DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
CONNECT_TIMEOUT_S = 5.0
#: how long the workers may take to start and load the model before the run gives up
READY_TIMEOUT_S = 600.0
#: restarts of a killed worker process (and retries of its unfinished tasks) before the run fails
MAX_RESTARTS = 3
#: tasks queued per worker (one running, the next ready to start)
IN_FLIGHT = 2


class RayClusterError(MatryoshkaError):
    """The Ray cluster named by the address cannot be reached (or joined)."""


class RayWorkerError(MatryoshkaError):
    """A worker could not load the model, raised a user error, or died more often than it may be restarted."""


@dataclass(frozen=True)
class WorkerInfo:
    """One started worker: its process id and node address (as first started; a restart gets a new process)."""

    pid: int
    node: str


OnResult = Callable[[int, Sequence[WorkerInfo]], None]


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for ``address``; None for ``auto`` (Ray looks the cluster up itself)."""
    if address in ("auto", "local"):
        return None
    rest, default = address, DEFAULT_GCS_PORT
    if address.startswith("ray://"):
        rest, default = address[len("ray://"):], DEFAULT_CLIENT_PORT
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [ipv6]:port
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not host or (port and not port.isdigit()):
        raise OptionError("--ray-address", address, "host[:port] of a Ray head node (e.g. 10.0.0.1:6379), "
                          "ray://host[:port] or auto")
    return host, int(port) if port else default


def check_address(address: str | None) -> None:
    """Before any work: the head node at ``address`` accepts a TCP connection (one line naming it, else)."""
    if address is None:
        return
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise RayClusterError(f"Ray cluster at {address} cannot be reached ({target[0]}:{target[1]}: {reason} "
                              f"within {CONNECT_TIMEOUT_S:g} s); start its head with `ray start --head` (and the "
                              "workers with `ray start --address HEAD:6379`), or drop --ray-address to run on a "
                              "local Ray instance") from None


def check_ray_options(address: str | None = None, workers: int | None = None, threads: int | None = None,
                      **_: Any) -> None:
    """The engine's options, checked before the model is loaded or the run read."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise OptionError("--workers", workers, "an integer >= 1 (reranker actors)")
    check_threads(threads, "--threads")
    if address is None and workers is not None:  # a local instance has this machine's CPUs
        _check_workers(workers, threads or 1, available_cpus(), "this machine's")
    check_address(address)


def _check_workers(workers: int, threads: int, cpus: int, whose: str) -> None:
    most = cpus // threads
    if workers > most:
        raise OptionError("--workers", workers, f"at most {most} workers of {threads} thread(s) on {whose} {cpus} "
                          "CPUs (lower --workers or --threads, or add machines)")


class _Worker:
    """The actor: one reranker, built once per process (again after a restart)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.error: str | None = None
        self.manifest_sha: str | None = None
        try:
            self.reranker = MatryoshkaReranker(**options)
            self.manifest_sha = sha256_file(Path(options["model_dir"]) / MANIFEST_NAME)
        except USER_ERRORS as err:
            self.error = str(err)

    def ready(self) -> tuple[int, str, str | None, str | None]:
        return os.getpid(), ray.util.get_node_ip_address(), self.manifest_sha, self.error

    def rerank(self, task: QueryTask) -> tuple[str, dict[str, float] | None, RunStats | None, str | None]:
        if self.error is not None:
            return task.qid, None, None, self.error
        self.reranker.reset_stats()
        try:
            scores = self.reranker._rerank_query(task.query, task.docids, task.texts, task.depth, task.first_stage,
                                                 task.qid)
        except USER_ERRORS as err:
            return task.qid, None, None, str(err)
        return task.qid, scores, self.reranker.stats, None


def _connect(address: str | None) -> bool:
    """Join (or start) Ray; True when this call did, so the run must shut it down."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address is None:  # "local": a new instance, even when `ray start` or RAY_ADDRESS names another one
        kwargs["num_cpus"] = available_cpus()
    try:
        ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError, RayError) as err:  # RayError: auth token
        where = f"at {address}" if address else "(local instance)"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RayClusterError(f"Ray cluster {where} cannot be joined ({first}); check the address of the head "
                              "node (`ray status` there), its auth token (RAY_AUTH_MODE=token and the head's token in "
                              "~/.ray/auth_token or RAY_AUTH_TOKEN), or drop --ray-address") from None
    return True


def _start_workers(reranker: MatryoshkaReranker, workers: int | None, threads: int, actors: list[Any]
                   ) -> list[WorkerInfo]:
    """Start the actors (into ``actors``, so that the caller alone holds their handles) and wait until each has
    loaded and verified the model."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if workers is None:
        workers = max(cpus // threads, 1)
    _check_workers(workers, threads, cpus, "the cluster's")
    options = {**reranker.options, "threads": threads, "verify": True}
    actor_class = ray.remote(_Worker).options(num_cpus=threads, max_restarts=MAX_RESTARTS,
                                              max_task_retries=MAX_RESTARTS)
    actors.extend(actor_class.remote(options) for _ in range(workers))
    expected = sha256_file(reranker.model_dir / MANIFEST_NAME)
    try:
        states = ray.get([a.ready.remote() for a in actors], timeout=READY_TIMEOUT_S)
    except GetTimeoutError:
        raise RayWorkerError(f"{workers} Ray workers did not start within {READY_TIMEOUT_S:g} s (the cluster has "
                             f"{cpus} CPUs; check `ray status`)") from None
    infos = []
    for pid, node, sha, error in states:
        if error is not None:
            raise RayWorkerError(f"Ray worker on {node}: {error}")
        if sha != expected:
            raise RayWorkerError(f"Ray worker on {node}: {options['model_dir']}/{MANIFEST_NAME} has sha256 {sha}, "
                                 f"the driver's has {expected} (copy the same model folder to every machine)")
        infos.append(WorkerInfo(pid, node))
    logger.info("%d Ray workers (%d thread(s) each): %s", workers, threads, infos)
    return infos


def _results(actors: list[Any], tasks: Iterator[QueryTask]) -> Iterator[tuple[str, dict[str, float], RunStats]]:
    """Keep every actor's queue at :data:`IN_FLIGHT` tasks; yield each query's result once, as it arrives."""
    pending: dict[Any, tuple[Any, str]] = {}  # object ref -> (actor, qid)
    done: set[str] = set()

    def submit(actor: Any) -> None:
        task = next(tasks, None)
        if task is not None:
            pending[actor.rerank.remote(task)] = (actor, task.qid)

    for _ in range(IN_FLIGHT):
        for actor in actors:
            submit(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        actor, qid = pending.pop(ready[0])
        try:
            got_qid, scores, stats, error = ray.get(ready[0])
        except RayActorError as err:
            raise RayWorkerError(f"a Ray worker died while reranking query {qid!r} and could not be restarted "
                                 f"({MAX_RESTARTS} restarts; {type(err).__name__}); see the worker logs under "
                                 "/tmp/ray/session_latest/logs on its node") from None
        if error is not None:
            raise RayWorkerError(f"Ray worker, query {qid!r}: {error}")
        submit(actor)
        if got_qid not in done:
            done.add(got_qid)
            yield got_qid, scores, stats


def rerank_ray(reranker: MatryoshkaReranker, tasks: Iterable[QueryTask], total: int, progress: bool,
               address: str | None = None, workers: int | None = None, on_result: OnResult | None = None
               ) -> Reranked:
    """The ``ray`` engine (see the module docstring). ``on_result(done, workers)`` is called on the driver after
    each query's result arrives (with the number of queries done and the started workers)."""
    threads = reranker.options.get("threads") or 1
    check_ray_options(address, workers, threads)
    started = _connect(address)
    actors: list[Any] = []  # filled as they start: a run that fails part-way still stops every one of them
    try:
        infos = _start_workers(reranker, workers, threads, actors)
        order: list[str] = []

        def recorded(stream: Iterable[QueryTask]) -> Iterator[QueryTask]:
            for task in stream:
                order.append(task.qid)
                yield task

        results: dict[str, tuple[dict[str, float], RunStats]] = {}
        bar = tqdm(total=total, desc="matryoshka rerank (ray)", unit="query", disable=not progress,
                   file=sys.stderr)
        with bar:
            for qid, scores, stats in _results(actors, recorded(iter(tasks))):
                results[qid] = (scores, stats)
                bar.update(1)
                if on_result is not None:
                    on_result(len(results), infos)
        reranked: Reranked = {}
        for qid in order:
            scores, stats = results[qid]
            reranked[qid] = scores
            reranker.stats.merge(stats)
        return reranked
    finally:
        for actor in actors:  # on a cluster that stays up, the workers go now, not when their handles are freed
            ray.kill(actor)
        if started:
            ray.shutdown()
