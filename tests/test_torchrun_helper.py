"""tests/_torchrun.py: a launch that fails only when pinned to loopback passes on the retry, with a warning that
carries the first failure's output; a launch that always fails raises with both tries' output."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._torchrun import torchrun

SCRIPT = '''import os, sys
sys.stdout.write(f"rank {os.environ['RANK']} pin {os.environ.get('GLOO_SOCKET_IFNAME')}\\n")  # one write: no interleave
sys.stdout.flush()
sys.exit(3 if os.environ.get("GLOO_SOCKET_IFNAME") == "lo" or "always" in sys.argv else 0)
'''


def test_retry_without_the_pin_warns_with_the_first_output(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    with pytest.warns(UserWarning, match=r"(?s)passed on a retry.*pin lo"):
        proc = torchrun(script, cwd=tmp_path)
    assert "pin None" in proc.stdout


def test_a_launch_that_always_fails_raises_with_both_outputs(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    with pytest.raises(AssertionError, match=r"(?s)torchrun failed:.*pin lo.*pin None"):
        torchrun(script, "always", cwd=tmp_path)
