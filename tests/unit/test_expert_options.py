"""The expert options GPT-OSS needs: ``activation='swiglu_clamped'``, ``expert_proj_bias``
and ``router_bias``.

Each is checked against the formula written out by hand here (not against the layer's
own helpers): the clamped SwiGLU ``(clamp(u, -L, L) + 1) * g * sigmoid(alpha * g)`` with
``g = min(h, L)``; biases added after each projection; a router bias added to the
logits. The three expert backends agree with biases on, the seeded weights do not move
when the new options are switched on, and bad values are refused with the field named.
"""

from __future__ import annotations

import re

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer
from expert_parallel.moe.experts import GroupedExperts

D, F, E = 8, 12, 4


def cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=2, capacity_factor=None)
    base.update(kw)
    return MoEConfig(**base)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 2.0)  # large: the clamp is active


def by_hand(experts: GroupedExperts, x_ND: torch.Tensor, counts: list[int], alpha: float, limit: float):
    outs, start = [], 0
    for l, n in enumerate(counts):
        x = x_ND[start:start + n]
        start += n
        gate = x @ experts.w1_eDF[l] + experts.b1_eF[l]
        up = x @ experts.w3_eDF[l] + experts.b3_eF[l]
        gate = torch.minimum(gate, torch.tensor(limit))
        up = torch.maximum(torch.minimum(up, torch.tensor(limit)), torch.tensor(-limit))
        act = (up + 1.0) * gate * (1.0 / (1.0 + torch.exp(-alpha * gate)))
        outs.append(act @ experts.w2_eFD[l] + experts.b2_eD[l])
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["loop", "bmm", "grouped_mm"])
def test_clamped_swiglu_with_biases_matches_the_formula(backend: str) -> None:
    c = cfg(activation="swiglu_clamped", expert_proj_bias=True, expert_backend=backend)
    experts = GroupedExperts(c, range(E))
    randomise(experts)
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1))
    want = by_hand(experts, x, counts, 1.702, 7.0)
    got = experts(x, counts)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    # the clamp is exercised: some gate and up projections exceed the limit
    assert (x @ experts.w1_eDF[0] + experts.b1_eF[0]).abs().max() > 7.0


def test_backends_agree_with_biases_in_value_and_gradient() -> None:
    counts = [4, 1, 0, 6]
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(2))
    results = {}
    for backend in ("loop", "bmm", "grouped_mm"):
        experts = GroupedExperts(cfg(activation="swiglu_clamped", expert_proj_bias=True,
                                     swiglu_limit=1.5, swiglu_alpha=0.7, expert_backend=backend), range(E))
        randomise(experts, seed=3)
        xx = x.clone().requires_grad_(True)
        y = experts(xx, counts)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[backend] = [y.detach(), xx.grad] + [p.grad for p in experts.parameters()]
    for backend in ("bmm", "grouped_mm"):
        for a, b in zip(results["loop"], results[backend]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), backend
    # a bias of an expert that got no rows gets no gradient
    bias_grads = results["loop"][-3:]
    assert all(g[2].abs().max() == 0 for g in bias_grads)


def test_router_bias_is_added_to_the_logits_and_trained() -> None:
    layer = MoELayer(cfg(router="topk_softmax", router_bias=True), None, seed=0)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 5.0]))
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(4))
    want = x @ layer.router.weight.t() + layer.router.bias
    assert torch.allclose(layer.router.logits(x), want)
    out = layer(x)
    # a +5 bias on experts 1 and 3 makes them every token's pair
    assert set(out.stats.routed_E.nonzero().flatten().tolist()) == {1, 3}
    out.output.sum().backward()
    assert layer.router.bias.grad is not None and layer.router.bias.grad.abs().sum() > 0
    assert "router.bias" in layer.global_state_dict()


def test_new_options_leave_the_seeded_weights_alone() -> None:
    plain = MoELayer(cfg(), None, seed=7)
    gpt_oss = MoELayer(cfg(activation="swiglu_clamped", expert_proj_bias=True, router_bias=True,
                           router="topk_softmax"), None, seed=7)
    for name in ("w1_eDF", "w2_eFD", "w3_eDF"):
        assert torch.equal(getattr(plain.experts, name), getattr(gpt_oss.experts, name)), name
    assert torch.equal(plain.router.weight, gpt_oss.router.weight)
    assert plain.experts.b1_eF is None and plain.router.bias is None
    sd = gpt_oss.global_state_dict()
    for key, shape in (("experts.b1_eF", (E, F)), ("experts.b3_eF", (E, F)), ("experts.b2_eD", (E, D)),
                       ("router.bias", (E,))):
        assert tuple(sd[key].shape) == shape, key
    gpt_oss.load_global_state_dict({k: v + 1 for k, v in sd.items()})
    assert torch.equal(gpt_oss.experts.b2_eD, sd["experts.b2_eD"] + 1)


def test_gelu_experts_get_no_up_bias() -> None:
    experts = GroupedExperts(cfg(activation="gelu", expert_proj_bias=True), range(E))
    assert experts.b3_eF is None and experts.b1_eF.shape == (E, F) and experts.b2_eD.shape == (E, D)


@pytest.mark.parametrize("changes,error,message", [
    (dict(swiglu_limit=3.0), ValueError,
     "swiglu_limit=3.0 is only used by activation='swiglu_clamped', got activation='swiglu'"),
    (dict(swiglu_alpha=1.0, activation="gelu"), ValueError,
     "swiglu_alpha=1.0 is only used by activation='swiglu_clamped', got activation='gelu'"),
    (dict(activation="swiglu_clamped", swiglu_limit=0.0), ValueError, "swiglu_limit"),
    (dict(activation="swiglu_clamped", swiglu_alpha=-1.0), ValueError, "swiglu_alpha"),
    (dict(router_bias=1), TypeError, "router_bias must be a bool, got 1"),
    (dict(expert_proj_bias="yes"), TypeError, "expert_proj_bias must be a bool, got 'yes'"),
])
def test_bad_values_are_refused_naming_the_field(changes: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        cfg(**changes)
