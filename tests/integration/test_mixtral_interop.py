"""Hugging Face Mixtral interop: same logits after making the model expert-parallel.

A tiny random ``MixtralForCausalLM`` (from a ``MixtralConfig``, no download) is built
with the same seed on every rank; each rank feeds its own batch. Its logits before and
after ``replace_moe_blocks`` must agree within 1e-5 (fp32, dropless) at EP=1 (in
process), EP=2 (2 ranks), EP=4 and EP=2 x DP=2 (4 ranks, one spawn); and the round trip
back to the HF layout (``hf_state_dict`` and ``gather_to_hf``) must restore every
original tensor exactly and give bitwise the original logits.
"""

from __future__ import annotations

import functools

import pytest
import torch

# Needs the optional 'hf' extra (transformers); a missing install fails, not skips.
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from expert_parallel import ParallelGroups  # noqa: E402
from expert_parallel.interop.hf_mixtral import (  # noqa: E402
    HFMoEBlock,
    gather_to_hf,
    hf_state_dict,
    moe_aux_loss,
    moe_stats,
    replace_moe_blocks,
)
from tests.harness import run_ranks  # noqa: E402

TOL = 1e-5
VOCAB = 96


def tiny_config(**kw) -> MixtralConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    base.update(kw)
    return MixtralConfig(**base)


def tiny_model(**kw) -> MixtralForCausalLM:
    torch.manual_seed(1234)  # same weights on every rank
    return MixtralForCausalLM(tiny_config(**kw)).eval()


def check_round_trip(groups) -> dict:
    """Returns the measured numbers for this rank (and asserts nothing itself, so the
    parent reports every rank)."""
    rank = groups.rank if groups is not None else 0
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(50 + rank))
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids).logits
    names = replace_moe_blocks(model, groups)
    local_experts = [model.get_submodule(n).moe.experts.num_local for n in names]
    with torch.no_grad():
        after = model(ids).logits
    stats = moe_stats(model)
    aux = float(moe_aux_loss(model))
    sd = hf_state_dict(model)
    sd_exact = set(sd) == set(original) and all(torch.equal(sd[k], original[k]) for k in original)
    gather_to_hf(model, groups)
    restored = model.state_dict()
    restored_exact = set(restored) == set(original) and all(
        torch.equal(restored[k], original[k]) for k in original)
    with torch.no_grad():
        again = model(ids).logits
    return {
        "names": names,
        "local_experts": local_experts,
        "max_diff": (before - after).abs().max().item(),
        "stats_tokens": {n: int(s.num_tokens) for n, s in stats.items()},
        "aux_finite": aux == aux,
        "sd_exact": sd_exact,
        "restored_exact": restored_exact,
        "no_ep_blocks_left": not any(isinstance(m, HFMoEBlock) for m in model.modules()),
        "logits_bitwise_after_gather": torch.equal(before, again),
    }


def _worker(rank: int, world: int, ep_sizes: tuple[int, ...]) -> dict:
    return {ep: check_round_trip(ParallelGroups.build(ep)) for ep in ep_sizes}


@functools.lru_cache(maxsize=None)
def spawn(world: int, ep_sizes: tuple[int, ...]) -> list[dict]:
    return run_ranks(_worker, world, ep_sizes, timeout=300)


RUNS = {1: lambda: [{1: check_round_trip(None)}], 2: lambda: spawn(2, (2,)),
        4: lambda: spawn(4, (4, 2))}
CASES = [(1, 1), (2, 2), (4, 4), (4, 2)]


@pytest.mark.parametrize("world,ep", CASES)
def test_logits_equal_and_round_trip_exact(world: int, ep: int) -> None:
    results = RUNS[world]()
    for rank, res in enumerate(results):
        r = res[ep]
        tag = f"world {world} EP={ep} rank {rank}"
        print(f"{tag}: max |logits_hf - logits_ep| = {r['max_diff']:.3e}")
        assert r["names"] == ["model.layers.0.mlp", "model.layers.1.mlp"], tag
        assert r["local_experts"] == [8 // ep, 8 // ep], tag
        assert r["max_diff"] <= TOL, f"{tag}: max abs diff {r['max_diff']:.3e} > {TOL}"
        assert r["stats_tokens"] == {"model.layers.0.mlp": 22, "model.layers.1.mlp": 22}, tag
        assert r["aux_finite"], tag
        assert r["sd_exact"], f"{tag}: hf_state_dict differs from the original weights"
        assert r["restored_exact"], f"{tag}: gather_to_hf did not restore the original weights"
        assert r["no_ep_blocks_left"], tag
        assert r["logits_bitwise_after_gather"], tag


def test_training_gradients_match_hf_at_ep1() -> None:
    """The replaced model trains like the original: same loss and dense gradients."""
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    ref, ep = tiny_model(), tiny_model()
    replace_moe_blocks(ep, None, aux_loss_coeff=0.0)
    grads = []
    for m in (ref, ep):
        m.train()
        loss = m(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), m.model.embed_tokens.weight.grad.clone(),
                      m.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (la, *ga), (lb, *gb) = grads
    assert abs(la.item() - lb.item()) <= TOL
    for a, b in zip(ga, gb):
        assert (a - b).abs().max().item() <= TOL
    g_gate = ref.model.layers[1].mlp.gate.weight.grad
    g_router = ep.model.layers[1].mlp.moe.router.weight.grad
    assert (g_gate - g_router).abs().max().item() <= TOL
    g_down = ref.model.layers[1].mlp.experts.down_proj.grad  # [E, D, F]
    g_w2 = ep.model.layers[1].mlp.moe.experts.w2_eFD.grad  # [E, F, D]
    assert (g_down - g_w2.transpose(1, 2)).abs().max().item() <= TOL


@pytest.mark.parametrize("changes,needle", [
    (dict(num_experts_per_tok=1), "num_experts_per_tok must be >= 2"),
    (dict(hidden_act="gelu"), "config.hidden_act must be 'silu' .*got 'gelu'"),
])
def test_bad_models_are_refused(changes: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        replace_moe_blocks(tiny_model(**changes))


def test_no_blocks_and_no_ep_blocks_are_errors() -> None:
    with pytest.raises(ValueError, match="model has no MoE block"):
        replace_moe_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no expert-parallel HFMoEBlock"):
        gather_to_hf(tiny_model())
    with pytest.raises(TypeError, match="groups must be a ParallelGroups"):
        replace_moe_blocks(tiny_model(), groups=2)
