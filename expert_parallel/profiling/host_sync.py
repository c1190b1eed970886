"""The data path's documented device-to-host syncs, marked where they happen.

Every non-static dispatcher reads device memory back to the host exactly once per layer
forward: the count exchange's split sizes (``moe/dispatchers/steps.py``,
``hierarchical.py``). That read is wrapped in :func:`host_sync`, which

* counts it (``HOST_SYNCS[reason]``), so tests and ``scripts/gpu_check`` can say how many
  documented syncs a forward made;
* tells a host-read counter that it is inside a marked region (:func:`in_marked_region`),
  so documented reads are told apart from stray ones;
* lifts ``torch.cuda.set_sync_debug_mode`` for the region only: under mode ``"error"``
  (gpu_check's host-sync audit) any *other* sync raises with its traceback, this one
  does not.

:func:`audit_host_traffic` is the CPU stand-in for the sync debug mode (tests, and
gpu_check's ``--dry-run-cpu``): while active it patches ``torch.Tensor``'s host-read
methods and ``torch.tensor`` / ``torch.as_tensor`` to record every read (marked or not,
with its call site) and every tensor built from host data -- on CUDA a pageable
host-to-device copy, which synchronises -- that does not go through the sanctioned
``moe.permute.host_ints``; and, through a torch function mode, every factory call
(``torch.arange``, ``zeros``, ``full`` ...) made without ``device=``, which on CUDA
would put the tensor on the CPU.

Nothing here issues a sync or touches CUDA unless CUDA is already initialised.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

HOST_SYNCS: Counter = Counter()
"""Marked syncs entered so far, per reason (tests read and clear it)."""

_DEPTH: ContextVar[int] = ContextVar("moe_host_sync_depth", default=0)


def in_marked_region() -> bool:
    """True while a :func:`host_sync` region is open."""
    return _DEPTH.get() > 0


@contextlib.contextmanager
def host_sync(reason: str) -> Iterator[None]:
    """Mark the one documented host read of ``reason`` (e.g. ``"count_exchange"``)."""
    HOST_SYNCS[reason] += 1
    token = _DEPTH.set(_DEPTH.get() + 1)
    # Thin CUDA branch: only when a sync debug mode is on (gpu_check), lift it here.
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_initialized() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)
        _DEPTH.reset(token)



HOST_READ_METHODS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")
"""``torch.Tensor`` methods that read device memory back to the host (a sync on CUDA)."""

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# Read once at import, before audit_host_traffic patches torch.tensor / torch.as_tensor
# (the set holds the functions themselves).
_FACTORIES = frozenset(_device_constructors())


@dataclass
class HostTraffic:
    """What :func:`audit_host_traffic` saw; sites read ``path:line (function)``."""

    marked_reads: list[str] = field(default_factory=list)
    """Host reads inside a :func:`host_sync` region (the documented ones)."""
    unmarked_reads: list[str] = field(default_factory=list)
    """Host reads anywhere else (stray syncs on CUDA)."""
    host_to_device: list[str] = field(default_factory=list)
    """Tensors built from host data outside ``host_ints`` (a syncing copy on CUDA)."""
    implicit_device: list[str] = field(default_factory=list)
    """Factory calls without ``device=`` (the CPU, whatever the data path's device)."""

    @property
    def reads(self) -> int:
        return len(self.marked_reads) + len(self.unmarked_reads)


def _site() -> str:
    """The innermost caller inside this package (else the first caller outside this file)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    first = frame
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE):
            return f"{path[len(_PACKAGE):]}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return f"{first.f_code.co_filename}:{first.f_lineno} ({first.f_code.co_name})" if first else "?"


class _ImplicitDevice(TorchFunctionMode):
    """Records factory calls that name no device."""

    def __init__(self, traffic: "HostTraffic") -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        from_tensor = bool(args) and isinstance(args[0], torch.Tensor)  # keeps that device
        if func in _FACTORIES and kwargs.get("device") is None and not from_tensor:
            self.traffic.implicit_device.append(_site())
        return func(*args, **kwargs)


@contextlib.contextmanager
def audit_host_traffic() -> Iterator[HostTraffic]:
    """Record host reads and host-built tensors while active (see the module docstring).
    Patches ``torch.Tensor`` / ``torch.tensor`` / ``torch.as_tensor`` process-wide: for
    tests and dry runs, never inside a training job."""
    traffic = HostTraffic()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READ_METHODS}
    factories = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}

    busy = [False]  # a read re-entered through the torch function mode counts once

    def read(fn: Any) -> Any:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if busy[0]:
                return fn(self, *args, **kwargs)
            (traffic.marked_reads if in_marked_region() else traffic.unmarked_reads).append(_site())
            busy[0] = True
            try:
                return fn(self, *args, **kwargs)
            finally:
                busy[0] = False
        return counted

    def build(fn: Any) -> Any:
        def counted(data: Any, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code
            staged = caller.co_name == "host_ints" and caller.co_filename.endswith("permute.py")
            if not isinstance(data, torch.Tensor) and not staged:
                traffic.host_to_device.append(_site())
            return fn(data, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, read(fn))
    for name, fn in factories.items():
        setattr(torch, name, build(fn))
    try:
        with _ImplicitDevice(traffic):
            yield traffic
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        for name, fn in factories.items():
            setattr(torch, name, fn)


__all__ = ["HOST_READ_METHODS", "HOST_SYNCS", "HostTraffic", "audit_host_traffic", "host_sync",
           "in_marked_region"]
