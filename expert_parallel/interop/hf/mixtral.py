"""Mixtral: softmax over E, top-k, always renormalised over the k; no shared expert.

Legend: E experts, D model dim, F expert ffn dim.

Layout (transformers 5.x ``MixtralSparseMoeBlock``: ``gate`` + ``experts``; the experts
compute ``gate, up = linear(x, gate_up_proj[e]).chunk(2)``, ``linear(act(gate) * up,
down_proj[e])``)::

    HF (block-relative)           shape         ours (MoELayer global state dict)
    gate.weight                   [E, D]        router.weight          [E, D]
    experts.gate_up_proj[:, :F]   [E, F, D]     experts.w1_eDF^T       (gate half, under silu)
    experts.gate_up_proj[:, F:]   [E, F, D]     experts.w3_eDF^T       (up half)
    experts.down_proj             [E, D, F]     experts.w2_eFD^T
    (none)                                      router.expert_bias     zeros

    MoEConfig: router='softmax_topk', normalize_topk=True, top_k=gate.top_k,
    aux_loss_coeff=config.router_aux_loss_coef, router_jitter=block.jitter_noise

Structure that claims a block for this mapping: children exactly ``{gate, experts}``, the
router has ``top_k`` but no ``norm_topk_prob`` (it always renormalises) and no bias.

Differences: the HF block multiplies the *whole* hidden state by its jitter noise in
training, ours jitters only the router input; HF's top-1 case renormalises a single
weight to 1, ours keeps the probability, so ``num_experts_per_tok = 1`` is refused.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .mapping import (Mapping, Tensors, attr_mismatches, child_mismatches, coeff, concat_experts_mismatches,
                      concat_experts_to_hf, concat_experts_to_ours, concat_sizes, dropless, silu_act, top_k_of,
                      unused_must_be_zero, zero_selection_bias)


class MixtralMapping(Mapping):
    name = "mixtral"
    families = ("Mixtral",)
    children = frozenset({"gate", "experts"})

    def mismatches(self, block: nn.Module) -> list[str]:
        out = child_mismatches(block, self.children) + concat_experts_mismatches(block)
        if hasattr(block, "gate"):
            out += attr_mismatches(block.gate, "gate", forbidden=("norm_topk_prob", "e_score_correction_bias"))
        return out

    def config_fields(self, block: nn.Module, hf_config: Any, name: str) -> dict[str, Any]:
        silu_act(hf_config)
        E, D, F = concat_sizes(block)
        fields = dropless(E, D, F, top_k_of(block, "gate", name, normalised=True))
        fields.update(router="softmax_topk", normalize_topk=True, activation="swiglu",
                      aux_loss_coeff=coeff(hf_config, "router_aux_loss_coef"),
                      router_jitter=float(getattr(block, "jitter_noise", 0.0) or 0.0))
        return fields

    def to_ours(self, sd: Tensors) -> Tensors:
        out = concat_experts_to_ours(sd)
        out["router.weight"] = sd["gate.weight"]
        out["router.expert_bias"] = zero_selection_bias(sd, sd["gate.weight"].shape[0])
        return out

    def to_hf(self, sd: Tensors) -> Tensors:
        unused_must_be_zero(sd, "router.expert_bias", self.name)
        return {"gate.weight": sd["router.weight"], **concat_experts_to_hf(sd)}


MAPPING = MixtralMapping()
