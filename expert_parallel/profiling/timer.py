"""Phase timers for the MoE data path.

``NULL_TIMER`` is what a layer uses when profiling is off: its ``phase`` returns a shared
no-op context and its ``add_bytes`` does nothing, so a disabled profiler costs no
synchronisation and no collective. ``PhaseTimer`` records wall-clock intervals on CPU
and CUDA events on GPU (read later, never synchronising inside the forward).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch

PHASES = (
    "router",
    "permute",
    "count_exchange",
    "dispatch_a2a",
    "experts",
    "combine_a2a",
    "unpermute",
)

_NULL_CONTEXT = contextlib.nullcontext()


class NullTimer:
    enabled = False

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return _NULL_CONTEXT

    def add_bytes(self, name: str, sent: int, received: int) -> None:
        return None


NULL_TIMER = NullTimer()


class PhaseTimer:
    """Accumulates time and bytes per phase until :meth:`collect` is called."""

    enabled = True

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._cpu_s: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, object, object]] = []
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.bytes_received: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.calls[name] += 1
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._cpu_s[name] += time.perf_counter() - t0

    def add_bytes(self, name: str, sent: int, received: int) -> None:
        self.bytes_sent[name] += int(sent)
        self.bytes_received[name] += int(received)

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last collect (synchronises CUDA events here)."""
        seconds = dict(self._cpu_s)
        if self._events:
            torch.cuda.synchronize(self.device)
            for name, start, end in self._events:
                seconds[name] = seconds.get(name, 0.0) + start.elapsed_time(end) / 1e3  # type: ignore[attr-defined]
        self._cpu_s.clear()
        self._events.clear()
        return seconds

    def reset(self) -> None:
        self.collect()
        self.bytes_sent.clear()
        self.bytes_received.clear()
        self.calls.clear()
