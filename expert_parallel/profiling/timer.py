"""Phase timers for the MoE data path, forward and backward.

``NULL_TIMER`` is what a layer uses when profiling is off: its ``phase`` returns a shared
no-op context, its ``add_bytes`` does nothing and its ``mark`` returns the tensor itself
(no autograd node), so a disabled profiler costs no synchronisation, no collective and
no extra graph node. ``PhaseTimer`` records wall-clock intervals on CPU and CUDA events
on GPU; events are only read in :meth:`PhaseTimer.collect`, never inside the step.

Forward phases (``router``, ``permute``, ``count_exchange``, ``dispatch_a2a``,
``experts``, ``combine_a2a``, ``unpermute``) are timed by ``with timer.phase(name)``.

Backward attribution. Autograd runs the layer's backward as one stretch of nodes, in
reverse creation order. The data path drops *marks* on the tensors between phases
(``x = timer.mark(x, name)``); a mark is an identity autograd Function whose backward
stamps the time when the gradient of that tensor is complete. The interval between two
consecutive marks is charged to the forward phase whose backward ran in between, named
after that forward phase::

    mark            placed on (forward)                   backward segment ending here
    begin           layer output out_TD                   (start of the layer backward)
    unpermute       y_SD after the combine all-to-all     weighted scatter-add backward
    combine_a2a     y_ND out of the experts               the combine exchange's backward:
                                                          a *dispatch-direction* all-to-all
    experts         x_ND into the experts                 expert GEMM backward (+ weight grads)
    dispatch_a2a    x_SD before the dispatch all-to-all   a *combine-direction* all-to-all
                                                          (+ the rank->expert regroup)
    permute         x_TD before the row gather            the gather's index-add backward
    router          layer input x                         router backward + the weight path
    shared_expert   the shared expert's input             the shared expert's backward (a
                                                          branch: right after ``begin`` when it
                                                          runs after the combine, between
                                                          ``experts`` and ``dispatch_a2a`` when
                                                          it overlaps the dispatch exchange)

So ``dispatch_a2a`` backward time is the gradient exchange that undoes the dispatch (it
moves the bytes the forward dispatch *received*, in the combine direction). ``count_exchange``
has no backward. A segment whose start mark is not an expected predecessor (e.g. the
pipelined overlap path with more than one chunk, which drops the inner marks: its chunks'
backwards interleave) is charged to ``unattributed``.
Marks on a tensor that does not require grad are skipped (then the segment merges with
the next one and is charged to ``unattributed``).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Iterator, Union

import torch

PHASES = (
    "router",
    "permute",
    "count_exchange",
    "dispatch_a2a",
    "experts",
    "shared_expert",
    "combine_a2a",
    "unpermute",
    "stats",
)
"""Forward phases, in data-path order (``shared_expert``: the dense shared MLP, run while
the dispatch exchange is in flight; ``stats``: the layer's device-side routing
statistics, :class:`~expert_parallel.moe.stats.MoEStats`; no backward)."""

BACKWARD_MARKS = ("begin", "unpermute", "combine_a2a", "experts", "dispatch_a2a", "permute", "router")
"""Backward marks in the order autograd reaches them (see the module docstring)."""

A2A_PHASES = ("count_exchange", "dispatch_a2a", "combine_a2a")
"""Phases that are communication (their share of the step is the 'all-to-all share')."""

_PREDECESSORS = {b: {BACKWARD_MARKS[i - 1]} for i, b in enumerate(BACKWARD_MARKS) if i > 0}
# The shared expert (a branch beside the routed path, mark on its input): run after the
# combine, its backward comes first (begin -> shared_expert -> unpermute); run while the
# dispatch exchange is in flight, it comes between the experts and the dispatch exchange.
_PREDECESSORS["shared_expert"] = {"begin", "experts"}
_PREDECESSORS["unpermute"].add("shared_expert")
_PREDECESSORS["dispatch_a2a"].add("shared_expert")
_NULL_CONTEXT = contextlib.nullcontext()

Stamp = Union[float, Any]  # perf_counter seconds on CPU, a recorded torch.cuda.Event on GPU


class NullTimer:
    """The disabled timer: every method is a constant-time no-op."""

    enabled = False

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return _NULL_CONTEXT

    def add_bytes(self, name: str, sent: int, received: int) -> None:
        return None

    def mark(self, x: torch.Tensor, boundary: str) -> torch.Tensor:
        return x


NULL_TIMER = NullTimer()


class _BackwardMark(torch.autograd.Function):
    """Identity whose backward stamps ``boundary`` on ``timer`` (no sync, no copy)."""

    @staticmethod
    def forward(ctx, x, timer, boundary):  # type: ignore[override]
        ctx.timer, ctx.boundary = timer, boundary
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ctx.timer._marks.append((ctx.boundary, ctx.timer._now()))
        return grad, None, None


class PhaseTimer:
    """Accumulates forward/backward time and bytes per phase until :meth:`collect`."""

    enabled = True

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._cpu_s: dict[str, float] = defaultdict(float)
        self._events: list[tuple[str, Any, Any]] = []
        self._marks: list[tuple[str, Stamp]] = []
        self._spans: dict[str, Stamp] = {}
        self._span_events: list[tuple[str, Any, Any]] = []
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.bytes_received: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def _now(self) -> Stamp:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _elapsed(start: Stamp, end: Stamp) -> float:
        if isinstance(start, float):
            return end - start
        return start.elapsed_time(end) / 1e3  # CUDA events: ms; synchronised in collect

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.calls[name] += 1
        if self._cuda:
            start = self._now()
            try:
                yield
            finally:
                self._events.append((name, start, self._now()))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._cpu_s[name] += time.perf_counter() - t0

    def add_bytes(self, name: str, sent: int, received: int) -> None:
        self.bytes_sent[name] += int(sent)
        self.bytes_received[name] += int(received)

    def mark(self, x: torch.Tensor, boundary: str) -> torch.Tensor:
        """Return ``x`` through an identity node whose backward stamps ``boundary``."""
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x
        return _BackwardMark.apply(x, self, boundary)

    def span_begin(self, name: str) -> None:
        """Open a named interval (e.g. the whole layer forward); see :meth:`span_end`."""
        self._spans[name] = self._now()

    def span_end(self, name: str) -> None:
        start = self._spans.pop(name, None)
        if start is None:
            return
        end = self._now()
        if self._cuda:
            self._span_events.append((name, start, end))
        else:
            self._cpu_s["span:" + name] += end - start

    def _backward_seconds(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        prev: tuple[str, Stamp] | None = None
        for boundary, stamp in self._marks:
            if boundary == "begin":
                prev = (boundary, stamp)
                continue
            if prev is None:
                continue
            seconds = self._elapsed(prev[1], stamp)
            name = boundary if prev[0] in _PREDECESSORS.get(boundary, ()) else "unattributed"
            out[name] += seconds
            out["total"] += seconds
            prev = None if boundary == "router" else (boundary, stamp)
        return dict(out)

    def collect_passes(self) -> dict[str, dict[str, float]]:
        """Seconds since the last collect, as ``{"forward": {phase: s, "total": s?},
        "backward": {phase: s, "total": s}}`` (``forward["total"]`` is present when a
        span named ``forward`` was recorded). Synchronises CUDA here, never in the step."""
        if self._events or self._span_events or (self._cuda and self._marks):
            torch.cuda.synchronize(self.device)
        forward: dict[str, float] = defaultdict(float)
        for name, seconds in self._cpu_s.items():
            key = "total" if name == "span:forward" else name
            forward[key] += seconds
        for name, start, end in self._events:
            forward[name] += self._elapsed(start, end)
        for name, start, end in self._span_events:
            forward["total" if name == "forward" else "span:" + name] += self._elapsed(start, end)
        backward = self._backward_seconds()
        self._cpu_s.clear()
        self._events.clear()
        self._span_events.clear()
        self._marks.clear()
        return {"forward": dict(forward), "backward": backward}

    def collect(self) -> dict[str, float]:
        """Seconds per forward phase since the last collect, plus ``<phase>.bwd`` for the
        backward segments (synchronises CUDA events here)."""
        passes = self.collect_passes()
        out = {k: v for k, v in passes["forward"].items() if k in PHASES}
        out.update({f"{k}.bwd": v for k, v in passes["backward"].items() if k != "total"})
        return out

    def reset(self) -> None:
        self.collect_passes()
        self.bytes_sent.clear()
        self.bytes_received.clear()
        self.calls.clear()
