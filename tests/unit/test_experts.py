"""Local experts: the three compute backends agree (forward and gradients), an expert
with zero tokens is handled, and expert weights depend only on (seed, global id)."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.experts import GroupedExperts

BACKENDS = ["loop", "bmm", "grouped_mm"]
# grouped_mm wants 16-byte aligned strides: fp32 sizes that are multiples of 4.
D, FF, E = 8, 12, 4


def _layer(backend: str, activation: str, capacity_factor: float | None) -> MoELayer:
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=FF, num_experts=E, top_k=2,
                    capacity_factor=capacity_factor, min_capacity=0, activation=activation,
                    expert_backend=backend, aux_loss_coeff=0.01, z_loss_coeff=0.001,
                    init_std=0.3)
    layer = MoELayer(cfg, seed=7)
    with torch.no_grad():
        # Inputs are positive, so a strongly negative gate row means expert 3 never wins
        # a top-2 slot: it receives zero tokens.
        layer.router.weight[3].fill_(-5.0)
    return layer


def _run(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor, object]:
    x = x.clone().requires_grad_()
    out = layer(x)
    # a loss that is not a plain sum, so every output element gets its own gradient
    probe = torch.linspace(-1.0, 1.0, out.output.numel()).view_as(out.output)
    ((out.output * probe).sum() + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return out.output.detach(), grads, x.grad, out.stats


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_backends_agree_with_an_idle_expert(activation: str, capacity_factor: float | None) -> None:
    x = torch.rand(10, D, generator=torch.Generator().manual_seed(0)) + 0.1
    results = {b: _run(_layer(b, activation, capacity_factor), x) for b in BACKENDS}
    ref_out, ref_grads, ref_xgrad, ref_stats = results["loop"]
    assert ref_stats.routed_E[3] == 0 and (ref_stats.routed_E[:3] > 0).all()
    if capacity_factor is not None:
        assert int(ref_stats.dropped_E.sum()) > 0  # the capacity case really drops
    # the idle expert gets an exactly-zero gradient, the busy ones do not
    for name in ("experts.w1_eDF", "experts.w2_eFD"):
        assert torch.equal(ref_grads[name][3], torch.zeros_like(ref_grads[name][3]))
        assert ref_grads[name][:3].abs().sum() > 0
    for backend in ("bmm", "grouped_mm"):
        out, grads, xgrad, stats = results[backend]
        assert torch.equal(stats.kept_E, ref_stats.kept_E)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(xgrad, ref_xgrad, atol=1e-5, rtol=0)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_with_counts_including_zeros(backend: str) -> None:
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=FF, num_experts=E, expert_backend=backend,
                    init_std=0.3)
    experts = GroupedExperts(cfg, range(E), seed=1)
    counts = [0, 3, 0, 2]  # first and a middle expert empty
    x = torch.randn(5, D)
    y = experts(x, counts)
    ex = GroupedExperts(cfg.replace(expert_backend="loop"), range(E), seed=1)
    rows = [1, 1, 1, 3, 3]  # expert of each row
    for n, e in enumerate(rows):
        h = x[n] @ ex.w1_eDF[e]
        ref = (torch.nn.functional.silu(h) * (x[n] @ ex.w3_eDF[e])) @ ex.w2_eFD[e]
        torch.testing.assert_close(y[n], ref, atol=1e-5, rtol=0)
    assert experts(torch.zeros(0, D), [0, 0, 0, 0]).shape == (0, D)


def test_expert_weights_depend_only_on_seed_and_global_id() -> None:
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=FF, num_experts=E)
    full = GroupedExperts(cfg, range(4), seed=3)
    half = GroupedExperts(cfg, [2, 3], seed=3)
    for name in ("w1_eDF", "w2_eFD", "w3_eDF"):
        assert torch.equal(getattr(full, name)[2:], getattr(half, name))
    other_seed = GroupedExperts(cfg, [2, 3], seed=4)
    assert not torch.equal(other_seed.w1_eDF, half.w1_eDF)


@pytest.mark.parametrize(
    "d,f,dtype,multiple",
    [(6, 8, torch.float32, 4), (8, 6, torch.float32, 4), (12, 16, torch.bfloat16, 8)],
)
def test_grouped_mm_unaligned_sizes_raise_value_error(d: int, f: int, dtype: torch.dtype,
                                                      multiple: int) -> None:
    # torch._grouped_mm needs 16-byte row strides; without the check this was an opaque
    # RuntimeError from inside the kernel ("strides should be multiple of 16 bytes").
    cfg = MoEConfig(hidden_size=d, ffn_hidden_size=f, num_experts=4, expert_backend="grouped_mm")
    layer = MoELayer(cfg).to(dtype)
    with pytest.raises(ValueError, match=rf"hidden_size={d} and ffn_hidden_size={f} must be "
                                         rf"multiples of {multiple} for {dtype}"):
        layer(torch.randn(5, d, dtype=dtype))


def test_auto_backend_never_picks_unaligned_grouped_mm(monkeypatch) -> None:
    from expert_parallel.moe import experts as experts_mod

    cfg = MoEConfig(hidden_size=6, ffn_hidden_size=8, num_experts=4)
    experts = GroupedExperts(cfg, range(4))
    monkeypatch.setattr(experts_mod, "_cuda_capability", lambda index: (9, 0))  # an H100
    assert experts.backend(torch.device("cuda"), torch.bfloat16) == "loop"  # 6 is unaligned
    assert experts.backend(torch.device("cpu"), torch.float32) == "loop"
    aligned = GroupedExperts(cfg.replace(hidden_size=8), range(4))
    if hasattr(torch, "_grouped_mm"):
        assert aligned.backend(torch.device("cuda"), torch.bfloat16) == "grouped_mm"
        # fp32 on CUDA is torch's fallback (a host read of the offsets per call): not picked
        assert aligned.backend(torch.device("cuda"), torch.float32) == "loop"
        monkeypatch.setattr(experts_mod, "_cuda_capability", lambda index: (8, 0))  # an A100
        assert aligned.backend(torch.device("cuda"), torch.bfloat16) == "loop"


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
@pytest.mark.parametrize("args,needle", [
    ((8, 16, 4, "cuda", torch.bfloat16, (9, 0)), None),
    ((8, 16, 4, "cuda", torch.bfloat16, (10, 0)), None),
    ((8, 16, 4, "cpu", torch.float32, None), None),
    ((8, 16, 4, "cuda", torch.float32, (9, 0)), "bf16-only"),
    ((8, 16, 4, "cuda", torch.bfloat16, (8, 0)), "this one is sm80"),
    ((8, 16, 4, "cuda", torch.bfloat16, (12, 0)), "this one is sm120"),
    ((8, 16, 4, "cuda", torch.bfloat16, None), "this one is unknown"),
    ((12, 16, 4, "cuda", torch.bfloat16, (9, 0)), "must be multiples of 8 for torch.bfloat16"),
    ((8, 16, 1024, "cuda", torch.bfloat16, (9, 0)), "at most 1023 groups"),
    ((8, 16, 4, "cpu", torch.float64, None), "not torch.float64"),
])
def test_grouped_mm_rules(args, needle) -> None:
    from expert_parallel.moe.experts import grouped_mm_problem

    problem = grouped_mm_problem(*args)
    if needle is None:
        assert problem is None
    else:
        assert problem is not None and needle in problem, problem


def test_explicit_grouped_mm_refused_with_named_error_not_inside_torch(monkeypatch) -> None:
    # fp64 is outside torch._grouped_mm's dtypes: without the check torch raises its own
    # RuntimeError from inside the op; now a GroupedMMUnsupported (a ValueError) says why.
    from expert_parallel.moe.experts import GroupedMMUnsupported

    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, expert_backend="grouped_mm")
    layer = MoELayer(cfg).double()
    with pytest.raises(GroupedMMUnsupported, match=r"expert_backend='grouped_mm' cannot run here: .*float64"):
        layer(torch.randn(5, 8, dtype=torch.float64))


def test_grouped_mm_under_autocast_computes_in_the_autocast_dtype() -> None:
    # Rows arriving in fp32 under bf16 autocast are cast like autocast casts a matmul.
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, expert_backend="grouped_mm")
    experts = GroupedExperts(cfg, range(4), seed=2)
    x = torch.randn(9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, [2, 0, 4, 3])
        ref = GroupedExperts(cfg.replace(expert_backend="loop"), range(4), seed=2)(x, [2, 0, 4, 3])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)
