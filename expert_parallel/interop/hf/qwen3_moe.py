"""Qwen3-MoE and OLMoE: softmax over E, top-k, renormalised only if ``norm_topk_prob``.

Legend: E experts, D model dim, F expert ffn dim (``moe_intermediate_size`` for Qwen3-MoE,
``intermediate_size`` for OLMoE).

The two families have the same block in transformers 5.x (``Qwen3MoeSparseMoeBlock`` and
``OlmoeSparseMoeBlock``: a ``gate`` router with a ``norm_topk_prob`` switch and the
concatenated ``experts``), so they share this mapping::

    HF (block-relative)           shape         ours (MoELayer global state dict)
    gate.weight                   [E, D]        router.weight          [E, D]
    experts.gate_up_proj[:, :F]   [E, F, D]     experts.w1_eDF^T       (gate half, under silu)
    experts.gate_up_proj[:, F:]   [E, F, D]     experts.w3_eDF^T       (up half)
    experts.down_proj             [E, D, F]     experts.w2_eFD^T
    (none)                                      router.expert_bias     zeros

    MoEConfig: router='softmax_topk', normalize_topk=gate.norm_topk_prob,
    top_k=gate.top_k, aux_loss_coeff=config.router_aux_loss_coef

Structure that claims a block: children exactly ``{gate, experts}``, the router has
``top_k`` and ``norm_topk_prob``, no bias and no correction bias. Dense layers
(``mlp_only_layers``, ``decoder_sparse_step``) are plain MLPs and stay as they are.

Differences: with ``norm_topk_prob=True`` and top-1, HF renormalises the single weight to
1 (refused, as for Mixtral); with ``norm_topk_prob=False`` top-1 is the raw probability
in both.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .mapping import (Mapping, Tensors, attr_mismatches, child_mismatches, coeff, concat_experts_mismatches,
                      concat_experts_to_hf, concat_experts_to_ours, concat_sizes, dropless, silu_act, top_k_of,
                      unused_must_be_zero, zero_selection_bias)


class SoftmaxTopkMapping(Mapping):
    name = "qwen3_moe"
    families = ("Qwen3-MoE", "OLMoE")
    children = frozenset({"gate", "experts"})

    def mismatches(self, block: nn.Module) -> list[str]:
        out = child_mismatches(block, self.children) + concat_experts_mismatches(block)
        if hasattr(block, "gate"):
            out += attr_mismatches(block.gate, "gate", required=("norm_topk_prob",),
                                   forbidden=("e_score_correction_bias",))
        return out

    def config_fields(self, block: nn.Module, hf_config: Any, name: str) -> dict[str, Any]:
        silu_act(hf_config)
        E, D, F = concat_sizes(block)
        norm = bool(block.gate.norm_topk_prob)
        fields = dropless(E, D, F, top_k_of(block, "gate", name, normalised=norm))
        fields.update(router="softmax_topk", normalize_topk=norm, activation="swiglu",
                      aux_loss_coeff=coeff(hf_config, "router_aux_loss_coef"))
        return fields

    def to_ours(self, sd: Tensors) -> Tensors:
        out = concat_experts_to_ours(sd)
        out["router.weight"] = sd["gate.weight"]
        out["router.expert_bias"] = zero_selection_bias(sd, sd["gate.weight"].shape[0])
        return out

    def to_hf(self, sd: Tensors) -> Tensors:
        unused_must_be_zero(sd, "router.expert_bias", self.name)
        return {"gate.weight": sd["router.weight"], **concat_experts_to_hf(sd)}


MAPPING = SoftmaxTopkMapping()
