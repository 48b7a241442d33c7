"""Launch a 2-process CPU gloo job with ``torch.distributed.run`` for the DDP tests, on loopback.

gloo otherwise binds the address the host name resolves to, which a sandboxed CI host may not route. The free port
is picked here and may be taken in between, so a failed launch gets one more try on a new port, with gloo choosing
its interface itself (a deterministic bug fails both; a first failure that the retry fixes is reported as a
warning). A failure raises with the tail of both ranks' output, so a CI log says why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(*args: object, cwd: Path | None = None, attempts: int = 2) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if k != "GLOO_SOCKET_IFNAME"}
    base = {**inherited, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1"}
    failures: list[str] = []
    for attempt in range(attempts):
        # first try pinned to loopback; the retry lets gloo pick its interface, in case the pin is what failed
        env = {**base, "GLOO_SOCKET_IFNAME": "lo"} if attempt == 0 else base
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=900)  # a hung rendezvous must fail the test, not stall CI
        if proc.returncode == 0:
            if failures:
                warnings.warn("torchrun passed on a retry; the first try failed:\n" + failures[0], stacklevel=2)
            return proc
        failures.append(f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n"
                        f"{proc.stderr[-8000:]}")
    raise AssertionError("torchrun failed:\n" + "\n".join(failures))
