"""``--reranker matryoshka`` for ``python -m pyserini.search.{lucene,faiss,hybrid}``, without editing Pyserini.

The start-up hook (:mod:`matryoshka._bootstrap`) calls :func:`run` instead of Pyserini's ``__main__`` code when
``--reranker``, ``-h`` or ``--help`` is on the command line (otherwise Pyserini runs untouched). :func:`run`

* for ``-h``/``--help``: runs Pyserini's own code (it prints its help and exits), then prints the reranker options;
* with ``--reranker matryoshka``: takes the ``--reranker`` and ``--matryoshka.*`` flags out of ``sys.argv``, checks
  them and loads the model (errors stop here, before any search), points Pyserini's ``--output`` at a temporary
  file next to the real output, runs Pyserini's unchanged code on the remaining arguments, reranks that run (topics
  from Pyserini's ``--topics`` file; passage text from ``--index`` for lucene, ``--matryoshka.index`` or
  ``--matryoshka.corpus`` for faiss and hybrid, where hybrid falls back to its ``sparse --index``), writes the final
  run atomically to the real ``--output`` and deletes the temporary file in every case. With
  ``--matryoshka.first-stage-weight W`` (or a tuned weight in the manifest) Pyserini's own hit scores are the
  first-stage scores interpolated into the final scores (:mod:`matryoshka.plugin.fusion`).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from matryoshka.errors import MatryoshkaError, OptionError
from matryoshka.plugin.first_stages import FIRST_STAGES

logger = logging.getLogger(__name__)

RERANKERS = ("matryoshka",)
PREFIX = "matryoshka."
GROUP_TITLE = "reranking (pyserini-matryoshka)"


class UnknownOptionError(MatryoshkaError):
    """A ``--matryoshka.*`` flag that does not exist (a typo)."""


def define_reranker_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add ``--reranker`` and the ``--matryoshka.*`` options (as one group) to ``parser``."""
    from matryoshka.plugin.options import add_model_options

    group = parser.add_argument_group(GROUP_TITLE, "rerank Pyserini's hits with a matryoshka (early-exit) reranker; "
                                      "the final run replaces --output")
    group.add_argument("--reranker", choices=RERANKERS, default=None, help="reranker to apply to the hits")
    add_model_options(group, PREFIX)
    group.add_argument(f"--{PREFIX}index", dest="index", metavar="DIR", default=None,
                       help="Lucene index with raw documents to read passages from (faiss/hybrid; lucene uses --index)")
    group.add_argument(f"--{PREFIX}corpus", dest="corpus", metavar="FILE", default=None,
                       help="BEIR corpus.jsonl or JsonCollection .jsonl to read passages from (instead of an index)")
    return group


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="--reranker matryoshka", add_help=False, allow_abbrev=False)
    define_reranker_args(parser)
    return parser


def reranker_help() -> str:
    """The help text of the reranker options group alone (appended to Pyserini's ``--help``)."""
    parser = argparse.ArgumentParser(prog="", add_help=False, allow_abbrev=False)
    group = define_reranker_args(parser)
    formatter = parser._get_formatter()
    formatter.start_section(group.title)
    formatter.add_text(group.description)
    formatter.add_arguments(group._group_actions)
    formatter.end_section()
    return formatter.format_help()


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our flags, Pyserini's arguments). An unknown ``--matryoshka.*`` flag is an error."""
    known = {opt for action in _parser()._actions for opt in action.option_strings}
    ours, theirs = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if name == "--reranker" or name.startswith(f"--{PREFIX}"):
            if name not in known:
                raise UnknownOptionError(f"unknown option {name}: expected one of {', '.join(sorted(known))}")
            ours.append(token)
            if "=" not in token and i + 1 < len(argv):
                ours.append(argv[i + 1])
                i += 1
        else:
            theirs.append(token)
        i += 1
    return ours, theirs


def _segments(argv: list[str], fullname: str) -> list[tuple[str, list[int]]]:
    """Positions of arguments per (hybrid) subcommand, split the way Pyserini's hybrid main splits them."""
    cli = next((c for c in FIRST_STAGES.values() if fullname.startswith(c.package)), None)
    if cli is None or not cli.subcommands:
        return [("", list(range(len(argv))))]
    segments: list[tuple[str, list[int]]] = [("", [])]
    for i, token in enumerate(argv):
        if token in cli.subcommands:
            segments.append((token, []))
        else:
            segments[-1][1].append(i)
    return segments


def find_option(argv: list[str], option: str, segment: str, fullname: str) -> tuple[int, str | None] | None:
    """(position of the value, value) of ``option`` in a segment (last occurrence wins, as in argparse)."""
    found = None
    for name, positions in _segments(argv, fullname):
        if name != segment:
            continue
        for i in positions:
            token = argv[i]
            if token == option:
                found = (i + 1, argv[i + 1] if i + 1 < len(argv) else None)
            elif token.startswith(option + "="):
                found = (i, token.split("=", 1)[1])
    return found


