"""Build glue that pyproject.toml cannot express.

1. The design keeps ``plugin/``, ``export/`` and ``training/`` as top-level folders, but they install under one package
   root: ``matryoshka.plugin``, ``matryoshka.export``, ``matryoshka.training``. The package list is derived here from
   the folders so a new sub-package never needs a second edit.
2. ``matryoshka-pyserini.pth`` is installed at the root of site-packages (for regular and editable installs). It only
   registers a tiny import hook (stdlib only, no I/O) that adapts Pyserini when, and only when, it is imported: see
   ``matryoshka/_bootstrap.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).parent
ROOTS = {"matryoshka": "matryoshka", "plugin": "matryoshka.plugin", "export": "matryoshka.export",
         "training": "matryoshka.training"}
PTH_NAME = "matryoshka-pyserini.pth"
PTH_LINE = "import matryoshka._bootstrap as _m; _m.install()\n"


def _packages() -> list[str]:
    found = []
    for folder, name in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(HERE / folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = Path(dirpath).relative_to(HERE / folder)
                found.append(".".join([name, *rel.parts]) if rel.parts else name)
    return sorted(found)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / PTH_NAME
        target.write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH_NAME)]


class EditableWheelWithPth(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):  # noqa: ANN001 - setuptools' own signature
        # Every file in ``installation_dir`` goes into the editable wheel's root (= site-packages).
        super()._install_namespaces(installation_dir, pth_prefix)
        Path(installation_dir, PTH_NAME).write_text(PTH_LINE)


setup(
    packages=_packages(),
    package_data={"matryoshka": ["py.typed"],
                  "matryoshka.plugin": ["default_model/*.json", "default_model/*.md", "default_model/*/*.onnx"]},
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
