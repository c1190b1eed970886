"""Family edges of the Hugging Face interop, one process, against transformers' blocks.

* GPT-OSS: with expert weights large enough that the SwiGLU clamp (limit 7) bites and
  random biases on router and both projections, the block and the model equal HF's;
  the same weights through an unclamped SwiGLU or without the biases do not.
* DeepSeek-V3: the first ``first_k_dense_replace`` layers stay the same dense module;
  a large ``e_score_correction_bias`` on two experts sends every token to exactly them
  (selection), while the combine weights stay the *unbiased* normalised sigmoid scores
  times ``routed_scaling_factor`` (computed by hand here) and equal HF's router's.
* Structure: other families on a supported layout work (GLM-4-MoE, Qwen3-Next, each
  claimed by the mapping with its layout); unsupported ones (Llama-4, ERNIE-4.5-MoE) and
  a block with a changed structure are refused with a ``TypeError`` naming the class and
  what differs; a block with a supported structure but another function (GELU experts)
  is refused by the probe check against the installed transformers.
* Overrides change the layer, not the mapping: a capacity factor drops tokens (counted);
  ``router='noisy_topk'`` loads; the old ``hf_mixtral`` import path is the same API.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from expert_parallel.config import MoEConfig
from expert_parallel.interop import hf_mixtral
from expert_parallel.interop.hf import (HFMoEBlock, gather_to_hf, mapped_config, moe_families, moe_stats,
                                        replace_moe_blocks)
from expert_parallel.interop.hf.blocks import find_moe_blocks, load_layer
from expert_parallel.interop.hf.small import randomise, small_config, small_model
from expert_parallel.moe.layer import MoELayer

VOCAB = 96


def ids(seed: int = 0, length: int = 13) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max()).detach())


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


# -- GPT-OSS -------------------------------------------------------------------------------
def gpt_oss_clamped():
    model = small_model(small_config("gpt_oss"), seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            experts.gate_up_proj.mul_(60.0)  # pre-activations far beyond the limit of 7
            for b in (experts.gate_up_proj_bias, experts.down_proj_bias, layer.mlp.router.bias):
                b.copy_(torch.randn(b.shape, generator=gen))
    return model


def test_gpt_oss_clamp_and_biases_equal_hf() -> None:
    model = gpt_oss_clamped()
    x = ids(1)
    ref = logits(model, x)
    # The clamp is active: HF's gate/up pre-activations of layer 0 exceed the limit.
    block = model.model.layers[0].mlp
    h = model.model.layers[0].post_attention_layernorm(model.model.embed_tokens(x)).reshape(-1, 32)
    gate_up = h @ block.experts.gate_up_proj[0] + block.experts.gate_up_proj_bias[0]
    assert gate_up[..., ::2].max() > 7 and gate_up[..., 1::2].abs().max() > 7
    hf_out = block(h.unsqueeze(0))[0]
    replace_moe_blocks(model)
    assert moe_families(model) == {"model.layers.0.mlp": "gpt_oss", "model.layers.1.mlp": "gpt_oss"}
    ours = model.model.layers[0].mlp
    out, scores = ours(h.unsqueeze(0))
    assert scores is None  # the decoder layer unpacks (hidden_states, router_scores)
    assert rel(out, hf_out) <= 1e-5
    assert rel(logits(model, x), ref) <= 1e-5
    layer = ours.moe
    assert layer.config.activation == "swiglu_clamped" and layer.config.swiglu_limit == 7.0
    assert layer.config.swiglu_alpha == 1.702 and layer.router.bias.abs().min() > 0
    assert layer.experts.b1_eF.abs().max() > 0 and layer.experts.b2_eD.abs().max() > 0

    def rerun(**changes) -> torch.Tensor:  # the same weights through a changed layer
        other = MoELayer(layer.config.replace(**changes), None)
        takes = set(other.global_state_dict())
        other.load_global_state_dict({k: v for k, v in layer.global_state_dict().items() if k in takes})
        return other(h.unsqueeze(0)).output

    # The check is sensitive to both: without the clamp or without the biases it differs.
    assert rel(rerun(activation="swiglu"), hf_out) > 1e-2
    assert rel(rerun(expert_proj_bias=False), hf_out) > 1e-2
    assert rel(rerun(), hf_out) <= 1e-5
    gather_to_hf(model)
    assert rel(logits(model, x), ref) <= 1e-5 and type(model.model.layers[0].mlp).__name__ == "GptOssMLP"


# -- DeepSeek-V3 ---------------------------------------------------------------------------
def test_deepseek_dense_first_layers_stay_and_correction_bias_selects_only() -> None:
    model = small_model(small_config("deepseek_v3"), seed=5)
    reference = small_model(small_config("deepseek_v3"), seed=5)
    dense = model.model.layers[0].mlp
    dense_before = {k: v.clone() for k, v in dense.state_dict().items()}
    bias = torch.zeros(8)
    bias[[2, 5]] = 2.0  # > any two-score group sum: groups 1 and 2, then experts 2 and 5 win
    for m in (model, reference):
        m.model.layers[1].mlp.gate.e_score_correction_bias.copy_(bias)
    x = ids(2)
    ref = logits(reference, x)
    names = replace_moe_blocks(model)
    assert names == ["model.layers.1.mlp"]
    assert model.model.layers[0].mlp is dense and type(dense).__name__ == "DeepseekV3MLP"
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in dense_before.items())
    assert rel(logits(model, x), ref) <= 1e-5
    stats = moe_stats(model)["model.layers.1.mlp"]
    assert stats.routed_E.tolist() == [0, 0, 26, 0, 0, 26, 0, 0]  # 2 x 13 tokens, both to 2 and 5
    # Weights: the unbiased scores, renormalised over the two, times 2.5; as HF's router.
    layer = model.model.layers[1].mlp.moe
    assert torch.equal(layer.router.expert_bias, bias)
    h = torch.randn(9, 32, generator=torch.Generator().manual_seed(6))
    routing = layer.router(h)
    s = torch.sigmoid(h @ layer.router.weight.t())
    by_hand = 2.5 * s[:, [2, 5]] / s[:, [2, 5]].sum(-1, keepdim=True)
    order = routing.topk_idx_TK.argsort(-1)
    assert torch.equal(routing.topk_idx_TK.gather(-1, order), torch.tensor([[2, 5]] * 9))
    assert torch.allclose(routing.topk_weight_TK.gather(-1, order), by_hand, rtol=1e-6, atol=0)
    _, hf_w, hf_idx = reference.model.layers[1].mlp.gate(h)
    hf_order = hf_idx.argsort(-1)
    assert torch.equal(hf_idx.gather(-1, hf_order), torch.tensor([[2, 5]] * 9))
    assert torch.allclose(hf_w.gather(-1, hf_order), by_hand, rtol=1e-6, atol=0)
    gather_to_hf(model)
    assert torch.equal(model.model.layers[1].mlp.gate.e_score_correction_bias, bias)


# -- structure -----------------------------------------------------------------------------
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
            pad_token_id=None)
OTHER_FAMILIES = {
    "glm4_moe": (dict(moe_intermediate_size=24, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1), "deepseek_v3"),
    "qwen3_next": (dict(moe_intermediate_size=24, intermediate_size=48, shared_expert_intermediate_size=48,
                        num_experts=8, num_experts_per_tok=2, layer_types=["full_attention"] * 2), "qwen2_moe"),
}
REFUSED = {
    "llama4_text": (dict(intermediate_size=24, intermediate_size_mlp=48, num_local_experts=8, num_experts_per_tok=1),
                    "Llama4TextMoe", "extra child module ['shared_expert']"),
    "ernie4_5_moe": (dict(moe_intermediate_size=24, intermediate_size=48, moe_num_experts=8, moe_k=2,
                          moe_layer_start_index=0),
                     "Ernie4_5_MoeSparseMoeBlock", "extra child module ['shared_experts']"),
}


def other_model(model_type: str, fields: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**BASE, **fields})).eval()
    randomise(model, 7)
    return model


@pytest.mark.parametrize("model_type", sorted(OTHER_FAMILIES))
def test_other_families_on_a_supported_layout_work(model_type: str) -> None:
    fields, mapping = OTHER_FAMILIES[model_type]
    model = other_model(model_type, fields)
    x = ids(3)
    ref = logits(model, x)
    names = replace_moe_blocks(model)
    assert names and set(moe_families(model).values()) == {mapping}
    assert rel(logits(model, x), ref) <= 1e-5


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_unsupported_blocks_are_refused_naming_class_and_difference(model_type: str) -> None:
    fields, cls, difference = REFUSED[model_type]
    model = other_model(model_type, fields)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=rf"{re.escape(cls)} .*no mapping supports .*{re.escape(difference)}"):
        replace_moe_blocks(model)
    after = model.state_dict()  # refused before anything changed
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_changed_structure_is_refused() -> None:
    model = small_model(small_config("qwen3_moe"), seed=1)
    model.model.layers[1].mlp.post_norm = nn.LayerNorm(32)
    with pytest.raises(TypeError,
                       match=r"model.layers.1.mlp: Qwen3MoeSparseMoeBlock .*extra child module \['post_norm'\]"):
        replace_moe_blocks(model)


def test_same_structure_other_function_is_refused_by_the_probe() -> None:
    model = small_model(small_config("qwen3_moe"), seed=1)
    for layer in model.model.layers:
        layer.mlp.experts.act_fn = nn.GELU()  # what the structure cannot show
    with pytest.raises(TypeError, match=r"Qwen3MoeSparseMoeBlock has the structure of the 'qwen3_moe' mapping but "
                                        r"the installed transformers .* computes another function"):
        replace_moe_blocks(model)
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())


# -- overrides and the old import path -------------------------------------------------------
def test_capacity_override_drops_and_router_override_loads() -> None:
    model = small_model(small_config("qwen3_moe"), seed=1)
    x = ids(4)
    ref = logits(model, x)
    replace_moe_blocks(model, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1)
    out = logits(model, x)
    stats = moe_stats(model)
    assert all(int(s.dropped_E.sum()) > 0 for s in stats.values())
    assert rel(out, ref) > 1e-3  # dropped tokens change the function, as asked
    noisy = small_model(small_config("qwen3_moe"), seed=1)
    replace_moe_blocks(noisy, router="noisy_topk")
    layer = noisy.model.layers[0].mlp.moe
    assert layer.config.router == "noisy_topk" and layer.router.noise_weight.abs().max() == 0
    # The routed weights are HF's; only the router rule changed.
    assert torch.equal(layer.router.weight, model.model.layers[0].mlp.moe.router.weight)
    gather_to_hf(noisy)  # noise weights untrained (zero): the HF layout still holds everything


def test_mapped_config_is_the_hf_function() -> None:
    model = small_model(small_config("deepseek_v3"), seed=1)
    (found,) = find_moe_blocks(model)
    cfg = mapped_config(found, model.config)
    assert isinstance(cfg, MoEConfig)
    assert (cfg.router, cfg.num_groups, cfg.topk_groups, cfg.routed_scaling_factor, cfg.normalize_topk,
            cfg.num_shared_experts, cfg.shared_ffn_hidden, cfg.capacity_factor) == (
        "sigmoid_topk", 4, 2, 2.5, True, 1, 24, None)
    layer = MoELayer(cfg, None)
    load_layer(layer, found.mapping.to_ours(dict(found.block.state_dict())))
    assert torch.equal(layer.router.expert_bias, found.block.gate.e_score_correction_bias)


def test_old_import_path_is_the_same_api() -> None:
    from expert_parallel.interop import hf

    for name in ("replace_moe_blocks", "gather_to_hf", "hf_state_dict", "moe_aux_loss", "moe_stats", "HFMoEBlock"):
        assert getattr(hf_mixtral, name) is getattr(hf, name), name
    # block_types still restricts the search (here: to a class the model does not have)
    model = small_model(small_config("mixtral"), seed=1)
    with pytest.raises(ValueError, match=r"model has no MoE block of type \['Linear'\]"):
        hf_mixtral.replace_moe_blocks(model, block_types=[nn.Linear])
