"""Suite-wide hooks: pooled gloo ranks (``tests/harness.py``) are closed when the run
leaves a test folder, so the distributed tier's idle ranks do not share the two cores
with the integration tier."""

from __future__ import annotations

from tests.harness import close_pools


def pytest_runtest_teardown(item, nextitem) -> None:
    if nextitem is None or nextitem.path.parent != item.path.parent:
        close_pools()
