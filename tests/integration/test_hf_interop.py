"""Hugging Face interop for every supported family: same logits and gradients as HF.

For each family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS) a small
random model is built from its transformers config with the same seed on every rank
(``expert_parallel.interop.hf.small``); each rank feeds its own batch. Checked against
transformers' own implementation of the same model:

* logits after ``replace_moe_blocks`` equal the HF model's within 1e-5 relative (fp32,
  dropless) at EP=1 (in process), EP=2 (2 ranks), EP=4 and EP=2 x DP=2 (4 ranks);
* at EP=2 the gradient of every parameter equals HF's: HF's gradients on each rank's
  batch averaged over the ranks vs ours after ``sync_gradients``; the experts are
  compared shard by shard (this rank's experts against the same rows of HF's gradient
  mapped to our layout), routers, shared experts and dense parameters whole;
* ``hf_state_dict`` and ``gather_to_hf`` give back every original tensor bit for bit,
  and the gathered model's logits are bitwise the original's;
* ``save_pretrained`` of the gathered model, reloaded in plain transformers, gives the
  same logits.
"""

from __future__ import annotations

import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from expert_parallel import ParallelGroups
from expert_parallel.interop.hf import (HFMoEBlock, gather_to_hf, hf_state_dict, moe_aux_loss, moe_families,
                                        moe_stats, replace_moe_blocks)
from expert_parallel.interop.hf.small import MODEL_TYPES, small_config, small_model
from expert_parallel.training.parallel import sync_gradients
from tests.harness import run_ranks

TOL = 1e-5
VOCAB = 96
MAPPING_OF = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "olmoe": "qwen3_moe",
              "deepseek_v3": "deepseek_v3", "gpt_oss": "gpt_oss"}
MOE_LAYERS = {mt: ["model.layers.0.mlp", "model.layers.1.mlp"] for mt in MODEL_TYPES}
MOE_LAYERS["deepseek_v3"] = ["model.layers.1.mlp"]  # first_k_dense_replace=1: layer 0 is dense


def model_of(model_type: str):
    return small_model(small_config(model_type), seed=1)


def batch(rank: int, seed: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + rank)
    return torch.randint(0, VOCAB, (2, 11), generator=gen), torch.randint(0, VOCAB, (2, 11), generator=gen)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def logits_case(groups, model_type: str, save_dir: str | None = None) -> dict:
    """Measured numbers for this rank; asserts nothing, so the parent reports every rank."""
    rank = groups.rank if groups is not None else 0
    model = model_of(model_type)
    ids, _ = batch(rank)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    names = replace_moe_blocks(model, groups)
    local = [model.get_submodule(n).moe.experts.num_local for n in names]
    with torch.no_grad():
        after = model(input_ids=ids).logits
    stats = moe_stats(model)
    families = moe_families(model)
    aux = float(moe_aux_loss(model))
    sd = hf_state_dict(model)
    sd_exact = set(sd) == set(original) and all(torch.equal(sd[k], original[k]) for k in original)
    gather_to_hf(model, groups)
    restored = model.state_dict()
    restored_exact = set(restored) == set(original) and all(torch.equal(restored[k], original[k]) for k in original)
    with torch.no_grad():
        again = model(input_ids=ids).logits
    out = {"names": names, "local_experts": local, "families": families, "rel": rel_diff(after, before),
           "tokens": {n: int(s.num_tokens) for n, s in stats.items()}, "aux_finite": aux == aux,
           "sd_exact": sd_exact, "restored_exact": restored_exact,
           "no_ep_blocks_left": not any(isinstance(m, HFMoEBlock) for m in model.modules()),
           "bitwise_after_gather": torch.equal(before, again)}
    if save_dir is not None and rank == 0:
        model.save_pretrained(os.path.join(save_dir, model_type))
        out["saved_logits"] = again
        out["ids"] = ids
    return out


def _expected_block_grads(ref_block: torch.nn.Module, mapping) -> dict[str, torch.Tensor]:
    """HF's gradient of one block in our global layout (the mapping is linear)."""
    grads = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for k, p in ref_block.named_parameters()}
    grads.update({k: torch.zeros_like(b) for k, b in ref_block.named_buffers()})
    return {k: v.clone() for k, v in mapping.to_ours(grads).items()}


