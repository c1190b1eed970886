"""Scoring rules: from router logits to (experts, combine weights), one function each.

Legend: T tokens, E experts, K choice slots, G groups.

Each rule takes the router's :class:`Logits` and returns a :class:`Scored`; the router
applies renormalisation, ``routed_scaling_factor`` and the losses after it. Rules
(``MoEConfig.router``):

* ``softmax_topk`` -- softmax over experts, keep the K largest (GShard, Mixtral, Qwen).
* ``switch`` -- top-1 of a softmax, weighted by the raw probability (Switch Transformer).
* ``sigmoid_topk`` -- independent sigmoid scores; a selection-only per-expert bias moved
  by the observed load picks the experts, the unbiased scores weigh them (DeepSeek-V3;
  with ``normalize_topk`` and ``routed_scaling_factor`` exactly its gate).
* ``topk_softmax`` -- top-k of the logits, then a softmax over the k (GPT-OSS; equal
  to Mixtral's softmax -> top-k -> renormalise).
* ``noisy_topk`` -- Shazeer et al. 2017: ``h = x W^T + N(0,1) * (softplus(x W_noise^T)
  + 0.01)`` in training, then as ``softmax_topk``; its loss is
  ``cv^2(importance) + cv^2(load)`` (``balance.noisy_load``).
* ``top_p`` -- a variable number of experts per token (Huang et al. 2024): slot j is
  valid while slots 0..j-1 hold less than ``top_p`` of the probability.
* ``expert_choice`` -- each expert takes its ``C`` best tokens of this rank (Zhou et al.
  2022), as K = E slots, slot e valid where expert e chose the token.

Group-limited selection (``num_groups > 1``, DeepSeek-V2/V3): a token keeps its
``topk_groups`` best groups of ``E / num_groups`` contiguous experts, a group scoring
the sum of its two best selection scores, and selects its top k inside them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..config import MoEConfig
from .balance import cv_squared, noisy_load

NOISE_EPS = 1e-2
"""Floor of the noisy-top-k noise scale (the paper's ``noise_epsilon``)."""


@dataclass(frozen=True)
class Logits:
    """What a scoring rule sees."""

    logits_TE: torch.Tensor
    """Logits the selection uses (noisy in training for ``noisy_topk``)."""
    clean_TE: torch.Tensor
    """Logits before noise."""
    noise_std_TE: Optional[torch.Tensor]
    expert_bias_E: torch.Tensor
    """Selection-only bias (``sigmoid_topk``)."""
    capacity: Optional[int]
    """Per-expert capacity of this forward (``expert_choice``)."""


@dataclass(frozen=True)
class Scored:
    topk_idx_TK: torch.Tensor
    weight_TK: torch.Tensor
    """Before renormalisation and scaling."""
    probs_TE: torch.Tensor
    """Probabilities over all experts (losses, metrics)."""
    valid_TK: Optional[torch.Tensor] = None
    lb_loss: Optional[torch.Tensor] = None
    """A rule's own balancing loss (noisy top-k); None = the standard one."""
    renormalise: bool = True
    """Whether ``normalize_topk`` may renormalise these weights."""


def select_topk(select_TE: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Top-k expert ids by ``select_TE``, inside each token's best groups if limited."""
    k = cfg.top_k
    if cfg.num_groups == 1:
        return torch.topk(select_TE, k, dim=-1).indices
    T, E = select_TE.shape
    G, per_group = cfg.num_groups, E // cfg.num_groups
    group_score_TG = select_TE.view(T, G, per_group).topk(min(2, per_group), dim=-1).values.sum(-1)
    groups_Tg = torch.topk(group_score_TG, cfg.topk_groups, dim=-1).indices
    keep_TG = torch.zeros(T, G, dtype=torch.bool, device=select_TE.device).scatter_(1, groups_Tg, True)
    masked_TE = select_TE.masked_fill(~keep_TG.repeat_interleave(per_group, dim=1), float("-inf"))
    return torch.topk(masked_TE, k, dim=-1).indices


def _softmax_topk(cfg: MoEConfig, lg: Logits) -> Scored:
    probs_TE = torch.softmax(lg.logits_TE, dim=-1)
    idx_TK = select_topk(probs_TE.detach(), cfg)
    return Scored(idx_TK, probs_TE.gather(-1, idx_TK), probs_TE)


def _switch(cfg: MoEConfig, lg: Logits) -> Scored:
    return dataclasses.replace(_softmax_topk(cfg, lg), renormalise=False)


def _sigmoid_topk(cfg: MoEConfig, lg: Logits) -> Scored:
    scores_TE = torch.sigmoid(lg.logits_TE)
    # The bias shifts which experts are chosen, not how much they weigh.
    idx_TK = select_topk(scores_TE.detach() + lg.expert_bias_E.to(scores_TE.dtype), cfg)
    probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    return Scored(idx_TK, scores_TE.gather(-1, idx_TK), probs_TE)


def _topk_softmax(cfg: MoEConfig, lg: Logits) -> Scored:
    idx_TK = select_topk(lg.logits_TE.detach(), cfg)
    weight_TK = torch.softmax(lg.logits_TE.gather(-1, idx_TK), dim=-1)
    return Scored(idx_TK, weight_TK, torch.softmax(lg.logits_TE, dim=-1), renormalise=False)


def _noisy_topk(cfg: MoEConfig, lg: Logits) -> Scored:
    probs_TE = torch.softmax(lg.logits_TE, dim=-1)
    weight_TK, idx_TK = torch.topk(probs_TE, cfg.top_k, dim=-1)
    if cfg.normalize_topk and cfg.top_k > 1:
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    gates_TE = torch.zeros_like(probs_TE).scatter(-1, idx_TK, weight_TK)
    load_E = noisy_load(lg.clean_TE, lg.logits_TE, lg.noise_std_TE, cfg.top_k)
    lb = cv_squared(gates_TE.sum(0)) + cv_squared(load_E)
    return Scored(idx_TK, weight_TK, probs_TE, lb_loss=lb, renormalise=False)


def top_p_mask(sorted_probs_TK: torch.Tensor, top_p: float) -> torch.Tensor:
    """Valid slots for top-p routing, given each token's probabilities sorted in
    descending order: slot j is valid when slots 0..j-1 hold less than ``top_p``."""
    if top_p >= 1.0:
        # Exactly top-K; the fp32 cumulative sum of a peaked softmax can reach 1.0 early.
        return torch.ones_like(sorted_probs_TK, dtype=torch.bool)
    mass_before_TK = torch.cumsum(sorted_probs_TK, dim=-1) - sorted_probs_TK
    valid_TK = mass_before_TK < top_p
    valid_TK[:, :1] = True  # at least one expert per token
    return valid_TK


def _top_p(cfg: MoEConfig, lg: Logits) -> Scored:
    probs_TE = torch.softmax(lg.logits_TE, dim=-1)
    weight_TK, idx_TK = torch.topk(probs_TE, cfg.top_k, dim=-1)
    valid_TK = top_p_mask(weight_TK.detach(), cfg.top_p)
    return Scored(idx_TK, torch.where(valid_TK, weight_TK, torch.zeros_like(weight_TK)), probs_TE, valid_TK)


def expert_choice_mask(probs_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """``valid_TE[t, e]``: expert e chose token t among its ``capacity`` best tokens."""
    num_tokens, num_experts = probs_TE.shape
    chosen_EC = torch.topk(probs_TE.detach().t(), min(capacity, num_tokens), dim=-1).indices
    valid_ET = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=probs_TE.device)
    valid_ET.scatter_(1, chosen_EC, True)
    return valid_ET.t()


def _expert_choice(cfg: MoEConfig, lg: Logits) -> Scored:
    probs_TE = torch.softmax(lg.logits_TE, dim=-1)
    valid_TK = expert_choice_mask(probs_TE, lg.capacity)
    idx_TK = torch.arange(cfg.num_experts, device=probs_TE.device).expand_as(probs_TE).contiguous()
    weight_TK = torch.where(valid_TK, probs_TE, torch.zeros_like(probs_TE))
    return Scored(idx_TK, weight_TK, probs_TE, valid_TK, renormalise=False)


RULES: dict[str, Callable[[MoEConfig, Logits], Scored]] = {
    "softmax_topk": _softmax_topk,
    "switch": _switch,
    "sigmoid_topk": _sigmoid_topk,
    "topk_softmax": _topk_softmax,
    "noisy_topk": _noisy_topk,
    "top_p": _top_p,
    "expert_choice": _expert_choice,
}


def noise_std(x_TD: torch.Tensor, noise_weight_ED: torch.Tensor) -> torch.Tensor:
    """The noisy-top-k per-token, per-expert noise scale."""
    return F.softplus(F.linear(x_TD, noise_weight_ED)) + NOISE_EPS


__all__ = ["Logits", "Scored", "RULES", "select_topk", "top_p_mask", "expert_choice_mask", "noise_std",
           "NOISE_EPS"]
