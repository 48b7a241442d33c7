"""The one predicate behind every integer option check: an ``int`` (``bool`` excluded), within optional bounds."""

from __future__ import annotations


def is_int(value: object, minimum: int | None = None, maximum: int | None = None) -> bool:
    """True when ``value`` is an ``int`` but not a ``bool``, and ``minimum <= value <= maximum`` (bounds optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
