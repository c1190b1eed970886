"""The launcher's host allocator (training/host_memory.py), under torchrun.

``auto`` re-executes each worker with jemalloc preloaded when the library is installed
(``.ci/run`` installs libjemalloc2), before the rendezvous; ``glibc`` keeps the system
allocator. Rank 0 records what its process actually runs on (read from /proc/self/maps)
in summary.json, and the run must train as usual either way.
"""

from __future__ import annotations

import ctypes.util

import pytest

from expert_parallel.training import host_memory
from expert_parallel.training.config import TrainConfig
from tests.integration.launcher import losses, summary, torchrun


def test_auto_runs_the_workers_on_jemalloc_when_installed(tmp_path) -> None:
    torchrun(2, tmp_path, "--ep-size", "2", "--max-steps", "2")
    want = "jemalloc" if ctypes.util.find_library("jemalloc") else "glibc"
    assert summary(tmp_path)["host_allocator"] == want
    assert sorted(losses(tmp_path)) == [1, 2]


def test_glibc_choice_keeps_the_system_allocator_and_the_same_losses(tmp_path) -> None:
    auto, glibc = tmp_path / "auto", tmp_path / "glibc"
    torchrun(2, auto, "--ep-size", "2", "--max-steps", "2")
    torchrun(2, glibc, "--ep-size", "2", "--max-steps", "2", "--host-allocator", "glibc")
    assert summary(glibc)["host_allocator"] == "glibc"
    assert losses(auto) == losses(glibc)  # the allocator changes memory, never numbers


def test_bad_allocator_choices_are_named(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"host_allocator must be one of .* got 'jemalloc5'"):
        TrainConfig(host_allocator="jemalloc5")
    # An explicit library that is not installed is an error naming the package;
    # auto falls back to the system allocator.
    monkeypatch.setattr(host_memory, "_library", lambda name: None)
    with pytest.raises(ValueError, match=r"host_allocator='tcmalloc': libtcmalloc_minimal is not "
                                         r"installed .*apt-get install libtcmalloc-minimal4"):
        TrainConfig(host_allocator="tcmalloc")
    assert host_memory.select_allocator("auto") in ("glibc", "jemalloc", "tcmalloc")
