"""Our MoE layer beside every runnable peer and the floors, same processes, same weights.

Question: at the target config (E=16, k=2, 4096 tokens/rank, D=512, F=2048, EP=2,
forward + backward), in fp32 and in bf16 autocast, how much faster and leaner than
DeepSpeed-MoE, torchtitan's MoE and transformers' EP experts block is our layer, how
close is it to the floor, and which phases make up the difference?

Rows (peers: ``benchmarks/_peers.py``; every one gets our router and expert weights):

* ``ours``: ``MoELayer`` at the capacity factor (compared with DeepSpeed, which drops)
  and ``ours_dropless`` (compared with torchtitan and transformers, which do not).
* ``deepspeed``, ``torchtitan``, ``transformers``: the peers; a peer that is not
  installed (or cannot express the config) is reported as missing, with the reason.
* ``floor`` / ``floor_dropless``: (a) raw ``all_to_all_single`` of exactly our layer's
  splits in the run's dtype, four times (dispatch + combine, forward + backward), plus
  (b) raw expert MLPs (forward + backward incl. weight grads) in that dtype over exactly
  the rows our experts receive, one GEMM chain per local expert.

Precision (``--dtype``; ``both`` = fp32 and bf16 in the same run, interleaved): bf16 is
``torch.autocast("cpu", dtype=torch.bfloat16)`` over fp32 master weights and fp32
input, for every row alike; floors use bf16 tensors directly.

Before timing, each peer is checked to compute our function on the same batch (output
and input gradient of a fixed cotangent): bitwise or within 1e-5 of the output scale in
fp32 (DeepSpeed with drops: against our output divided by our kept weight sum, since it
renormalises over the kept choices), within ``BF16_TOL`` in bf16. DeepSpeed's and
transformers' routers compute their logits inside autocast (bf16; ours and torchtitan's
stay fp32), so in bf16 the tokens whose kept experts change under bf16 logits (our
routing rule applied to them, capacity included) are excluded from the comparison and
counted; every other token must agree.

Timing: slowest rank's wall time after a barrier, median over iterations, every row in
alternating order each iteration. Memory: peak live tensor bytes of one forward +
backward per rank with the collectives replayed (``_common.replayed_peak_bytes``:
independent of the peers' timing, repeats agree exactly; spread reported), max over
ranks, exchange buffers reported beside it. Phases: profiled calls per row (minimum per category)
(``_common.op_breakdown``), and our layer's own phase profile (``MoEProfiler``).

    DS_ACCELERATOR=cpu nice -n 10 python benchmarks/compare_peers.py                 # target config
    python benchmarks/compare_peers.py --capacity-factor 2.0 --out benchmarks/results/compare_peers_cf2.json
    python benchmarks/compare_peers.py --tokens 128 --hidden 32 --ffn 64 --iters 2 --out /tmp/p.json  # smoke
    python benchmarks/compare_peers.py --render benchmarks/results/compare_peers.json   # md + png again
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any deepspeed import (also in children)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import _peers  # noqa: E402
from benchmarks._peers_report import PEER_REF, TARGETS, _markdown, _plot, _targets, render  # noqa: E402
from benchmarks._common import (add_dtype_arg, environment, median, op_breakdown, precisions,  # noqa: E402
                                replayed_peak_bytes, spawn, timed_max, timed_wall_cpu, write_report)

FP32_TOL = 1e-5
"""fp32 equality: max abs difference / max abs of our output (or input gradient)."""
BF16_TOL = 3e-2
"""bf16 equality, same measure (the bound ``tests/distributed/test_bf16.py`` states)."""
BF16_MAX_CHANGED = 0.05
"""bf16: at most this fraction of tokens may have their kept experts changed by a peer
router that computes its logits in bf16; every other token must agree."""


def _args(argv: list[str] | None, defaults: dict | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capacity-factor", type=lambda s: None if s.lower() == "none" else float(s), default=1.25,
                   help="ours/DeepSpeed capacity factor ('none': dropless everywhere)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--activation", default="swiglu", choices=["swiglu", "gelu"],
                   help="expert MLP (torchtitan and transformers are SwiGLU only)")
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--peers", default=",".join(_peers.PEERS),
                   help=f"comma list of {', '.join(_peers.PEERS)} (ours and the floors always run)")
    add_dtype_arg(p, default="both", extra=("both",))
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-repeats", type=int, default=3)
    p.add_argument("--profile-repeats", type=int, default=3,
                   help="profiled calls per row for the phase breakdown (minimum per category)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/compare_peers.json")
    if defaults:
        p.set_defaults(**defaults)
    a = p.parse_args(argv)
    a.peers = [s for s in a.peers.split(",") if s]
    unknown = sorted(set(a.peers) - set(_peers.PEERS))
    if unknown:
        p.error(f"--peers: unknown {unknown}; choose from {list(_peers.PEERS)}")
    return a


def _gather_obj(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -- equality ------------------------------------------------------------------------------
def _fwd_bwd(forward, x: torch.Tensor, cot: torch.Tensor, prec) -> tuple[torch.Tensor, torch.Tensor]:
    xx = x.clone().requires_grad_(True)
    with prec.autocast("cpu"):
        y, _ = forward(xx, prec.name == "bf16")
    (y.float() * cot).sum().backward()
    return y.detach().float(), xx.grad.detach().float()


def _kept_experts_TE(layer, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our routing rule applied to ``logits_TE``: which experts each token is sent to
    after the capacity (``[T, E]`` bool), and the sum of its kept combine weights."""
    from expert_parallel.moe.capacity import plan_capacity

    cfg = layer.config
    probs = torch.softmax(logits_TE.float(), dim=-1)
    w_TK, idx_TK = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.normalize_topk and cfg.top_k > 1:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    cap = cfg.capacity(logits_TE.shape[0], layer.training)
    plan = plan_capacity(idx_TK, w_TK, cfg.num_experts, cap, cfg.drop_policy)
    kept_TE = torch.zeros_like(probs, dtype=torch.bool)
    kept_TE.scatter_(1, idx_TK, plan.kept_TK)
    return kept_TE, (plan.kept_TK.float() * w_TK).sum(-1)