def print_help(fullname: str, run_globals: dict[str, Any]) -> None:
    from matryoshka._bootstrap import run_original_main

    _ours, theirs = split_argv(sys.argv[1:])
    sys.argv = [sys.argv[0], *theirs]
    code: Any = 0
    try:
        run_original_main(fullname, run_globals)
    except SystemExit as exc:
        code = exc.code
    sys.stdout.flush()
    print()
    print(reranker_help(), end="")
    sys.exit(0 if code in (0, None) else code)


def run(package: str, fullname: str, run_globals: dict[str, Any]) -> None:
    """Entry point called by the start-up hook for ``python -m <package>`` (see the module docstring)."""
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print_help(fullname, run_globals)
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        rerank_search(package, fullname, run_globals)
    except MatryoshkaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT); no reranked run written", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("error: terminated (SIGTERM); no reranked run written", file=sys.stderr)
        sys.exit(143)
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):  # a signal, like KeyboardInterrupt
    """SIGTERM, raised in the main thread so that clean-up (``finally``) runs."""


def _terminate(_signum: int, _frame: object) -> None:
    raise Terminated


def sweep_stale_temporaries(final: Path) -> None:
    """Remove first-stage temporaries of ``final`` left by runs that were killed (kill -9): their pid is gone."""
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.first-stage.tmp"):
        pid = stale.name[len(final.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
                logger.info("removed %s, left by a killed run", stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rerank_search(package: str, fullname: str, run_globals: dict[str, Any]) -> None:
    from matryoshka._bootstrap import run_original_main
    from matryoshka.io.pyserini_topics import pyserini_topics, restore_qids
    from matryoshka.io.trec import read_topics
    from matryoshka.plugin.options import (
        build_reranker,
        check_outputs,
        check_source_path,
        document_source,
        rerank_file,
    )

    ours, theirs = split_argv(sys.argv[1:])
    ns = _parser().parse_args(ours)
    if ns.reranker is None:
        raise OptionError("--reranker", None, f"one of {', '.join(RERANKERS)}")
    cli = FIRST_STAGES[package]
    run_segment = cli.run_segment
    output = find_option(theirs, "--output", run_segment, fullname)
    if output is None or not output[1]:
        raise OptionError("--output", None, "an output path: with --reranker, pass --output"
                          + (f" under the '{run_segment}' sub-command" if run_segment else ""))
    fmt = find_option(theirs, "--output-format", run_segment, fullname)
    if fmt is not None and fmt[1] != "trec":
        raise OptionError("--output-format", fmt[1], "trec (the reranker reads and writes TREC runs)")
    topics = find_option(theirs, "--topics", run_segment, fullname)
    if topics is None or not topics[1] or not Path(topics[1]).is_file():
        raise OptionError("--topics", topics[1] if topics else None, "a local topics file (TSV 'qid<TAB>text' or a "
                          "BEIR queries.jsonl): "
                          "the reranker needs the query texts, and topic names are not downloaded")
    queries = read_topics(topics[1])  # checked before the search; Pyserini reads a neutral TSV copy of them
    index, index_flag = ns.index, f"--{PREFIX}index"
    if not index and not ns.corpus:
        found = None
        if cli.index_segment is not None:
            found, index_flag = find_option(theirs, "--index", cli.index_segment, fullname), cli.index_flag
        index = found[1] if found else None
        if not index:
            raise OptionError(f"--{PREFIX}index/--{PREFIX}corpus", None, "a Lucene index with raw documents or a "
                              "corpus file: a faiss index holds no passage text")
    check_source_path(index, ns.corpus, index_flag, f"--{PREFIX}corpus")
    check_outputs([("--output", output[1]), (f"--{PREFIX}stats", ns.stats)],
                  [("--topics", topics[1]), (f"--{PREFIX}corpus", ns.corpus)])
    reranker = build_reranker(ns, PREFIX)
    final = Path(output[1])
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".first-stage.tmp", dir=final.parent)
    os.close(fd)
    try:
        pos = output[0]
        theirs[pos] = tmp if theirs[pos] == output[1] else f"--output={tmp}"
        with pyserini_topics(queries, topics[1]) as (neutral, back):
            pos = topics[0]
            theirs[pos] = str(neutral) if theirs[pos] == topics[1] else f"--topics={neutral}"
            sys.argv = [sys.argv[0], *theirs]
            logger.info("first stage: %s %s", package, " ".join(theirs))
            run_original_main(fullname, run_globals)
            sys.stdout.flush()
        restore_qids(tmp, back)
        source = document_source(index, ns.corpus, index_flag, f"--{PREFIX}corpus")
        tag = f"{_first_tag(tmp)}-matryoshka"
        rerank_file(reranker, tmp, topics[1], source, final, tag, ns.depth, ns.stats,
                    run_label=f"{package} hits for --output {final}")
        print(f"matryoshka: reranked run written to {final}", file=sys.stderr)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _first_tag(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) == 6:
                return fields[5]
    return "run"
