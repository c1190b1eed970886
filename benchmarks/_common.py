"""Shared plumbing for the benchmark scripts: ranks, timing, peak memory, reports.

* :func:`spawn` runs ``fn(rank, world, *args)`` on ``world`` fresh processes joined by a
  gloo process group (file rendezvous), ``threads`` intra-op threads each, and returns
  the per-rank results; a hung run is killed at ``timeout``.
* :func:`timed_max` times a callable on every rank after a barrier and returns the
  slowest rank's time (an EP layer is as slow as its slowest rank).
* :func:`peak_alloc_bytes` measures the peak of live tensor bytes allocated during a
  callable. Method: ``torch.profiler`` with ``profile_memory=True`` records every CPU
  allocation (+bytes) and free (-bytes) made through torch's allocator, in order; the
  peak of their running sum is the high-water mark of tensor memory above the level at
  entry -- the CPU analogue of ``torch.cuda.max_memory_allocated() - allocated_at_start``.
  It counts tensors only (not Python objects, not the allocator's cached pages) and is
  exact and repeatable, unlike RSS, which glibc's lazy page return makes noisy.
* :func:`replayed_peak_bytes`: the same peak, made independent of the peers' timing
  (collectives recorded once, then replayed locally; see :class:`ReplayCollectives`),
  with the exchange buffers reported separately. Repeats agree exactly.
* :func:`op_breakdown`: where a callable's time goes, by op category (GEMMs, exchange,
  index/permute, casts/copies, elementwise, other ops, and the rest: Python/framework).
* :func:`add_dtype_arg` / :func:`precisions`: the ``--dtype auto|bf16|fp32`` option every
  benchmark takes (``auto``: bf16 autocast where the CPU computes bf16 natively, see
  ``expert_parallel/distributed/device.py``), and its resolved :class:`Precision`.
* :func:`environment` and :func:`write_report`: every result records its config,
  versions, hardware and command, and comes with a markdown table and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from expert_parallel.distributed.device import PRECISIONS, Precision, resolve_precision
from expert_parallel.distributed.local_ranks import run_local_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(fn: Callable, world: int, *args: Any, threads: int = 1, timeout: float = 3600.0) -> list:
    """Run ``fn`` on ``world`` gloo ranks; returns their results in rank order."""
    return run_local_ranks(fn, world, *args, threads=threads, timeout=timeout, group_timeout_s=600.0)


def timed_max(fn: Callable[[], Any], group: Optional[Any] = None) -> float:
    """Seconds ``fn`` took on the slowest rank (barrier before, max-reduce after)."""
    if dist.is_initialized():
        dist.barrier(group=group)
    t0 = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return float(elapsed)


def timed_wall_cpu(fn: Callable[[], Any], group: Optional[Any] = None) -> tuple[float, float]:
    """``(wall, cpu)``: the slowest rank's wall seconds (as :func:`timed_max`) and the CPU
    seconds all ranks spent (``time.process_time``, every thread of each process, summed
    over ranks). On a machine shared with other jobs the wall time includes waiting for a
    core; the CPU time does not (nor does it count a rank blocked on a peer), so ratios
    of CPU time are the load-robust companion of the wall-time ratios."""
    if dist.is_initialized():
        dist.barrier(group=group)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    out = torch.tensor([time.perf_counter() - t0, time.process_time() - c0], dtype=torch.float64)
    if dist.is_initialized():
        wall, cpu = out.clone(), out.clone()
        dist.all_reduce(wall, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM, group=group)
        return float(wall[0]), float(cpu[1])
    return float(out[0]), float(out[1])


def peak_alloc_bytes(fn: Callable[[], Any]) -> int:
    """Peak live tensor bytes allocated while ``fn`` runs (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]"]
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return int(peak)


