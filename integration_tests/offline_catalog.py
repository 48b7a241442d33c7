"""Run a Pyserini module exactly as Pyserini ships it, with a stand-in for the network it needs at import.

``python integration_tests/offline_catalog.py MODULE ARGS...`` runs ``python -m MODULE ARGS...`` after replacing
``urllib.request.urlopen`` for https://raw.githubusercontent.com/castorini/prebuilt-indexes/... only: Pyserini 2.4
fetches its prebuilt-index catalog when ``pyserini.prebuilt_index_info`` is imported (two module-level lookups), so
on a machine without internet plain Pyserini 2.x cannot start at all. The stand-in answers each catalog URL with
records for exactly the names that module looks up at import (read from its source), and nothing else is touched:
with ``MATRYOSHKA_DISABLE_BOOTSTRAP=1`` this is "Pyserini's own" behaviour, offline.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import runpy
import sys
import urllib.request

CATALOG = "https://raw.githubusercontent.com/castorini/prebuilt-indexes/"


def eager_names() -> list[str]:
    spec = importlib.util.find_spec("pyserini.prebuilt_index_info")
    if spec is None or spec.origin is None:
        return []
    with open(spec.origin, encoding="utf-8") as f:
        return sorted(set(re.findall(r'^\s*"[^"]+":\s*\w+\["([^"]+)"\]', f.read(), re.MULTILINE)))


def main() -> None:
    real = urllib.request.urlopen
    records = [{"name": name, "description": "offline stand-in", "filename": f"{name}.tar.gz", "urls": [],
                "md5": "", "size": 0} for name in eager_names()]

    def urlopen(url: object, *args: object, **kwargs: object) -> object:
        if str(getattr(url, "full_url", url)).startswith(CATALOG):
            return io.BytesIO(json.dumps(records).encode())
        return real(url, *args, **kwargs)

    urllib.request.urlopen = urlopen
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