def grad_case(groups, model_type: str) -> dict:
    rank, world = groups.rank, groups.world_size
    ref, ours = model_of(model_type).train(), model_of(model_type).train()
    ids, targets = batch(rank, seed=70)

    def ce(model) -> torch.Tensor:
        return F.cross_entropy(model(input_ids=ids).logits.reshape(-1, VOCAB), targets.reshape(-1))

    loss_ref = ce(ref)
    loss_ref.backward()
    for p in ref.parameters():  # the objective is the mean of the ranks' losses
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    replace_moe_blocks(ours, groups)
    loss = ce(ours)
    loss.backward()
    sync_gradients(ours, groups)
    diffs, compared = {}, set()
    blocks = {n: m for n, m in ours.named_modules() if isinstance(m, HFMoEBlock)}
    for name, block in blocks.items():
        expected = _expected_block_grads(ref.get_submodule(name), block.mapping)
        layer = block.moe
        ids_local = torch.tensor(layer.experts.expert_ids)
        for key, param in layer.named_parameters():
            want = expected[key]
            if key.startswith("experts."):
                want = want[ids_local]  # this rank's shard against the same rows of HF's
            diffs[f"{name}.moe.{key}"] = rel_diff(param.grad, want)
            compared.add(id(param))
    ref_params = dict(ref.named_parameters())
    for key, param in ours.named_parameters():
        if id(param) in compared:
            continue
        diffs[key] = rel_diff(param.grad, ref_params[key].grad)
        compared.add(id(param))
    return {"loss": (float(loss), float(loss_ref)), "diffs": diffs,
            "all_compared": compared == {id(p) for p in ours.parameters()}, "num_params": len(diffs)}


def _worker(rank: int, world: int, cases: tuple, save_dir: str | None) -> dict:
    out = {}
    for ep, what in cases:
        groups = ParallelGroups.build(ep)
        for mt in MODEL_TYPES:
            if what == "logits":
                out[(ep, "logits", mt)] = logits_case(groups, mt, save_dir if ep == world else None)
            else:
                out[(ep, "grads", mt)] = grad_case(groups, mt)
    return out


SAVE_DIR = tempfile.mkdtemp(prefix="hf_interop_")


@functools.lru_cache(maxsize=None)
def spawn(world: int, cases: tuple) -> list[dict]:
    return run_ranks(_worker, world, cases, SAVE_DIR if world == 2 else None, timeout=900)


def results(world: int) -> list[dict]:
    if world == 1:
        return [{(1, "logits", mt): logits_case(None, mt) for mt in MODEL_TYPES}]
    if world == 2:
        return spawn(2, ((2, "logits"), (2, "grads")))
    return spawn(4, ((4, "logits"), (2, "logits")))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("world,ep", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_logits_equal_hf_and_round_trip_exact(world: int, ep: int, model_type: str) -> None:
    for rank, res in enumerate(results(world)):
        r = res[(ep, "logits", model_type)]
        tag = f"{model_type} world {world} EP={ep} rank {rank}"
        print(f"{tag}: relative logits difference {r['rel']:.2e}")
        assert r["names"] == MOE_LAYERS[model_type], tag
        assert set(r["families"].values()) == {MAPPING_OF[model_type]}, tag
        assert r["local_experts"] == [8 // ep] * len(r["names"]), tag
        assert r["rel"] <= TOL, f"{tag}: relative difference {r['rel']:.3e} > {TOL}"
        assert r["tokens"] == {n: 22 for n in r["names"]}, tag
        assert r["aux_finite"], tag
        assert r["sd_exact"], f"{tag}: hf_state_dict differs from the original weights"
        assert r["restored_exact"], f"{tag}: gather_to_hf did not restore the original weights"
        assert r["no_ep_blocks_left"], tag
        assert r["bitwise_after_gather"], tag


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_gradient_equals_hf_at_ep2(model_type: str) -> None:
    for rank, res in enumerate(results(2)):
        r = res[(2, "grads", model_type)]
        tag = f"{model_type} EP=2 rank {rank}"
        worst = max(r["diffs"], key=r["diffs"].get)
        print(f"{tag}: {r['num_params']} parameters, worst relative gradient difference "
              f"{r['diffs'][worst]:.2e} ({worst}); loss {r['loss'][0]:.6f} vs HF {r['loss'][1]:.6f}")
        assert r["all_compared"], tag
        assert abs(r["loss"][0] - r["loss"][1]) <= TOL * abs(r["loss"][1]), tag
        bad = {k: v for k, v in r["diffs"].items() if not v <= TOL}
        assert not bad, f"{tag}: gradients differ: {bad}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_saved_model_reloads_in_plain_transformers(model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    r = results(2)[0][(2, "logits", model_type)]
    reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(SAVE_DIR, model_type), dtype=torch.float32).eval()
    assert not any(isinstance(m, HFMoEBlock) for m in reloaded.modules())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: the GEMM blocking then matches bit for bit
    try:
        with torch.no_grad():
            logits = reloaded(input_ids=r["ids"]).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(logits, r["saved_logits"]), rel_diff(logits, r["saved_logits"])