def _routing(layer, x: torch.Tensor, bf16_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept experts ``[T, E]``, kept weight sum ``[T]``) of our routing rule on logits
    computed in fp32 (ours) or under bf16 autocast (a peer router inside autocast)."""
    with torch.no_grad():
        if bf16_logits:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = F.linear(x.float(), layer.router.weight.float())
        else:
            logits = F.linear(x.float(), layer.router.weight.float())
        return _kept_experts_TE(layer, logits.float())


def _check_equal(name: str, peer, ref_layer, x, cot, prec) -> dict:
    def ours(xx, bf16):
        out = ref_layer(xx)
        return out.output, out.aux_loss

    y_ref, g_ref = _fwd_bwd(ours, x, cot, prec)
    y, g = _fwd_bwd(peer.forward, x, cot, prec)
    kept_TE, kept_w_T = _routing(ref_layer, x, bf16_logits=False)
    adjusted = False
    if peer.name == "deepspeed" and peer.drops:
        # DeepSpeed renormalises over the kept choices: its output is ours / kept weight.
        y_ref = torch.where(kept_w_T[:, None] > 0, y_ref / kept_w_T.clamp_min(1e-30)[:, None], y_ref)
        adjusted = True
    # Tokens the peer's own router sends to other experts than ours (after its capacity).
    # In fp32 there must be none. In bf16, a router inside autocast computes bf16 logits
    # (DeepSpeed also a bf16 softmax, whose ties its argmax breaks by index); with a
    # capacity one changed token can also move later tokens' slots. Those tokens are
    # counted, and excluded from the value comparison.
    affected_T = (peer.routing(x, prec.name == "bf16") != kept_TE).any(-1)
    scale_y = max(y_ref.abs().max().item(), 1e-30)
    scale_g = max(g_ref.abs().max().item(), 1e-30)
    err_y_T = (y - y_ref).abs().amax(-1) / scale_y
    err_g_T = (g - g_ref).abs().amax(-1) / scale_g
    tol = FP32_TOL if prec.name == "fp32" else BF16_TOL
    outside_T = err_y_T > tol
    if not adjusted:  # the input gradient (of a fixed cotangent) must agree as well
        outside_T |= err_g_T > tol
    rest = ~affected_T
    return {"peer": name, "reference": "ours" if ref_layer.config.capacity_factor is not None else "ours_dropless",
            "bitwise": bool(torch.equal(y, y_ref) and (adjusted or torch.equal(g, g_ref))),
            "max_rel_err_output": err_y_T.max().item() if err_y_T.numel() else 0.0,
            "max_rel_err_output_unaffected": err_y_T[rest].max().item() if rest.any() else 0.0,
            "max_rel_err_input_grad_unaffected": (None if adjusted else
                                                  (err_g_T[rest].max().item() if rest.any() else 0.0)),
            "tokens": int(x.shape[0]), "tokens_outside_tol": int(outside_T.sum()),
            "tokens_routed_otherwise": int(affected_T.sum()),
            "outside_tol_routing_unchanged": int((outside_T & rest).sum()),
            "deepspeed_renormalised": adjusted}


def _merge_equal(per_rank: list[dict], prec_name: str) -> dict:
    m = dict(per_rank[0])
    for key in ("max_rel_err_output", "max_rel_err_output_unaffected"):
        m[key] = max(r[key] for r in per_rank)
    grads = [r["max_rel_err_input_grad_unaffected"] for r in per_rank
             if r["max_rel_err_input_grad_unaffected"] is not None]
    m["max_rel_err_input_grad_unaffected"] = max(grads) if grads else None
    for key in ("tokens", "tokens_outside_tol", "tokens_routed_otherwise",
                "outside_tol_routing_unchanged"):
        m[key] = sum(r[key] for r in per_rank)
    m["bitwise"] = all(r["bitwise"] for r in per_rank)
    tol = FP32_TOL if prec_name == "fp32" else BF16_TOL
    what = "output" + ("" if m["deepspeed_renormalised"] else " and input grad")
    if prec_name == "fp32":
        m["rule"] = f"same routing and every token's {what} within {tol:g} of the scale"
        m["pass"] = m["tokens_outside_tol"] == 0 and m["tokens_routed_otherwise"] == 0
    else:
        m["rule"] = (f"every token's {what} within {tol:g} of the scale, except tokens the peer's bf16 "
                     f"router sends elsewhere (at most {BF16_MAX_CHANGED:.0%})")
        m["pass"] = (m["outside_tol_routing_unchanged"] == 0
                     and m["tokens_routed_otherwise"] <= BF16_MAX_CHANGED * m["tokens"])
    return m


# -- the worker ----------------------------------------------------------------------------
def _worker(rank: int, world: int, a: argparse.Namespace) -> dict:
    from expert_parallel import MoEConfig, MoELayer, ParallelGroups
    from expert_parallel.profiling.profiler import MoEProfiler, ProfilerConfig

    groups = ParallelGroups.build(a.ep)
    cf = a.capacity_factor
    base = MoEConfig(hidden_size=a.hidden, ffn_hidden_size=a.ffn, num_experts=a.experts, top_k=a.top_k,
                     capacity_factor=cf, eval_capacity_factor=cf, activation=a.activation,
                     aux_loss_coeff=0.01)
    layers = {}
    if cf is not None:
        layers["ours"] = MoELayer(base, groups, seed=a.seed)
    if cf is None or any(PEER_REF[p] == "ours_dropless" for p in a.peers):
        layers["ours_dropless"] = MoELayer(base.replace(capacity_factor=None, eval_capacity_factor=None),
                                           groups, seed=a.seed)
    cf_layer = layers.get("ours", layers.get("ours_dropless"))

    peers, missing = {}, {}
    for name in a.peers:
        ref = layers.get(PEER_REF[name], cf_layer)
        try:
            peers[name] = _peers.BUILDERS[name](ref, a.ep)
        except _peers.PeerMissing as err:
            missing[name] = str(err)
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(a.tokens, a.hidden, generator=gen)
    cot = torch.randn(a.tokens, a.hidden, generator=gen)
    precs = precisions(a.dtype)

    # Equality before timing.
    equality: dict = {}
    for prec in precs:
        for name, peer in peers.items():
            ref = layers.get(PEER_REF[name], cf_layer)
            res = _check_equal(name, peer, ref, x, cot, prec)
            equality.setdefault(prec.name, {})[name] = _merge_equal(_gather_obj(res), prec.name)

    # Splits and rows of our layers' exchanges (what the floors move and compute).
    floors_io = {}
    for lname, layer in layers.items():
        with torch.no_grad():
            out = layer(x)
        kept_RE = torch.stack(_gather_tensor(out.stats.kept_E)).tolist()
        e_local, me, members = a.experts // a.ep, groups.ep_rank, list(groups.ep_ranks)
        floors_io[lname] = {
            "in": [sum(kept_RE[rank][d * e_local:(d + 1) * e_local]) for d in range(a.ep)],
            "out": [sum(kept_RE[s][me * e_local:(me + 1) * e_local]) for s in members],
            "rows": [sum(kept_RE[s][me * e_local + l] for s in members) for l in range(e_local)],
            "drop_fraction": out.stats.drop_fraction,
        }

    impls: dict[str, callable] = {}
    for prec in precs:
        bf16 = prec.name == "bf16"

        def step(forward, prec=prec, bf16=bf16):
            def run() -> None:
                xx = x.clone().requires_grad_(True)
                with prec.autocast("cpu"):
                    y, aux = forward(xx, bf16)
                    loss = y.float().square().mean() + aux
                loss.backward()
            return run

        for lname, layer in layers.items():
            impls[f"{lname}@{prec.name}"] = step(lambda xx, _b, layer=layer: _ours_fwd(layer, xx))
        for name, peer in peers.items():
            impls[f"{name}@{prec.name}"] = step(peer.forward)
        dtype = torch.bfloat16 if bf16 else torch.float32
        for lname, io in floors_io.items():
            suffix = "" if lname == "ours" else "_dropless"
            a2a, gemm = _floors(a, io, dtype, groups)
            impls[f"floor_a2a{suffix}@{prec.name}"] = a2a
            impls[f"floor_experts{suffix}@{prec.name}"] = gemm

    times: dict[str, list[float]] = {k: [] for k in impls}
    cpu_times: dict[str, list[float]] = {k: [] for k in impls}
    names = list(impls)
    for it in range(a.warmup + a.iters):
        order = names if it % 2 == 0 else names[::-1]  # alternate to cancel drift
        for name in order:
            t, c = timed_wall_cpu(impls[name])
            if it >= a.warmup:
                times[name].append(t)
                cpu_times[name].append(c)

    # Peak memory per rank, collectives replayed (grads exist from the warmup: equal footing).
    memory = {}
    for name in names:
        if name.startswith("floor"):
            continue
        dist.barrier()
        memory[name] = replayed_peak_bytes(impls[name], repeats=a.memory_repeats)
    # Where the time goes: profiled calls per row (minimum per category).
    breakdown = {}
    for name in names:
        dist.barrier()
        breakdown[name] = op_breakdown(impls[name], repeats=a.profile_repeats)

    # Our layer's phase profile for two steps (kept for cluster_model.py), first precision.
    prof = MoEProfiler({"moe": cf_layer}, groups, ProfilerConfig(start_step=0, num_steps=2))
    run_cf = impls[f"{'ours' if cf is not None else 'ours_dropless'}@{precs[0].name}"]
    for s in range(2):
        prof.step_begin(s)
        dt = timed_max(run_cf)
        prof.step_end(s, step_time_s=dt)
    ds_rows = None
    if "deepspeed" in peers and cf is not None:
        ds_rows = a.experts * cf_layer.config.capacity(a.tokens, True)
    return {"times": times, "cpu_times": cpu_times, "memory": memory, "breakdown": breakdown, "equality": equality,
            "missing": missing, "notes": {n: p.notes for n, p in peers.items()}, "shims": list(_peers.SHIMS),
            "floors_io": floors_io, "profile": prof.records, "ds_rows_per_rank": ds_rows,
            "precisions": [p.to_dict() for p in precs]}


def _ours_fwd(layer, xx):
    out = layer(xx)
    return out.output, out.aux_loss


def _gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def _floors(a, io: dict, dtype: torch.dtype, groups):
    """The raw all-to-all (four exchanges of our splits) and raw expert MLPs (our rows)."""
    in_s, out_s, rows = io["in"], io["out"], io["rows"]
    send = torch.randn(sum(in_s), a.hidden).to(dtype)
    back = torch.randn(sum(out_s), a.hidden).to(dtype)
    swiglu = a.activation == "swiglu"

    def w(*shape):
        return (0.02 * torch.randn(*shape)).to(dtype).requires_grad_(True)

    w1 = [w(a.hidden, a.ffn) for _ in rows]
    w3 = [w(a.hidden, a.ffn) for _ in rows] if swiglu else None
    w2 = [w(a.ffn, a.hidden) for _ in rows]
    xe = [torch.randn(n, a.hidden).to(dtype).requires_grad_(True) for n in rows]

    def a2a(src, o, i):
        dst = src.new_empty(sum(o), a.hidden)
        dist.all_to_all_single(dst, src, o, i, group=groups.ep_group)

    def run_a2a() -> None:
        a2a(send, out_s, in_s)   # dispatch forward
        a2a(back, in_s, out_s)   # combine forward
        a2a(send, out_s, in_s)   # combine backward (dispatch direction)
        a2a(back, in_s, out_s)   # dispatch backward (combine direction)

    def run_gemm() -> None:
        for l in range(len(rows)):
            h = F.silu(xe[l] @ w1[l]) * (xe[l] @ w3[l]) if swiglu else F.gelu(xe[l] @ w1[l])
            (h @ w2[l]).float().sum().backward()

    return run_a2a, run_gemm


# -- the report ----------------------------------------------------------------------------


def main(argv: list[str] | None = None, defaults: dict | None = None, benchmark: str = "compare_peers") -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:
        return render(argv[1])
    a = _args(argv, defaults)
    if a.experts % a.ep:
        raise ValueError(f"--experts={a.experts} must be divisible by --ep={a.ep}")
    env = environment()  # before the run: its load average is the load at start
    results = spawn(_worker, a.ep, a, threads=a.threads)
    r0 = results[0]
    cf = a.capacity_factor
    med = {k: median(v) for k, v in r0["times"].items()}
    cpu_med = {k: median(v) for k, v in r0["cpu_times"].items()}
    peak = {k: max(max(r["memory"][k]["peak_bytes"]) for r in results) for k in r0["memory"]}
    spread = {k: max(r["memory"][k]["spread"] for r in results) for k in r0["memory"]}
    exch = {k: max(sum(r["memory"][k]["exchange_bytes"].values()) for r in results) for k in r0["memory"]}
    prec_names = [p["dtype"] for p in r0["precisions"]]
    peers = [n for n in a.peers if n not in r0["missing"]]
    by_dtype: dict = {}
    for d in prec_names:
        row = {"times_ms": {}, "cpu_ms": {}, "peak_mib": {}, "memory_spread": {}, "exchange_mib": {}}
        for k in med:
            name, dd = k.split("@")
            if dd == d:
                row["times_ms"][name] = 1e3 * med[k]
                row["cpu_ms"][name] = 1e3 * cpu_med[k]
        for k in peak:
            name, dd = k.split("@")
            if dd == d:
                row["peak_mib"][name] = peak[k] / 2**20
                row["memory_spread"][name] = spread[k]
                row["exchange_mib"][name] = exch[k] / 2**20
        t, c = row["times_ms"], row["cpu_ms"]
        for suffix, lname in (("", "ours"), ("_dropless", "ours_dropless")):
            if lname in t:
                for tt in (t, c):
                    tt[f"floor{suffix}"] = tt[f"floor_a2a{suffix}"] + tt[f"floor_experts{suffix}"]
                row[f"{lname}_over_floor"] = t[lname] / t[f"floor{suffix}"]
                row[f"{lname}_over_floor_cpu"] = c[lname] / c[f"floor{suffix}"]
        for p in peers:
            ref = PEER_REF[p] if PEER_REF[p] in t else "ours_dropless"
            row[f"speedup_vs_{p}"] = t[p] / t[ref]
            row[f"speedup_vs_{p}_cpu"] = c[p] / c[ref]
            # A layer at its floor can be at most this much faster than the peer: the
            # bound on any speedup target against it.
            floor = "floor" if ref == "ours" else "floor_dropless"
            row[f"{p}_over_floor"] = t[p] / t[floor]
            row[f"{p}_over_floor_cpu"] = c[p] / c[floor]
            row[f"memory_ratio_vs_{p}"] = row["peak_mib"][ref] / row["peak_mib"][p]
        row["equality"] = r0["equality"].get(d, {})
        bd = {}
        for k, v in r0["breakdown"].items():
            name, dd = k.split("@")
            if dd == d:
                bd[name] = v
        row["breakdown_ms"] = bd
        by_dtype[d] = row

    primary = "bf16" if "bf16" in by_dtype else prec_names[0]
    prim = by_dtype[primary]
    ds_target = TARGETS["speedup_vs_deepspeed_min"].get(cf) if cf is not None else None
    targets = _targets(by_dtype, peers, ds_target)
    report = {
        "benchmark": benchmark,
        "config": {k: v for k, v in vars(a).items()},
        **env,
        "precisions": r0["precisions"],
        "by_dtype": by_dtype,
        "primary_dtype": primary,
        "times_s": {k: {"median": med[k], "all": r0["times"][k]} for k in med},
        "cpu_times_s": {k: {"median": cpu_med[k], "all": r0["cpu_times"][k]} for k in cpu_med},
        "missing_peers": r0["missing"],
        "peer_notes": r0["notes"],
        "shims": r0["shims"],
        "targets": targets,
        "profile": r0["profile"],
        "drop_fraction_ours": [_lead_io(r)["drop_fraction"] for r in results],
        "expert_rows_per_rank": {"ours": [sum(_lead_io(r)["rows"]) for r in results],
                                 "deepspeed": r0["ds_rows_per_rank"]},
        "memory_method": "peak live tensor bytes of one fwd+bwd per rank, collectives recorded then replayed "
                         "locally (independent of the peers' timing); max over ranks; exchange buffers = "
                         "bytes received by the collectives of that pass (inside the peak)",
    }
    # Headline keys (compare_deepspeed's, in the primary precision).
    lead = "ours" if "ours" in prim["times_ms"] else "ours_dropless"
    report["efficiency_vs_floor"] = 1.0 / prim[f"{lead}_over_floor"]
    if "deepspeed" in peers:
        report["speedup_vs_deepspeed"] = prim["speedup_vs_deepspeed"]
        report["memory_ratio_vs_deepspeed"] = prim["memory_ratio_vs_deepspeed"]
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    md = _markdown(a, report, by_dtype, peers)
    write_report(a.out, report, md, lambda plt: _plot(plt, by_dtype, cf, a.ep))
    print("\n".join(md), flush=True)
    return report


def _lead_io(r: dict) -> dict:
    io = r["floors_io"]
    return io["ours"] if "ours" in io else io["ours_dropless"]


if __name__ == "__main__":
    main()