class ReplayCollectives(TorchDispatchMode):
    """Record every collective a callable issues, then replay them without peers.

    Why: a peak-memory figure taken while real exchanges run depends on the peers'
    timing (gloo finishes a transfer, and drops its references to the send and receive
    buffers, on its own worker thread; a buffer freed a moment later or earlier moves
    the peak). Recording once and replaying makes the measured pass single-threaded
    and identical on every repeat: each collective's output is written from the
    recording (the receive buffers the program itself allocated get exactly the bytes
    they got in the real run), so the program computes exactly what it computed, with
    no gloo thread and no peer in the loop.

    ``ReplayCollectives()`` records (making each collective synchronous);
    ``ReplayCollectives(tape)`` replays ``tape`` in order and checks every op matches.
    ``exchange_bytes`` counts the received bytes of the ops by name.
    Works at the dispatcher level (``c10d::*`` and ``_c10d_functional::*`` ops), so it
    covers ``torch.distributed``, functional collectives and any library on top of them.
    """

    _PASS_THROUGH = ("_c10d_functional::_wrap_tensor_autograd",)

    def __init__(self, tape: Optional[list] = None) -> None:
        super().__init__()
        self.recording = tape is None
        self.tape: list = [] if tape is None else tape
        self.pos = 0
        self.exchange_bytes: dict[str, int] = defaultdict(int)
        self.largest_buffer = 0

    def _count(self, name: str, out: Any) -> None:
        tensors = _flat_tensors(out)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self.exchange_bytes[name] += nbytes
        self.largest_buffer = max([self.largest_buffer] + [t.numel() * t.element_size() for t in tensors])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func.namespace not in ("c10d", "_c10d_functional"):
            return func(*args, **kwargs)
        name = func._schema.name
        if name in self._PASS_THROUGH:
            return func(*args, **kwargs)
        if name == "_c10d_functional::wait_tensor":
            return func(*args, **kwargs) if self.recording else args[0]
        functional = func.namespace == "_c10d_functional"
        if self.recording:
            result = func(*args, **kwargs)
            if functional:
                result = torch.ops._c10d_functional.wait_tensor(result)
                self.tape.append((name, result.clone()))
                self._count(name, result)
                return result
            work = result[-1] if isinstance(result, (tuple, list)) else result
            work.wait()
            out = args[0] if args and not isinstance(args[0], torch.ScriptObject) else []
            self.tape.append((name, _clone_nested(out)))
            self._count(name, out)
            return result
        if self.pos >= len(self.tape):
            raise RuntimeError(f"replay: {name} was not recorded (the replayed pass issues more collectives)")
        recorded, data = self.tape[self.pos]
        self.pos += 1
        if recorded != name:
            raise RuntimeError(f"replay: expected {recorded}, got {name} (the pass is not deterministic)")
        if functional:
            self._count(name, data)
            return data.clone()  # the real op allocates its output too
        out = args[0] if args and not isinstance(args[0], torch.ScriptObject) else []
        _copy_nested(out, data)
        self._count(name, out)
        future = torch.futures.Future()
        future.set_result(None)
        work = torch._C._distributed_c10d._create_work_from_future(future).boxed()
        returns = func._schema.returns
        return work if len(returns) == 1 else (out, work)


def _flat_tensors(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flat_tensors(item)]
    return []


