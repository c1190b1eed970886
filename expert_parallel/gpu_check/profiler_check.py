"""Check 5: the phase profiler on the device -- phases account for the layer's time.

``MoEProfiler`` times each phase with CUDA events on a GPU (``profiling/timer.py``:
events recorded in the step, read only in ``step_end``). Each profiled iteration is also
timed as a whole (forward + loss + backward) with a CUDA event pair; the check is the
pooled ratio ``sum(phase sums) / sum(measured)`` over the window, which must lie within
10% of 1 (what ``layer_breakdown.py`` asserts on CPU). The remainder is what no phase
covers: the loss, the input cast under autocast, Python glue between phases.

:func:`profile_layer` is shared with the speed check (the GPU-sized breakdown).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import MoEConfig
from ..distributed.groups import ParallelGroups
from ..moe.layer import MoELayer
from ..profiling.profiler import MoEProfiler, ProfilerConfig
from ..profiling.timer import PHASES
from .common import Context, Stopwatch, median, result

RATIO_BOUNDS = (0.9, 1.1)
GPU_SIZES = {"tokens": 16384, "hidden": 2048, "ffn": 1408, "experts": 16, "top_k": 2}
DRY_SIZES = {"tokens": 1024, "hidden": 128, "ffn": 512, "experts": 4, "top_k": 2}


def profile_layer(ctx: Context, cfg: MoEConfig, tokens: int, warmup: int = 2, iters: int = 5,
                  bf16: bool = True) -> dict[str, Any]:
    """Phase breakdown of one EP=1 layer (forward + backward) under ``MoEProfiler``."""
    layer = MoELayer(cfg, ParallelGroups.single(), seed=0).to(ctx.device)
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(ctx.device)
    prof = MoEProfiler({"moe": layer}, ParallelGroups.single(),
                       ProfilerConfig(start_step=warmup, num_steps=iters), device=ctx.device)
    measured, records = [], []
    for it in range(warmup + iters):
        prof.step_begin(it)
        xx = x.clone().requires_grad_(True)
        watch = Stopwatch(ctx).start()
        with ctx.bf16(enabled=bf16):
            out = layer(xx)
            loss = out.output.float().square().mean() + out.aux_loss
        loss.backward()
        seconds = watch.stop().seconds()
        record = prof.step_end(it, step_time_s=seconds)
        if record is not None:
            records.append(record["layers"]["moe"])
            measured.append(seconds)
    prof.close()
    phase_sum = [rec["per_rank"]["phase_sum_s"][0] for rec in records]
    phases = {p: {"forward_ms": 1e3 * sum(r["phases"][p]["forward_s"] for r in records) / len(records),
                  "backward_ms": 1e3 * sum(r["phases"][p]["backward_s"] for r in records) / len(records)}
              for p in (*PHASES, "unattributed") if p in records[0]["phases"]}
    return {"layer_ms": 1e3 * median(measured), "phase_sum_over_measured": sum(phase_sum) / sum(measured),
            "per_iteration_ratio": [p / m for p, m in zip(phase_sum, measured)], "phases_ms": phases,
            "dispatcher": layer.dispatcher.describe(),
            "expert_backend": layer.experts.backend(ctx.device, torch.bfloat16 if bf16 else torch.float32),
            "drop_fraction": records[-1]["tokens"]["drop_fraction"], "iters": iters,
            "timing": "CUDA events" if ctx.cuda else "perf_counter (CPU)"}


def run(ctx: Context) -> dict:
    sizes = DRY_SIZES if ctx.dry_run else GPU_SIZES
    cfg = MoEConfig(hidden_size=sizes["hidden"], ffn_hidden_size=sizes["ffn"], num_experts=sizes["experts"],
                    top_k=sizes["top_k"], capacity_factor=1.25)
    prof = profile_layer(ctx, cfg, sizes["tokens"], bf16=ctx.cuda)
    ratio = prof["phase_sum_over_measured"]
    ok = RATIO_BOUNDS[0] <= ratio <= RATIO_BOUNDS[1]
    summary = (f"phase sum / measured layer time = {ratio:.3f} (bounds {RATIO_BOUNDS}), layer "
               f"{prof['layer_ms']:.2f} ms, {prof['timing']}")
    return result("pass" if ok else "fail", summary, sizes=sizes, bounds=RATIO_BOUNDS, **prof)
