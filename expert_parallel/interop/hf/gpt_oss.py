"""GPT-OSS: a biased router, softmax over the top-k logits, and clamped-SwiGLU experts
with biases on both projections stored transposed and interleaved.

Legend: E experts, D model dim, F expert ffn dim (``intermediate_size``).

Layout (transformers 5.x ``GptOssMLP``: ``router`` + ``experts``; it returns
``(hidden_states, router_scores)``). The router computes ``l = x W^T + b``, keeps the k
largest logits and softmaxes over them. Each expert computes ``gu = x gate_up_proj[e] +
gate_up_proj_bias[e]`` with gate ``gu[..., ::2]`` and up ``gu[..., 1::2]`` (interleaved),
``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``,
``((u + 1) * g * sigmoid(alpha * g)) down_proj[e] + down_proj_bias[e]``::

    HF (block-relative)                   shape        ours (MoELayer global state dict)
    router.weight                         [E, D]       router.weight          [E, D]
    router.bias                           [E]          router.bias            [E]
    experts.gate_up_proj[..., ::2]        [E, D, F]    experts.w1_eDF         (gate, no transpose)
    experts.gate_up_proj[..., 1::2]       [E, D, F]    experts.w3_eDF         (up)
    experts.gate_up_proj_bias[:, ::2]     [E, F]       experts.b1_eF
    experts.gate_up_proj_bias[:, 1::2]    [E, F]       experts.b3_eF
    experts.down_proj                     [E, F, D]    experts.w2_eFD
    experts.down_proj_bias                [E, D]       experts.b2_eD
    (none)                                             router.expert_bias     zeros

    MoEConfig: router='topk_softmax', router_bias=True, expert_proj_bias=True,
    activation='swiglu_clamped', swiglu_alpha=experts.alpha, swiglu_limit=experts.limit,
    aux_loss_coeff=config.router_aux_loss_coef

Structure that claims a block: children exactly ``{router, experts}``, a router with a
weight and a bias, experts with exactly those four parameters and transformers' layout
flags ``is_transposed=True, is_concatenated=False, has_bias=True``. The replacement returns
``(hidden_states, None)`` like the HF block's pair (the decoder layer drops the second).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .mapping import (Mapping, Tensors, attr_mismatches, child_mismatches, coeff, dropless, flag_mismatches,
                      param_mismatches, top_k_of, unused_must_be_zero, zero_selection_bias)

FLAGS = {"is_transposed": True, "is_concatenated": False, "has_bias": True, "has_gate": True}


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[..., F]`` and ``[..., F]`` -> ``[..., 2F]`` with ``a`` at even, ``b`` at odd positions."""
    return torch.stack([a, b], dim=-1).flatten(-2)


class GptOssMapping(Mapping):
    name = "gpt_oss"
    families = ("GPT-OSS",)
    router = "router"
    children = frozenset({"router", "experts"})
    tuple_output = True

    def mismatches(self, block: nn.Module) -> list[str]:
        out = child_mismatches(block, self.children)
        if out:
            return out
        experts, router = block.experts, block.router
        out += param_mismatches(experts, "experts", {"gate_up_proj": 3, "gate_up_proj_bias": 2,
                                                     "down_proj": 3, "down_proj_bias": 2})
        out += param_mismatches(router, "router", {"weight": 2, "bias": 1})
        out += flag_mismatches(experts, FLAGS)
        out += attr_mismatches(experts, "experts", required=("alpha", "limit"))
        out += attr_mismatches(router, "router", required=("top_k",))
        if out:
            return out
        E, D, two_f = experts.gate_up_proj.shape
        if tuple(router.weight.shape) != (E, D):
            out.append(f"router.weight is {tuple(router.weight.shape)}, expected [E={E}, D={D}]")
        if two_f % 2 or tuple(experts.down_proj.shape) != (E, two_f // 2, D):
            out.append(f"experts.down_proj is {tuple(experts.down_proj.shape)} with gate_up_proj "
                       f"{tuple(experts.gate_up_proj.shape)}, expected [E, F, D] with [E, D, 2F]")
        return out

    def config_fields(self, block: nn.Module, hf_config: Any, name: str) -> dict[str, Any]:
        E, D, two_f = block.experts.gate_up_proj.shape
        fields = dropless(E, D, two_f // 2, top_k_of(block, "router", name, normalised=False))
        fields.update(router="topk_softmax", router_bias=True, expert_proj_bias=True,
                      activation="swiglu_clamped", swiglu_alpha=float(block.experts.alpha),
                      swiglu_limit=float(block.experts.limit),
                      aux_loss_coeff=coeff(hf_config, "router_aux_loss_coef"))
        return fields

    def to_ours(self, sd: Tensors) -> Tensors:
        gate_up, bias = sd["experts.gate_up_proj"], sd["experts.gate_up_proj_bias"]
        return {"router.weight": sd["router.weight"], "router.bias": sd["router.bias"],
                "router.expert_bias": zero_selection_bias(sd, sd["router.weight"].shape[0]),
                "experts.w1_eDF": gate_up[..., ::2], "experts.w3_eDF": gate_up[..., 1::2],
                "experts.b1_eF": bias[:, ::2], "experts.b3_eF": bias[:, 1::2],
                "experts.w2_eFD": sd["experts.down_proj"], "experts.b2_eD": sd["experts.down_proj_bias"]}

    def to_hf(self, sd: Tensors) -> Tensors:
        unused_must_be_zero(sd, "router.expert_bias", self.name)
        return {"router.weight": sd["router.weight"], "router.bias": sd["router.bias"],
                "experts.gate_up_proj": interleave(sd["experts.w1_eDF"], sd["experts.w3_eDF"]),
                "experts.gate_up_proj_bias": interleave(sd["experts.b1_eF"], sd["experts.b3_eF"]),
                "experts.down_proj": sd["experts.w2_eFD"].contiguous(),
                "experts.down_proj_bias": sd["experts.b2_eD"].contiguous()}


MAPPING = GptOssMapping()