def _clone_nested(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    return [_clone_nested(t) for t in x]


def _copy_nested(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
        return
    for d, s in zip(dst, src):
        _copy_nested(d, s)


def replayed_peak_bytes(fn: Callable[[], Any], repeats: int = 3) -> dict:
    """Peak live tensor bytes of ``fn`` on this rank, independent of the peers' timing.

    ``fn`` runs once for real with its collectives recorded (every rank must call this
    together), then ``repeats`` times with them replayed locally under
    :func:`peak_alloc_bytes`. Returns ``peak_bytes`` (one per repeat), ``spread``
    ((max - min) / min over the repeats), ``exchange_bytes`` (bytes received per
    collective op in one pass: the exchange buffers, also inside the peak) and
    ``largest_exchange_buffer``."""
    recorder = ReplayCollectives()
    with recorder:
        fn()
    peaks = []
    # One unmeasured replay first: state a program keeps from its previous call (e.g.
    # DeepSpeed's gate holds the last l_aux / exp_counts) then comes from a replayed
    # pass, as in every measured one (steady state, like any training step's).
    for i in range(repeats + 1):
        replay = ReplayCollectives(recorder.tape)

        def replayed() -> None:
            with replay:
                fn()

        peak = peak_alloc_bytes(replayed)
        if i:
            peaks.append(peak)
        if replay.pos != len(recorder.tape):
            raise RuntimeError(f"replay issued {replay.pos} of {len(recorder.tape)} recorded collectives")
    lo = min(peaks)
    return {"peak_bytes": peaks, "spread": (max(peaks) - lo) / lo if lo else 0.0,
            "exchange_bytes": dict(recorder.exchange_bytes),
            "largest_exchange_buffer": recorder.largest_buffer}


OP_CATEGORIES = (
    ("exchange", ("gloo:", "c10d", "nccl:", "all_to_all", "alltoall", "allreduce", "allgather")),
    ("gemm", ("mm", "linear", "einsum", "matmul", "addmm", "baddbmm", "mkldnn")),
    ("index/permute", ("index", "gather", "scatter", "sort", "topk", "cumsum", "repeat_interleave",
                       "one_hot", "nonzero", "masked", "where", "histc", "bincount", "take", "put",
                       "argmax", "unique", "bucketize", "_unsafe_")),
    ("cast/copy", ("copy", "_to_copy", "aten::to", "clone", "contiguous", "fill", "zero", "empty",
                   "cat", "stack", "split", "pad", "new_")),
    ("elementwise", ("silu", "gelu", "sigmoid", "softmax", "mul", "add", "div", "sub", "sum", "mean",
                     "pow", "square", "exp", "log", "max", "min", "clamp", "neg", "eq", "lt", "gt",
                     "ne", "ge", "le", "threshold", "erf", "tanh", "sqrt", "rsqrt")),
)
"""Name fragments (first match wins) that put a profiler op into a category."""


def _category(name: str) -> str:
    low = name.lower()
    for cat, frags in OP_CATEGORIES:
        if any(f in low for f in frags):
            return cat
    return "other ops"


def op_breakdown(fn: Callable[[], Any], repeats: int = 1) -> dict[str, float]:
    """Milliseconds of ``fn`` per op category (``OP_CATEGORIES``): self CPU time of the
    aten ops, the whole of each ``gloo:*`` transfer (it runs on gloo's thread and
    includes waiting for the peer), and ``python/framework``: wall time not inside any
    op (Python, autograd bookkeeping, the profiler's own cost). Profiled separately
    from the timed iterations (the profiler slows the run down). ``repeats > 1``: the
    minimum of each category over that many profiled calls (the profiler's times are
    wall times, so on a shared machine the least-disturbed call is the best estimate)."""
    if repeats > 1:
        runs = [op_breakdown(fn) for _ in range(repeats)]
        return {k: min(r.get(k, 0.0) for r in runs) for k in runs[0]}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    out: dict[str, float] = defaultdict(float)
    for avg in prof.key_averages():
        name = avg.key
        if name.startswith(("gloo:", "nccl:")):
            out["exchange"] += avg.cpu_time_total / 1e3
        elif name.startswith(("aten::", "c10d::", "_c10d_functional::", "torchtitan::", "transformers::")):
            out[_category(name)] += avg.self_cpu_time_total / 1e3
    accounted = sum(out.values())
    out["python/framework"] = max(0.0, 1e3 * wall - accounted)
    out["wall"] = 1e3 * wall
    return dict(out)


def add_dtype_arg(parser: argparse.ArgumentParser, default: str = "auto",
                  extra: tuple[str, ...] = ()) -> None:
    """``--dtype auto|bf16|fp32``: what the benchmarked layers compute in (bf16 autocast
    over fp32 master weights, or fp32); ``extra`` adds choices such as ``both``."""
    parser.add_argument("--dtype", default=default, choices=list(PRECISIONS) + list(extra),
                        help="auto = bf16 autocast where the CPU computes bf16 natively "
                             "(AVX512-BF16/AMX), else fp32" + ("; both = fp32 and bf16 in one run" if
                                                               "both" in extra else ""))


def precisions(choice: str, device: str = "cpu") -> list[Precision]:
    """The resolved precisions of a ``--dtype`` value (``both``: fp32, then bf16)."""
    if choice == "both":
        return [resolve_precision("fp32", device), resolve_precision("bf16", device)]
    return [resolve_precision(choice, device)]


class ModuleClock:
    """Wall time of the hooked modules: every forward call's seconds, and (``backward``)
    their backward seconds summed, until :meth:`take`."""

    def __init__(self, modules, backward: bool = False) -> None:
        self.forward_s: list[float] = []
        self.backward_s = 0.0
        self._t = self._tb = 0.0
        for m in modules:
            m.register_forward_pre_hook(self._f0)
            m.register_forward_hook(self._f1)
            if backward:
                m.register_full_backward_pre_hook(self._b0)
                m.register_full_backward_hook(self._b1)

    def _f0(self, *_) -> None:
        self._t = time.perf_counter()

    def _f1(self, *_) -> None:
        self.forward_s.append(time.perf_counter() - self._t)

    def _b0(self, *_) -> None:
        self._tb = time.perf_counter()

    def _b1(self, *_) -> None:
        self.backward_s += time.perf_counter() - self._tb

    def take(self) -> tuple[list[float], float]:
        """(forward seconds per call, backward seconds) since the last take."""
        out = self.forward_s, self.backward_s
        self.forward_s, self.backward_s = [], 0.0
        return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def environment() -> dict:
    """Versions and hardware of this run."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    from importlib import metadata

    for mod in ("deepspeed", "numpy", "torchtitan", "transformers"):
        try:  # the installed distribution's version, without importing it
            versions[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:  # optional
            versions[mod] = None
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    hardware = {"machine": platform.machine(), "cpu_model": cpu_model, "cpus": os.cpu_count(),
                "memory_gib": mem_gb, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        # Other jobs on the machine skew timings; record how busy it was.
        hardware["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return {"versions": versions, "hardware": hardware, "command": " ".join([sys.executable, *sys.argv]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_report(out: str, report: dict, markdown: list[str],
                 plot: Optional[Callable[[Any], None]] = None) -> None:
    """Write ``out`` (JSON), ``<stem>.md`` and, when ``plot`` is given, ``<stem>.png``."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(report, fh, indent=1)
    stem = os.path.splitext(out)[0]
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(markdown) + "\n")
    if plot is not None:
        save_plot(stem + ".png", plot)


def save_plot(png: str, plot: Callable[[Any], None]) -> None:
    """``plot(pyplot)`` drawn off-screen and saved to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot(plt)
    plt.savefig(png, dpi=90, bbox_inches="tight")
    plt.close("all")
