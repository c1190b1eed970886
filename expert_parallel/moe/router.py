"""Routers: score experts per token, pick experts, compute the balancing losses.

Legend: T tokens, D model dim, E experts, K choice slots per token, C tokens per expert.

All router math runs in float32 whatever the model dtype: the logits, the softmax /
sigmoid, the selection and the losses. The selected weights are returned in fp32 and
the combine step accumulates in fp32 too.

Routers (``MoEConfig.router``)
------------------------------
* ``softmax_topk`` -- softmax over experts, keep the K largest, optionally renormalise
  them to sum to 1 (GShard, Mixtral).
* ``switch`` -- top-1 of a softmax, weighted by the raw probability (Switch Transformer).
* ``sigmoid_topk`` -- independent sigmoid scores; a selection-only per-expert bias moved
  by the observed load balances the experts without an aux loss (DeepSeek-V3).
* ``noisy_topk`` -- noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural
  Networks"). A second linear map ``W_noise [E, D]`` (zero-initialised, as in the paper)
  gives a per-token, per-expert noise scale; in training the logits become
  ``h = x W^T + N(0, 1) * (softplus(x W_noise^T) + 0.01)``, then softmax / top-k as
  ``softmax_topk``. Its ``lb_loss`` is the paper's ``cv^2(importance) + cv^2(load)``:
  ``importance_e`` sums the combine weights given to e, ``load_e`` sums the smooth
  probability ``Phi((clean_e - threshold) / noise_std_e)`` that e stays in the top k if
  its noise were redrawn (threshold: the k-th largest other noisy logit), and
  ``cv^2 = var / mean^2``. 0 for perfectly balanced routing. In eval there is no noise
  and the same loss is evaluated on the clean logits.
* ``top_p`` -- a variable number of experts per token (Huang et al. 2024, "Harder tasks
  need more experts"). K = ``top_k`` slots hold the experts in descending probability;
  slot j is *valid* when the probability mass of slots 0..j-1 is still below ``top_p``
  (slot 0 always; ``top_p = 1`` keeps all K, i.e. exactly ``softmax_topk``). Invalid
  slots carry weight 0, are neither routed nor kept, and the kept weights are
  renormalised over the valid slots when ``normalize_topk``.
* ``expert_choice`` -- experts choose tokens (Zhou et al. 2022). Over this rank's
  tokens each expert takes its ``C`` highest-probability tokens, with
  ``C = min(T, MoEConfig.capacity(T))`` (``top_k`` acts as the average number of
  experts per token). It is returned as K = E slots per token, slot e = expert e, valid
  where expert e chose the token, so no expert ever overflows its capacity; a token
  chosen by no expert leaves the layer as zeros (counted in
  ``MoEStats.tokens_all_dropped``). Weights are the softmax probabilities, never
  renormalised. The choice is per source rank, exactly like capacity, so EP = N equals
  EP = 1 run on each rank's tokens.

Load-balancing loss (Switch Transformer eq. 4, GShard's ``l_aux``), all routers but
``noisy_topk``::

    lb_loss = E * sum_e f_e * P_e
    f_e = (valid (token, choice) pairs routed to e) / (valid pairs)   # not differentiable
    P_e = mean over tokens of the router probability of e             # differentiable

It is 1 for a perfectly uniform router and grows to E when every token picks the same
expert (for ``expert_choice`` f is uniform by construction, so it is 1). For the sigmoid
router, P uses the scores normalised to sum to 1 per token. It is computed over this
rank's tokens (demand before capacity), like GShard/DeepSpeed.

Router z-loss (ST-MoE): ``z_loss = mean_t logsumexp(logits_t)^2``.
The returned ``aux_loss = aux_loss_coeff * lb_loss + z_loss_coeff * z_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .permute import count_ids


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``keys`` (e.g. seed, tag, expert)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & ((1 << 63) - 1))


ROUTER_TAG = 1
NOISE_EPS = 1e-2
"""Floor of the noisy-top-k noise scale (the paper's ``noise_epsilon``): keeps the load
estimator's division finite when softplus underflows."""
CV_EPS = 1e-10


@dataclass(frozen=True)
class Routing:
    """What a router decided for T tokens; consumed by capacity and the dispatcher."""

    topk_idx_TK: torch.Tensor
    """Expert id of each choice slot (int64)."""
    topk_weight_TK: torch.Tensor
    """Combine weight of each choice slot (fp32, differentiable; 0 in invalid slots)."""
    probs_TE: torch.Tensor
    """Router probabilities over all experts (fp32), for losses and metrics."""
    aux_loss: torch.Tensor
    """Scalar, coefficients applied."""
    lb_loss: torch.Tensor
    """Unscaled load-balancing loss (detached), for logging."""
    z_loss: torch.Tensor
    """Unscaled z-loss (detached), for logging."""
    nonfinite: torch.Tensor
    """0-dim int64: 1 if any logit was NaN/Inf."""
    valid_TK: Optional[torch.Tensor] = None
    """Bool mask of the slots in use, for routers with a variable number of experts per
    token (``top_p``, ``expert_choice``); None means every slot is used."""


def load_balancing_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, valid_TK: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` over local tokens (0 for T=0); see the module docstring."""
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum() * 0.0
    if valid_TK is None:
        counts_E = count_ids(topk_idx_TK, num_experts)
        f_E = counts_E.to(torch.float32) / topk_idx_TK.numel()
    else:
        # Invalid slots count under a sentinel bin that is cut off.
        ids_TK = torch.where(valid_TK, topk_idx_TK, torch.full_like(topk_idx_TK, num_experts))
        counts_E = count_ids(ids_TK, num_experts + 1)[:num_experts].to(torch.float32)
        f_E = counts_E / counts_E.sum().clamp_min(1.0)
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def cv_squared(v_E: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance); 0 for a
    single expert or an all-zero vector."""
    if v_E.numel() <= 1:
        return v_E.sum() * 0.0
    return v_E.var(unbiased=False) / (v_E.mean().square() + CV_EPS)


def noisy_load(
    clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor, k: int
) -> torch.Tensor:
    """Shazeer et al.'s smooth load estimator: ``sum_t P(expert e in token t's top k)``
    under a fresh draw of e's noise, the other logits held fixed."""
    num_tokens, num_experts = noisy_TE.shape
    if k >= num_experts:
        # Every expert is in every token's top k whatever the noise: the load is T for
        # each, with no gradient (the smooth estimate would divide inf by the noise).
        return clean_TE.new_full((num_experts,), float(num_tokens))
    top_TJ = torch.topk(noisy_TE, min(k + 1, num_experts), dim=-1).values
    # If e is in the top k now, it stays there while it beats the (k+1)-th value;
    # otherwise it must beat the k-th.
    threshold_in_T1 = top_TJ[:, k : k + 1]
    threshold_out_T1 = top_TJ[:, k - 1 : k]
    is_in_TE = noisy_TE > threshold_in_T1
    normal = torch.distributions.Normal(0.0, 1.0)
    prob_in_TE = normal.cdf((clean_TE - threshold_in_T1) / noise_std_TE)
    prob_out_TE = normal.cdf((clean_TE - threshold_out_T1) / noise_std_TE)
    return torch.where(is_in_TE, prob_in_TE, prob_out_TE).sum(dim=0)


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


def expert_choice_mask(probs_TE: torch.Tensor, capacity: int) -> torch.Tensor:
    """``valid_TE[t, e]``: expert e chose token t among its ``capacity`` best tokens."""
    num_tokens, num_experts = probs_TE.shape
    c = min(capacity, num_tokens)
    chosen_EC = torch.topk(probs_TE.detach().t(), c, dim=-1).indices
    valid_ET = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=probs_TE.device)
    valid_ET.scatter_(1, chosen_EC, True)
    return valid_ET.t()


class Router(nn.Module):
    """Linear gate ``D -> E`` plus the selection rule named by ``config.router``."""

    def __init__(self, config: MoEConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        weight_ED = torch.empty(config.num_experts, config.hidden_size)
        weight_ED.normal_(0.0, config.init_std, generator=seeded_generator(seed, ROUTER_TAG))
        self.weight = nn.Parameter(weight_ED)
        if config.router == "noisy_topk":
            # Zero init as in the paper: the noise starts at softplus(0) + eps everywhere
            # and the load loss teaches it where exploration helps balance.
            self.noise_weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        else:
            self.noise_weight = None
        # Selection-only bias for aux-loss-free balancing; never receives gradients.
        self.register_buffer(
            "expert_bias", torch.zeros(config.num_experts, dtype=torch.float32), persistent=True
        )

    def _inputs(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD.float()
        if self.training and self.config.router_jitter > 0:
            eps = self.config.router_jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(self._inputs(x_TD), self.weight.float())

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.config
        valid_TK: Optional[torch.Tensor] = None
        lb: Optional[torch.Tensor] = None
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = self._inputs(x_TD)
            clean_TE = F.linear(x_TD, self.weight.float())
            logits_TE = clean_TE
            if cfg.router == "noisy_topk":
                noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight.float())) + NOISE_EPS
                if self.training:
                    logits_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
            nonfinite = (~torch.isfinite(logits_TE)).any().to(torch.int64)

            if cfg.router == "sigmoid_topk":
                scores_TE = torch.sigmoid(logits_TE)
                # The bias shifts which experts are chosen, not how much they weigh.
                select_TE = scores_TE.detach() + self.expert_bias
                topk_idx_TK = torch.topk(select_TE, cfg.top_k, dim=-1).indices
                weight_TK = scores_TE.gather(-1, topk_idx_TK)
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
            elif cfg.router == "expert_choice":
                probs_TE = torch.softmax(logits_TE, dim=-1)
                capacity = cfg.capacity(x_TD.shape[0], self.training)
                valid_TK = expert_choice_mask(probs_TE, capacity)
                topk_idx_TK = torch.arange(cfg.num_experts, device=x_TD.device).expand_as(
                    probs_TE).contiguous()
                weight_TK = torch.where(valid_TK, probs_TE, torch.zeros_like(probs_TE))
            else:
                probs_TE = torch.softmax(logits_TE, dim=-1)
                weight_TK, topk_idx_TK = torch.topk(probs_TE, cfg.top_k, dim=-1)
                if cfg.router == "top_p":
                    valid_TK = top_p_mask(weight_TK.detach(), cfg.top_p)
                    weight_TK = torch.where(valid_TK, weight_TK, torch.zeros_like(weight_TK))

            renormalise = cfg.router not in ("switch", "expert_choice")
            if cfg.normalize_topk and renormalise and cfg.top_k > 1:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)

            if cfg.router == "noisy_topk":
                gates_TE = torch.zeros_like(probs_TE).scatter(-1, topk_idx_TK, weight_TK)
                load_E = noisy_load(clean_TE, logits_TE, noise_std_TE, cfg.top_k)
                lb = cv_squared(gates_TE.sum(0)) + cv_squared(load_E)
            else:
                lb = load_balancing_loss(probs_TE, topk_idx_TK, valid_TK)
            zl = z_loss(logits_TE)
            aux = cfg.aux_loss_coeff * lb + cfg.z_loss_coeff * zl
        return Routing(
            topk_idx_TK=topk_idx_TK,
            topk_weight_TK=weight_TK,
            probs_TE=probs_TE,
            aux_loss=aux,
            lb_loss=lb.detach(),
            z_loss=zl.detach(),
            nonfinite=nonfinite,
            valid_TK=valid_TK,
        )

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts.

        ``load_E`` should be the load reduced over the data-parallel group so that every
        replica applies the same update and the router stays replicated.
        """
        rate = self.config.bias_update_rate
        if rate <= 0:
            return
        load_E = load_E.to(torch.float32)
        self.expert_bias += rate * torch.sign(load_E.mean() - load_E)
