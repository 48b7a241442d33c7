"""benchmarks/equal_depth.py's stage hand-off clock: the wrapped function's result and errors pass through, its wall
time is added every call, and the functions it wraps exist on the runtime (a rename would silently time nothing)."""

from __future__ import annotations

import time

import pytest

from benchmarks import equal_depth
from matryoshka.plugin.cascade import Cascade, _QueryStates


def test_timed_adds_wall_time_and_passes_results_and_errors_through() -> None:
    total = [0.0]

    def slow(x: int, *, y: int) -> int:
        time.sleep(0.02)
        if x < 0:
            raise ValueError("negative")
        return x + y

    timed = equal_depth._timed(slow, total)
    assert timed(1, y=2) == 3
    first = total[0]
    assert first >= 0.02
    with pytest.raises(ValueError, match="negative"):
        timed(-1, y=0)
    assert total[0] >= first + 0.02


def test_the_hand_off_functions_exist() -> None:
    methods = equal_depth.handoff_methods()
    assert {owner for owner, _ in methods} == {Cascade, _QueryStates}
    for owner, name in methods:
        assert callable(getattr(owner, name))
