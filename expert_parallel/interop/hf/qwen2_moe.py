"""Qwen2-MoE: softmax top-k (``norm_topk_prob``, default False) plus one shared expert
scaled per token by a sigmoid gate.

Legend: E experts, D model dim, F expert ffn dim (``moe_intermediate_size``), S shared
ffn dim (``shared_expert_intermediate_size``).

Layout (transformers 5.x ``Qwen2MoeSparseMoeBlock``: ``gate``, ``experts``,
``shared_expert`` (gate/up/down_proj MLP), ``shared_expert_gate`` (``Linear(D, 1)``);
output ``experts(x) + sigmoid(shared_expert_gate(x)) * shared_expert(x)``)::

    HF (block-relative)                 shape       ours (MoELayer global state dict)
    gate.weight                         [E, D]      router.weight          [E, D]
    experts.gate_up_proj[:, :F]         [E, F, D]   experts.w1_eDF^T       (gate half)
    experts.gate_up_proj[:, F:]         [E, F, D]   experts.w3_eDF^T       (up half)
    experts.down_proj                   [E, D, F]   experts.w2_eFD^T
    shared_expert.gate_proj.weight      [S, D]      shared.w1_DF^T
    shared_expert.up_proj.weight        [S, D]      shared.w3_DF^T
    shared_expert.down_proj.weight      [D, S]      shared.w2_FD^T
    shared_expert_gate.weight           [1, D]      shared.gate_D          [D]
    (none)                                          router.expert_bias     zeros

    MoEConfig: router='softmax_topk', normalize_topk=gate.norm_topk_prob,
    num_shared_experts=1, shared_expert_ffn_hidden=S, shared_expert_gate=True,
    aux_loss_coeff=config.router_aux_loss_coef

The shared expert is replicated (data-parallel) and computed while the dispatch
all-to-all is in flight (``shared_expert_overlap``). Structure that claims a block:
children exactly ``{gate, experts, shared_expert, shared_expert_gate}``, a bias-free
``Linear(D, 1)`` gate and a bias-free gate/up/down MLP. Qwen3-Next-style blocks with the
same children are claimed too and checked against their own forward (``blocks.py``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .mapping import (Mapping, Tensors, attr_mismatches, child_mismatches, coeff, concat_experts_mismatches,
                      concat_experts_to_hf, concat_experts_to_ours, concat_sizes, dropless, mlp_mismatches,
                      mlp_to_hf, mlp_to_ours, silu_act, top_k_of, unused_must_be_zero, zero_selection_bias)


class Qwen2MoeMapping(Mapping):
    name = "qwen2_moe"
    families = ("Qwen2-MoE",)
    children = frozenset({"gate", "experts", "shared_expert", "shared_expert_gate"})

    def mismatches(self, block: nn.Module) -> list[str]:
        out = child_mismatches(block, self.children) + concat_experts_mismatches(block)
        if out:
            return out
        out += attr_mismatches(block.gate, "gate", required=("norm_topk_prob",),
                               forbidden=("e_score_correction_bias",))
        out += mlp_mismatches(block.shared_expert, "shared_expert")
        lin = block.shared_expert_gate
        D = block.gate.weight.shape[1]
        if not isinstance(lin, nn.Linear) or lin.bias is not None or tuple(lin.weight.shape) != (1, D):
            out.append(f"shared_expert_gate is not a bias-free Linear({D}, 1)")
        return out

    def config_fields(self, block: nn.Module, hf_config: Any, name: str) -> dict[str, Any]:
        silu_act(hf_config)
        E, D, F = concat_sizes(block)
        norm = bool(block.gate.norm_topk_prob)
        fields = dropless(E, D, F, top_k_of(block, "gate", name, normalised=norm))
        fields.update(router="softmax_topk", normalize_topk=norm, activation="swiglu",
                      aux_loss_coeff=coeff(hf_config, "router_aux_loss_coef"), num_shared_experts=1,
                      shared_expert_ffn_hidden=block.shared_expert.gate_proj.out_features,
                      shared_expert_gate=True)
        return fields

    def to_ours(self, sd: Tensors) -> Tensors:
        out = concat_experts_to_ours(sd)
        out.update(mlp_to_ours(sd, "shared_expert"))
        out["shared.gate_D"] = sd["shared_expert_gate.weight"][0]
        out["router.weight"] = sd["gate.weight"]
        out["router.expert_bias"] = zero_selection_bias(sd, sd["gate.weight"].shape[0])
        return out

    def to_hf(self, sd: Tensors) -> Tensors:
        unused_must_be_zero(sd, "router.expert_bias", self.name)
        return {"gate.weight": sd["router.weight"], **concat_experts_to_hf(sd),
                **mlp_to_hf(sd, "shared_expert"),
                "shared_expert_gate.weight": sd["shared.gate_D"].unsqueeze(0).contiguous()}


MAPPING = Qwen2MoeMapping()
