"""DeepSeek-V3: sigmoid scores, a selection-only correction bias, group-limited top-k,
renormalisation, a routed scaling factor, and ungated shared experts.

Legend: E experts (``n_routed_experts``), D model dim, F expert ffn dim
(``moe_intermediate_size``), S shared ffn dim (``moe_intermediate_size *
n_shared_experts``), G groups (``n_group``).

Layout (transformers 5.x ``DeepseekV3MoE``: ``gate`` (``DeepseekV3TopkRouter``),
``experts``, ``shared_experts`` (gate/up/down_proj MLP); output
``experts(x) + shared_experts(x)``). The router scores ``s = sigmoid(x W^T)``, selects
with ``s + e_score_correction_bias`` inside the ``topk_group`` best of G groups (a group
scores the sum of its two best biased scores), weighs with the *unbiased* ``s``,
renormalises over the k (``norm_topk_prob``) and multiplies by
``routed_scaling_factor``::

    HF (block-relative)                 shape       ours (MoELayer global state dict)
    gate.weight                         [E, D]      router.weight          [E, D]
    gate.e_score_correction_bias        [E]         router.expert_bias     [E] (fp32)
    experts.gate_up_proj[:, :F]         [E, F, D]   experts.w1_eDF^T       (gate half)
    experts.gate_up_proj[:, F:]         [E, F, D]   experts.w3_eDF^T       (up half)
    experts.down_proj                   [E, D, F]   experts.w2_eFD^T
    shared_experts.gate_proj.weight     [S, D]      shared.w1_DF^T
    shared_experts.up_proj.weight       [S, D]      shared.w3_DF^T
    shared_experts.down_proj.weight     [D, S]      shared.w2_FD^T

    MoEConfig: router='sigmoid_topk', normalize_topk=gate.norm_topk_prob,
    routed_scaling_factor=gate.routed_scaling_factor, num_groups=G,
    topk_groups=gate.topk_group (num_groups=1 when G == 1), num_shared_experts=
    config.n_shared_experts, shared_expert_ffn_hidden=S, aux_loss_coeff=0 (the HF loss
    has no balancing term; ``bias_update_rate`` turns on aux-loss-free balancing, whose
    bias is saved back as ``e_score_correction_bias``)

The first ``first_k_dense_replace`` layers hold a plain ``DeepseekV3MLP``, not an MoE
block: they are dense, replicated, and left as they are. Structure that claims a block:
children exactly ``{gate, experts, shared_experts}``, a router with an
``e_score_correction_bias`` buffer and ``num_group`` / ``topk_group`` /
``routed_scaling_factor`` / ``norm_topk_prob``. GLM-4-MoE's block has this layout too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .mapping import (Mapping, Tensors, attr_mismatches, child_mismatches, concat_experts_mismatches,
                      concat_experts_to_hf, concat_experts_to_ours, concat_sizes, dropless, mlp_mismatches,
                      mlp_to_hf, mlp_to_ours, silu_act, top_k_of)

ROUTER_ATTRS = ("e_score_correction_bias", "num_group", "topk_group", "routed_scaling_factor", "norm_topk_prob")


class DeepseekV3Mapping(Mapping):
    name = "deepseek_v3"
    families = ("DeepSeek-V3",)
    children = frozenset({"gate", "experts", "shared_experts"})

    def mismatches(self, block: nn.Module) -> list[str]:
        out = child_mismatches(block, self.children) + concat_experts_mismatches(block)
        if out:
            return out
        out += attr_mismatches(block.gate, "gate", required=ROUTER_ATTRS)
        out += mlp_mismatches(block.shared_experts, "shared_experts")
        bias = getattr(block.gate, "e_score_correction_bias", None)
        E = block.gate.weight.shape[0]
        if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (E,):
            out.append(f"gate.e_score_correction_bias is {tuple(bias.shape)}, expected [E={E}]")
        return out

    def config_fields(self, block: nn.Module, hf_config: Any, name: str) -> dict[str, Any]:
        silu_act(hf_config)
        E, D, F = concat_sizes(block)
        gate = block.gate
        norm = bool(gate.norm_topk_prob)
        fields = dropless(E, D, F, top_k_of(block, "gate", name, normalised=norm))
        groups = int(gate.num_group or 1)
        shared = int(getattr(hf_config, "n_shared_experts", 1) or 1)
        fields.update(router="sigmoid_topk", normalize_topk=norm, activation="swiglu", aux_loss_coeff=0.0,
                      routed_scaling_factor=float(gate.routed_scaling_factor), num_groups=groups,
                      topk_groups=int(gate.topk_group) if groups > 1 else None, num_shared_experts=shared,
                      shared_expert_ffn_hidden=block.shared_experts.gate_proj.out_features)
        return fields

    def to_ours(self, sd: Tensors) -> Tensors:
        out = concat_experts_to_ours(sd)
        out.update(mlp_to_ours(sd, "shared_experts"))
        out["router.weight"] = sd["gate.weight"]
        out["router.expert_bias"] = sd["gate.e_score_correction_bias"]
        return out

    def to_hf(self, sd: Tensors) -> Tensors:
        return {"gate.weight": sd["router.weight"], "gate.e_score_correction_bias": sd["router.expert_bias"],
                **concat_experts_to_hf(sd), **mlp_to_hf(sd, "shared_experts")}


MAPPING = DeepseekV3Mapping()
