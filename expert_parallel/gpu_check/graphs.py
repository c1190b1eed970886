"""Check 3: the static-shape layer's forward + backward in a CUDA graph.

The padded dispatcher has static shapes and no host sync, so one forward + backward
(loss, input and parameter gradients) must be capturable with ``torch.cuda.graph``
(PyTorch's whole-network capture recipe: warm-up on a side stream, gradients set to
None before capture so the graph owns them). Each replay on new data copied into the
static input must equal an eager forward + backward of an identical layer on that
data. Cases: fp32 with the loop backend, and bf16 autocast (autocast's weight cache off,
as graphs require) with the ``auto`` backend (grouped_mm on H100/H200).

Dry run (CPU): no graphs; "capture" records the step and each "replay" re-runs it on
the static buffers -- the buffer and comparison logic run, the CUDA graph does not.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from ..config import MoEConfig
from ..moe.layer import MoELayer
from .common import Context, error_site, rel_err, result

TOLERANCE = {"fp32": 1e-5, "bf16": 1e-3}  # scatter-add atomics may reorder fp32 sums
REPLAYS = 3


def _config(backend: str) -> MoEConfig:
    return MoEConfig(hidden_size=64, ffn_hidden_size=128, num_experts=8, top_k=2, capacity_factor=1.25,
                     eval_capacity_factor=1.25, static_shapes=True, nonfinite_policy="count",
                     expert_backend=backend, init_std=0.1)


class _Replayer:
    """``torch.cuda.CUDAGraph`` on a GPU; on CPU the recorded step re-run eagerly."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.graph = torch.cuda.CUDAGraph() if ctx.cuda else None
        self.fn: Callable[[], Any] | None = None

    def capture(self, fn: Callable[[], Any]) -> Any:
        if self.graph is None:
            self.fn = fn
            return fn()
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self, reset: Callable[[], None]) -> None:
        if self.graph is None:
            reset()  # eager stand-in: gradients written afresh, as a replay overwrites them
            self.fn()
        else:
            self.graph.replay()


def capture_case(ctx: Context, precision: str, backend: str, tokens: int = 64) -> dict:
    bf16 = precision == "bf16"
    layer = MoELayer(_config(backend), seed=5).to(ctx.device)
    eager = copy.deepcopy(layer)
    D = layer.config.hidden_size
    static_x = torch.zeros(tokens, D, device=ctx.device, requires_grad=True)
    static_cot = torch.zeros(tokens, D, device=ctx.device)
    static_out = torch.zeros(tokens, D, device=ctx.device)  # the step copies its output here
    gen = torch.Generator().manual_seed(11)
    data = [(torch.randn(tokens, D, generator=gen), torch.randn(tokens, D, generator=gen))
            for _ in range(REPLAYS + 1)]

    def step() -> None:
        with ctx.bf16(enabled=bf16, cache=False):
            out = layer(static_x)
            loss = (out.output.float() * static_cot).sum() + out.aux_loss
        loss.backward()
        with torch.no_grad():
            static_out.copy_(out.output)

    def reset() -> None:
        layer.zero_grad(set_to_none=True)
        static_x.grad = None

    with torch.no_grad():
        static_x.copy_(data[0][0].to(ctx.device))
        static_cot.copy_(data[0][1].to(ctx.device))
    # Warm-up on a side stream (the capture recipe), then capture with grads unset.
    side = torch.cuda.Stream() if ctx.cuda else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                reset()
                step()
        torch.cuda.current_stream().wait_stream(side)
    else:
        reset()
        step()
    reset()
    replayer = _Replayer(ctx)
    try:
        replayer.capture(step)
    except RuntimeError as err:
        return {"precision": precision, "backend": backend, "status": "fail",
                "detail": f"capture failed at {error_site(err)}"}
    worst: dict[str, float] = {}
    for x, cot in data[1:]:
        with torch.no_grad():
            static_x.copy_(x.to(ctx.device))
            static_cot.copy_(cot.to(ctx.device))
        replayer.replay(reset)
        ctx.synchronize()
        got = {"output": static_out.clone(), "x_grad": static_x.grad.detach().clone(),
               **{n: p.grad.detach().clone() for n, p in layer.named_parameters() if p.grad is not None}}
        eager.zero_grad(set_to_none=True)
        ex = x.to(ctx.device).requires_grad_(True)
        with ctx.bf16(enabled=bf16, cache=False):
            eo = eager(ex)
            eloss = (eo.output.float() * cot.to(ctx.device)).sum() + eo.aux_loss
        eloss.backward()
        want = {"output": eo.output.detach(), "x_grad": ex.grad.detach(),
                **{n: p.grad.detach() for n, p in eager.named_parameters() if p.grad is not None}}
        if set(got) != set(want):
            return {"precision": precision, "backend": backend, "status": "fail",
                    "detail": f"gradients differ in presence: {sorted(set(got) ^ set(want))}"}
        for name in want:
            worst[name] = max(worst.get(name, 0.0), rel_err(got[name], want[name]))
    ok = max(worst.values()) <= TOLERANCE[precision]
    return {"precision": precision, "backend": backend,
            "expert_backend": layer.experts.backend(ctx.device, torch.bfloat16 if bf16 else torch.float32),
            "status": "pass" if ok else "fail", "max_rel_err": worst, "tolerance": TOLERANCE[precision],
            "replays": REPLAYS}


def run(ctx: Context) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = []
    for precision, backend in (("fp32", "loop"), ("bf16", "auto")):
        try:
            cases.append(capture_case(ctx, precision, backend))
        except Exception as err:  # noqa: BLE001 - e.g. the context poisoned by a failed capture
            cases.append({"precision": precision, "backend": backend, "status": "fail",
                          "detail": f"{type(err).__name__} at {error_site(err)}"})
        ctx.save_partial(result("error", f"died after {len(cases)} case(s)", cases=cases))
    failed = [c for c in cases if c["status"] != "pass"]
    how = "CUDA graph replays" if ctx.cuda else "dry run: eager re-runs stand in for graph replays"
    if failed:
        summary = "; ".join(f"{c['precision']}/{c['backend']}: {c.get('detail') or c.get('max_rel_err')}"
                            for c in failed)
    else:
        summary = (f"static-shape forward+backward captured; {REPLAYS} {how} equal eager "
                   + ", ".join(f"{c['precision']} max rel err {max(c['max_rel_err'].values()):.1e}" for c in cases))
    return result("fail" if failed else "pass", summary, method=how, cases=cases)
