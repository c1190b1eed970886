"""What a family mapping is: structure checks, MoEConfig fields, and weight layouts.

Legend: E experts, D model dim, F expert ffn dim, S shared-expert ffn dim.

A :class:`Mapping` describes one layout of Hugging Face MoE block (a router child plus an
``experts`` child holding 3-D stacked expert weights, transformers 5.x) and how it becomes
an :class:`~expert_parallel.moe.layer.MoELayer`:

* :meth:`Mapping.mismatches` reads the block's *structure* (child modules, parameter
  names and shapes, router attributes, the experts' layout flags) and says what differs
  from this layout; an empty list means the mapping claims the block. No class names.
* :meth:`Mapping.config_fields` gives the :class:`MoEConfig` fields that compute the
  block's function (sizes, scoring rule, normalisation, groups, shared experts, ...).
* :meth:`Mapping.to_ours` / :meth:`Mapping.to_hf` convert between the block's state dict
  (keys relative to the block) and the layer's *global* state dict
  (:meth:`MoELayer.global_state_dict`, every expert). Both are views where the layout
  allows it (slices and transposes): loading keeps only this rank's experts, so the full
  copy is never made.

The helpers below are the pieces the families share: the concatenated ``gate_up_proj``
experts, the router checks, a plain ``gate/up/down_proj`` MLP as a shared expert.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Tensors = dict[str, torch.Tensor]


class Mapping:
    """One block layout; subclasses live in one module per family (see ``__init__``)."""

    name: str = ""
    """Short name, reported per replaced block (``moe_families(model)``)."""
    families: tuple[str, ...] = ()
    """The transformers families whose MoE block has this layout (documentation and tests)."""
    router: str = "gate"
    """Name of the router child."""
    children: frozenset[str] = frozenset()
    """Exact set of child modules the block has."""
    tuple_output: bool = False
    """The block returns ``(hidden_states, router_scores)`` instead of a tensor."""

    def mismatches(self, block: nn.Module) -> list[str]:
        """What differs between ``block`` and this layout (empty: it is this layout)."""
        raise NotImplementedError

    def config_fields(self, block: nn.Module, hf_config: Any, name: str) -> dict[str, Any]:
        """:class:`MoEConfig` fields that compute ``block``'s function; ``ValueError``
        (naming the HF config field) where a value cannot be computed."""
        raise NotImplementedError

    def to_ours(self, sd: Tensors) -> Tensors:
        """Block state dict -> the layer's global state dict (views where possible)."""
        raise NotImplementedError

    def to_hf(self, sd: Tensors) -> Tensors:
        """The layer's global state dict -> block state dict (contiguous tensors)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


# -- structure checks ---------------------------------------------------------------------
def child_mismatches(block: nn.Module, expected: frozenset[str]) -> list[str]:
    have = {n for n, _ in block.named_children()}
    out = []
    if expected - have:
        out.append(f"no child module {sorted(expected - have)}")
    if have - expected:
        out.append(f"extra child module {sorted(have - expected)}")
    return out


def own_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters(recurse=False))


def param_mismatches(module: nn.Module, where: str, expected: dict[str, int]) -> list[str]:
    """``expected``: parameter name -> number of dimensions; exactly those parameters."""
    have = {n: p.dim() for n, p in own_params(module).items()}
    out = []
    for n, dims in expected.items():
        if n not in have:
            out.append(f"{where} has no parameter {n!r}")
        elif have[n] != dims:
            out.append(f"{where}.{n} is {have[n]}-D, expected {dims}-D")
    extra = sorted(set(have) - set(expected))
    if extra:
        out.append(f"{where} has extra parameters {extra}")
    return out


def flag_mismatches(experts: nn.Module, expected: dict[str, bool]) -> list[str]:
    """The layout flags transformers' ``@use_experts_implementation`` sets on an experts
    module (``is_transposed``, ``is_concatenated``, ``has_bias``, ``has_gate``, ...)."""
    out = []
    for flag, want in expected.items():
        got = getattr(experts, flag, None)
        if got is not None and bool(got) != want:
            out.append(f"experts.{flag}={got!r}, expected {want!r}")
    if getattr(experts, "has_post_expert_norm", False):
        out.append("experts.has_post_expert_norm=True (a norm after each expert)")
    return out


def attr_mismatches(module: nn.Module, where: str, required: tuple[str, ...] = (),
                    forbidden: tuple[str, ...] = ()) -> list[str]:
    out = [f"{where} has no attribute {a!r}" for a in required if not hasattr(module, a)]
    out += [f"{where} has attribute {a!r}" for a in forbidden if hasattr(module, a)]
    return out


CONCAT_FLAGS = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}


def concat_experts_mismatches(block: nn.Module) -> list[str]:
    """``experts.gate_up_proj [E, 2F, D]`` (gate rows first, then up) and
    ``experts.down_proj [E, D, F]``, no biases; a router ``gate.weight [E, D]``."""
    experts, gate = getattr(block, "experts", None), getattr(block, "gate", None)
    if experts is None or gate is None:
        return ["no 'gate' router or no 'experts' module"]
    out = param_mismatches(experts, "experts", {"gate_up_proj": 3, "down_proj": 3})
    out += flag_mismatches(experts, CONCAT_FLAGS)
    out += attr_mismatches(gate, "gate", required=("top_k",), forbidden=("bias",))
    if out:
        return out
    E, two_f, D = experts.gate_up_proj.shape
    w = getattr(gate, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (E, D):
        out.append(f"gate.weight is {None if w is None else tuple(w.shape)}, expected [E={E}, D={D}]")
    if two_f % 2 or tuple(experts.down_proj.shape) != (E, D, two_f // 2):
        out.append(f"experts.down_proj is {tuple(experts.down_proj.shape)} with gate_up_proj "
                   f"{tuple(experts.gate_up_proj.shape)}, expected [E, D, F] with [E, 2F, D]")
    return out


def mlp_mismatches(mlp: nn.Module, where: str) -> list[str]:
    """A plain ``down_proj(act(gate_proj(x)) * up_proj(x))`` MLP of bias-free Linears."""
    out = []
    for proj in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, proj, None)
        if not isinstance(lin, nn.Linear):
            out.append(f"{where}.{proj} is not an nn.Linear")
        elif lin.bias is not None:
            out.append(f"{where}.{proj} has a bias")
    return out


# -- sizes and config values ----------------------------------------------------------------
def concat_sizes(block: nn.Module) -> tuple[int, int, int]:
    """``(E, D, F)`` of a concatenated-experts block."""
    E, two_f, D = block.experts.gate_up_proj.shape
    return E, D, two_f // 2


def silu_act(hf_config: Any) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.hidden_act must be 'silu' for the SwiGLU experts, got {act!r}")


def top_k_of(block: nn.Module, router: str, name: str, normalised: bool) -> int:
    top_k = int(getattr(getattr(block, router), "top_k", 0) or getattr(block, "top_k", 0))
    if top_k < 1:
        raise ValueError(f"{name}: num_experts_per_tok must be >= 1, got {top_k}")
    if normalised and top_k < 2:
        # HF renormalises a single weight to 1 (no router gradient); ours keeps the probability.
        raise ValueError(f"{name}: num_experts_per_tok must be >= 2 with renormalised top-k weights "
                         f"(the HF top-1 weight is renormalised to 1, ours keeps the probability), "
                         f"got {top_k}")
    return top_k


def coeff(hf_config: Any, field: str) -> float:
    return float(getattr(hf_config, field, 0.0) or 0.0)


def dropless(E: int, D: int, F: int, top_k: int) -> dict[str, Any]:
    """Fields every mapping starts from: sizes, dropless, no z-loss, no jitter."""
    return dict(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=top_k, capacity_factor=None,
                eval_capacity_factor=None, z_loss_coeff=0.0, router_jitter=0.0)


# -- weight layouts -------------------------------------------------------------------------
def concat_experts_to_ours(sd: Tensors) -> Tensors:
    """``gate_up_proj [E, 2F, D]`` -> ``w1_eDF`` (rows :F, transposed) and ``w3_eDF`` (rows
    F:), ``down_proj [E, D, F]`` -> ``w2_eFD`` (transposed). Views, no copies."""
    gate_up, down = sd["experts.gate_up_proj"], sd["experts.down_proj"]
    f = gate_up.shape[1] // 2
    return {"experts.w1_eDF": gate_up[:, :f].transpose(1, 2),
            "experts.w3_eDF": gate_up[:, f:].transpose(1, 2),
            "experts.w2_eFD": down.transpose(1, 2)}


def concat_experts_to_hf(sd: Tensors) -> Tensors:
    gate_up = torch.cat([sd["experts.w1_eDF"].transpose(1, 2), sd["experts.w3_eDF"].transpose(1, 2)], 1)
    return {"experts.gate_up_proj": gate_up.contiguous(),
            "experts.down_proj": sd["experts.w2_eFD"].transpose(1, 2).contiguous()}


def mlp_to_ours(sd: Tensors, prefix: str) -> Tensors:
    """A ``gate_proj / up_proj / down_proj`` MLP (``nn.Linear`` weights ``[out, in]``) ->
    ``shared.w1_DF`` / ``w3_DF`` / ``w2_FD`` (transposed views)."""
    return {"shared.w1_DF": sd[f"{prefix}.gate_proj.weight"].t(),
            "shared.w3_DF": sd[f"{prefix}.up_proj.weight"].t(),
            "shared.w2_FD": sd[f"{prefix}.down_proj.weight"].t()}


def mlp_to_hf(sd: Tensors, prefix: str) -> Tensors:
    return {f"{prefix}.gate_proj.weight": sd["shared.w1_DF"].t().contiguous(),
            f"{prefix}.up_proj.weight": sd["shared.w3_DF"].t().contiguous(),
            f"{prefix}.down_proj.weight": sd["shared.w2_FD"].t().contiguous()}


def zero_selection_bias(sd: Tensors, num_experts: int) -> torch.Tensor:
    """Our router's selection bias for families without one (zeros, fp32)."""
    like = sd.get("gate.weight", sd.get("router.weight"))
    return torch.zeros(num_experts, dtype=torch.float32, device=like.device)


def unused_must_be_zero(sd: Tensors, key: str, name: str) -> None:
    """A tensor of ours with no place in the HF layout must be zero, else the HF model
    would compute something else (e.g. a selection bias trained with ``bias_update_rate``
    on a family without one)."""
    value = sd.get(key)
    if value is not None and bool(value.ne(0).any()):
        raise ValueError(f"{name}: {key} is non-zero but this HF block has no place for it "
                         f"(max |value| {value.abs().max().item():.3g}); it cannot be saved in the "
                         "HF layout")


__all__ = ["Mapping", "Tensors", "concat_experts_mismatches", "concat_experts_to_ours",
           "concat_experts_to_hf", "mlp_to_ours", "mlp_to_hf", "dropless"]
