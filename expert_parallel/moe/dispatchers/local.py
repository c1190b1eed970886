"""EP=1: every expert is local, so the dispatcher only sorts and combines.

It is the flat dispatcher with no process group: no collective is issued, and the one
host sync is reading the per-expert counts (the expert GEMMs need them as host ints).
"""

from __future__ import annotations

from .all_to_all import AllToAllDispatcher


def LocalDispatcher(num_experts: int, raise_on_nonfinite: bool = True) -> AllToAllDispatcher:  # noqa: N802
    """The EP=1 dispatcher (a class-like factory: same interface as the others)."""
    return AllToAllDispatcher(num_experts, None, 1, raise_on_nonfinite, name="local")


__all__ = ["LocalDispatcher"]
