"""Check 6: speed on the GPU (recorded, no pass/fail thresholds).

1. ``layer_breakdown`` at a GPU-sized configuration -- E=64, k=8, D=2048, F=1408, 16k
   tokens, bf16 autocast, dropless, EP=1 -- with the phase profiler (CUDA events).
2. The expert GEMMs alone, forward + backward (input and weight gradients), on the
   rows that routing sends them: achieved TFLOP/s (``18 * rows * D * F`` for SwiGLU:
   three GEMMs, each backward twice the forward) against the chip's dense bf16 peak
   (datasheet table in ``common.py``), for ``grouped_mm`` and for the per-expert loop.
3. ``compare_deepspeed`` at EP=1: its configuration (E=16, k=2, 4096 tokens, D=512,
   F=2048, GELU experts, capacity factor 1.25) on this device, our layer against
   ``deepspeed.moe.layer.MoE`` on the same weights, bf16 autocast; median
   forward + backward time of each, interleaved.

``benchmarks/layer_breakdown.py`` and ``benchmarks/compare_deepspeed.py`` themselves spawn
gloo ranks on CPU tensors, so this check runs their measurements (the ``MoEProfiler``
phase breakdown; our layer vs DeepSpeed's on the same weights) in-process on the GPU.
A part that cannot run (DeepSpeed missing, say) is reported with its reason and makes
the check "fail", so a missing number is never silent.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from ..moe.capacity import plan_capacity
from ..moe.layer import MoELayer
from .common import Context, Stopwatch, bf16_peak_tflops, median, result
from .profiler_check import profile_layer

GPU = {"tokens": 16384, "hidden": 2048, "ffn": 1408, "experts": 64, "top_k": 8, "iters": 10}
DRY = {"tokens": 256, "hidden": 64, "ffn": 128, "experts": 8, "top_k": 2, "iters": 2}
DS_GPU = {"tokens": 4096, "hidden": 512, "ffn": 2048, "experts": 16, "top_k": 2, "cf": 1.25, "iters": 10}
DS_DRY = {"tokens": 128, "hidden": 32, "ffn": 64, "experts": 4, "top_k": 2, "cf": 1.25, "iters": 2}


def _time(ctx: Context, fn: Any, iters: int, warmup: int = 2) -> float:
    """Median device seconds of ``fn()`` over ``iters`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        watch = Stopwatch(ctx).start()
        fn()
        times.append(watch.stop().seconds())
    return median(times)


def expert_gemms(ctx: Context, cfg: MoEConfig, tokens: int, iters: int) -> dict:
    """Expert forward + backward alone on the rows routing sends them, per backend."""
    layer = MoELayer(cfg, seed=0).to(ctx.device)
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(2)).to(ctx.device)
    with torch.no_grad():
        routing = layer.router(x)
        plan = plan_capacity(routing.topk_idx_TK, routing.topk_weight_TK, cfg.num_experts, None)
    counts = plan.kept_E.tolist()  # outside any timed region
    rows = sum(counts)
    x_ND = torch.randn(rows, cfg.hidden_size, device=ctx.device)
    grad = torch.randn(rows, cfg.hidden_size, device=ctx.device, dtype=torch.bfloat16)
    flops = 18.0 * rows * cfg.hidden_size * cfg.ffn_hidden_size
    peak = bf16_peak_tflops(torch.cuda.get_device_name(ctx.device) if ctx.cuda else None)
    out: dict[str, Any] = {"rows": rows, "flops_per_iter": flops, "bf16_peak_tflops": peak}
    experts = layer.experts  # same weights for both backends; the backend is read per call
    for backend in ("grouped_mm", "loop"):
        experts.config = cfg.replace(expert_backend=backend)

        def fwd_bwd() -> None:
            xx = x_ND.detach().requires_grad_(True)
            with ctx.bf16():
                y = experts(xx, counts)
            y.backward(grad.to(y.dtype))
            experts.zero_grad(set_to_none=True)

        try:
            seconds = _time(ctx, fwd_bwd, iters)
        except Exception as err:  # noqa: BLE001 - reported, the other backend still runs
            out[backend] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
            continue
        tflops = flops / seconds / 1e12
        out[backend] = {"ms": 1e3 * seconds, "tflops": tflops,
                        "fraction_of_peak": tflops / peak if peak else None}
    if "ms" in out.get("grouped_mm", {}) and "ms" in out.get("loop", {}):
        out["grouped_mm_speedup_over_loop"] = out["loop"]["ms"] / out["grouped_mm"]["ms"]
    return out


class _GELU(nn.Module):
    """Our GELU expert as a DeepSpeed expert module (bias-free, ``gelu(x W1) W2``)."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare_deepspeed(ctx: Context, s: dict) -> dict:
    """Ours vs ``deepspeed.moe.layer.MoE`` at EP=1 on one device, same weights."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    import deepspeed  # DS_ACCELERATOR is set by the parent (cuda, or cpu in a dry run)
    from deepspeed.moe.layer import MoE as DSMoE

    deepspeed.init_distributed(dist_backend="nccl" if ctx.cuda else "gloo")
    cfg = MoEConfig(hidden_size=s["hidden"], ffn_hidden_size=s["ffn"], num_experts=s["experts"],
                    top_k=s["top_k"], capacity_factor=s["cf"], eval_capacity_factor=s["cf"],
                    activation="gelu", expert_backend="auto")
    ours = MoELayer(cfg, seed=0).to(ctx.device)
    ds = DSMoE(hidden_size=s["hidden"], expert=_GELU(s["hidden"], s["ffn"]), num_experts=s["experts"],
               ep_size=1, k=s["top_k"], capacity_factor=s["cf"], eval_capacity_factor=s["cf"],
               min_capacity=cfg.min_capacity, drop_tokens=True, use_rts=False,
               top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for l, mod in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            mod.w1.weight.copy_(ours.experts.w1_eDF[l].t())
            mod.w2.weight.copy_(ours.experts.w2_eFD[l].t())
    ds = ds.to(ctx.device)
    x = torch.randn(s["tokens"], s["hidden"], generator=torch.Generator().manual_seed(3)).to(ctx.device)

    def run_ours() -> None:
        xx = x.clone().requires_grad_(True)
        with ctx.bf16(enabled=ctx.cuda):
            out = ours(xx)
            loss = out.output.float().square().mean() + out.aux_loss
        loss.backward()

    def run_ds() -> None:
        xx = x.clone().requires_grad_(True)
        with ctx.bf16(enabled=ctx.cuda):
            y, l_aux, _ = ds(xx)
            loss = y.float().square().mean() + cfg.aux_loss_coeff * l_aux
        loss.backward()

    for fn in (run_ours, run_ds, run_ours, run_ds):  # warm-up, both
        fn()
    t_ours, t_ds = [], []
    for _ in range(s["iters"]):  # interleaved, so drift hits both alike
        t_ours.append(_time(ctx, run_ours, 1, warmup=0))
        t_ds.append(_time(ctx, run_ds, 1, warmup=0))
    ours_ms, ds_ms = 1e3 * median(t_ours), 1e3 * median(t_ds)
    return {"config": s, "precision": "bf16 autocast" if ctx.cuda else "fp32", "ours_ms": ours_ms,
            "deepspeed_ms": ds_ms, "speedup_vs_deepspeed": ds_ms / ours_ms,
            "ours_expert_backend": ours.experts.backend(ctx.device, torch.bfloat16 if ctx.cuda else torch.float32)}


def run(ctx: Context) -> dict:
    s = DRY if ctx.dry_run else GPU
    cfg = MoEConfig(hidden_size=s["hidden"], ffn_hidden_size=s["ffn"], num_experts=s["experts"],
                    top_k=s["top_k"], capacity_factor=None)
    parts: dict[str, Any] = {}
    for name, fn in (("layer_breakdown", lambda: profile_layer(ctx, cfg, s["tokens"], iters=s["iters"])),
                     ("expert_gemms", lambda: expert_gemms(ctx, cfg, s["tokens"], s["iters"])),
                     ("compare_deepspeed_ep1", lambda: compare_deepspeed(ctx, DS_DRY if ctx.dry_run else DS_GPU))):
        try:
            parts[name] = fn()
        except Exception as err:  # noqa: BLE001 - one part failing must not hide the others
            parts[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                           "traceback": traceback.format_exc()[-2000:]}
        if ctx.cuda:
            torch.cuda.empty_cache()
        ctx.save_partial(result("error", f"died after {', '.join(parts)}", sizes=s, **parts))
    errors = [n for n, p in parts.items() if "error" in p] + \
        [f"expert_gemms/{b}" for b in ("grouped_mm", "loop") if "error" in parts.get("expert_gemms", {}).get(b, {})]
    bits = []
    lb, eg, cd = parts["layer_breakdown"], parts["expert_gemms"], parts["compare_deepspeed_ep1"]
    if "layer_ms" in lb:
        bits.append(f"layer {lb['layer_ms']:.2f} ms fwd+bwd (E={s['experts']}, k={s['top_k']}, {s['tokens']} tok)")
    for b in ("grouped_mm", "loop"):
        if "tflops" in eg.get(b, {}):
            frac = eg[b]["fraction_of_peak"]
            bits.append(f"{b} {eg[b]['tflops']:.3g} TFLOP/s" + (f" ({100 * frac:.0f}% of peak)" if frac else ""))
    if "speedup_vs_deepspeed" in cd:
        bits.append(f"{cd['speedup_vs_deepspeed']:.2f}x DeepSpeed at EP=1")
    summary = "; ".join(bits) + (f"; not measured: {', '.join(errors)}" if errors else "")
    return result("fail" if errors else "pass", summary, sizes=s, **parts)
