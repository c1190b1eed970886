"""Check 2: the host-sync audit.

Each case runs one forward + backward of a layer once to warm up (lazy CUDA / cuBLAS
initialisation may synchronise), once under ``torch.cuda.set_sync_debug_mode("warn")``
to list every synchronising call with its line (Python warnings carry the caller), and
once under mode ``"error"``, where any synchronising CUDA call raises -- except inside
the marked ``host_sync`` region (``profiling/host_sync.py``), which lifts the mode for
the one documented read. Expected: one marked sync per forward (the count exchange),
none in backward; none at all with static shapes.

Cases: EP=1 every router x (local, overlap, static) under bf16 autocast with the
``auto`` expert backend (grouped_mm on H100/H200), plus fp32 with the loop; and the
multi-rank code paths -- flat, overlap, hierarchical, hierarchical + overlap, static at
EP=4 and EP=8 -- on one GPU through the mirror process group
(``distributed/fake_group.py``).

Dry run (CPU): no sync debug mode exists, so ``audit_host_traffic`` stands in for it:
every host read outside the marked region and every tensor built from host data (a
syncing copy on CUDA) is a stray sync.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

from ..config import ROUTERS, MoEConfig
from ..distributed.fake_group import fake_world
from ..distributed.groups import ParallelGroups
from ..moe.layer import MoELayer
from ..profiling.host_sync import HOST_SYNCS, audit_host_traffic
from .common import PACKAGE_DIR, Context, error_site, result
from .correctness import ROUTER_KWARGS

STATIC = {"static_shapes": True, "nonfinite_policy": "count"}
EP1_MODES: dict[str, dict] = {"local": {}, "overlap": {"overlap_chunks": 2}, "static": STATIC}
# name -> (config overrides, ParallelGroups.build kwargs)
MULTI_RANK_MODES: dict[str, tuple[dict, dict]] = {
    "flat": ({}, {}),
    "overlap": ({"overlap_chunks": 2}, {}),
    "hierarchical": ({"a2a_algorithm": "hierarchical"}, {"ranks_per_node": 2}),
    "hierarchical_overlap": ({"a2a_algorithm": "hierarchical", "overlap_chunks": 2}, {"ranks_per_node": 2}),
    "static": (STATIC, {}),
}
MULTI_RANK = ((4, 1), (8, 5))  # (EP size, this rank)


def _config(router: str, backend: str, overrides: dict) -> MoEConfig:
    kw: dict[str, Any] = dict(hidden_size=64, ffn_hidden_size=128, num_experts=16, top_k=2, router=router,
                              expert_backend=backend, capacity_factor=1.25, eval_capacity_factor=1.25)
    kw.update(ROUTER_KWARGS.get(router, {}))
    kw.update(overrides)
    return MoEConfig(**kw)


@contextlib.contextmanager
def _sync_debug(mode: str) -> Iterator[None]:
    """Thin CUDA branch: sync debug ``mode`` ("warn" / "error") for the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _where(w: warnings.WarningMessage) -> str:
    path = str(w.filename)
    if path.startswith(str(PACKAGE_DIR)):
        path = path[len(str(PACKAGE_DIR)) + 1:]
    return f"{path}:{w.lineno}"


def probe(ctx: Context, layer: MoELayer, bf16: bool, tokens: int = 64) -> dict:
    """Warm-up, then one audited forward + backward. Returns the counts and stray sites."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, layer.config.hidden_size, generator=gen).to(ctx.device)
    cot = torch.randn(tokens, layer.config.hidden_size, generator=gen).to(ctx.device)

    def run(phase_log: list) -> None:
        xx = x.clone().requires_grad_(True)
        phase_log[0] = "forward"
        with ctx.bf16(enabled=bf16):
            out = layer(xx)
            loss = (out.output.float() * cot).sum() + out.aux_loss
        phase_log[0] = "backward"
        loss.backward()

    run(["warm-up"])
    ctx.synchronize()
    phase = [""]
    before = HOST_SYNCS["count_exchange"]
    stray: list[str] = []  # what synchronised, readable
    sites: list[str] = []  # where: path:line of ours
    if ctx.cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _sync_debug("warn"):
                run(phase)
        marked = HOST_SYNCS["count_exchange"] - before
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        stray = [f"{_where(w)}: {str(w.message).splitlines()[0]}" for w in syncs]
        sites = [_where(w) for w in syncs]
        try:
            with _sync_debug("error"):
                run(phase)
        except RuntimeError as err:
            if "synchroniz" not in str(err):
                raise
            stray.append(f"error mode, {phase[0]}: {error_site(err)}")
            sites.append(error_site(err).split(": ", 1)[0])
        method = 'torch.cuda.set_sync_debug_mode("warn") to list, then "error" to confirm'
    else:
        with audit_host_traffic() as traffic:
            run(phase)
        marked = HOST_SYNCS["count_exchange"] - before
        stray = [f"host read: {s}" for s in traffic.unmarked_reads] + \
                [f"host-to-device copy: {s}" for s in traffic.host_to_device]
        sites = traffic.unmarked_reads + traffic.host_to_device
        method = "CPU dry run: audit_host_traffic (host reads outside the marked region, host-built tensors)"
    expected = 0 if layer.config.static_shapes else 1
    ok = not stray and marked == expected
    return {"status": "pass" if ok else "fail", "marked_syncs": marked, "expected": expected,
            "stray": stray, "sites": sorted(set(sites)), "method": method}


def run(ctx: Context) -> dict:
    cases = []
    for router in ROUTERS:
        for mode, overrides in EP1_MODES.items():
            if ctx.dry_run and mode != "local" and router != "softmax_topk":
                continue  # CPU time: every router once, every mode for one router
            layer = MoELayer(_config(router, "auto", overrides), seed=1).to(ctx.device)
            cases.append({"ep": 1, "router": router, "mode": mode, "precision": "bf16",
                          "backend": layer.experts.backend(ctx.device, torch.bfloat16),
                          **probe(ctx, layer, bf16=True)})
    for mode, overrides in EP1_MODES.items():
        layer = MoELayer(_config("softmax_topk", "loop", overrides), seed=1).to(ctx.device)
        cases.append({"ep": 1, "router": "softmax_topk", "mode": mode, "precision": "fp32",
                      "backend": "loop", **probe(ctx, layer, bf16=False)})
    for ep, rank in MULTI_RANK[-1:] if ctx.dry_run else MULTI_RANK:
        for mode, (overrides, group_kwargs) in MULTI_RANK_MODES.items():
            with fake_world(ep, rank):
                groups = ParallelGroups.build(ep, **group_kwargs)
                layer = MoELayer(_config("softmax_topk", "auto", overrides), groups, seed=1).to(ctx.device)
                cases.append({"ep": ep, "rank": rank, "router": "softmax_topk", "mode": mode,
                              "precision": "bf16", "dispatcher": layer.dispatcher.describe(),
                              **probe(ctx, layer, bf16=True)})
    failed = [c for c in cases if c["status"] != "pass"]
    sites = sorted({s for c in failed for s in c["sites"]})
    summary = (f"{len(cases) - len(failed)}/{len(cases)} cases: static shapes 0 syncs, other modes "
               "exactly the marked count-exchange read" if not failed else
               f"{len(failed)}/{len(cases)} cases with stray syncs or a wrong count; sites: "
               + "; ".join(sites[:6]))
    return result("fail" if failed else "pass", summary, method=cases[0]["method"], cases=cases)
