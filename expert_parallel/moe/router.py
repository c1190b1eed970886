"""Routers: score experts per token, pick top-k, compute the balancing losses.

Legend: T tokens, D model dim, E experts, K choices per token.

All router math runs in float32 whatever the model dtype: the logits, the softmax /
sigmoid, the top-k selection and the losses. The selected weights are returned in fp32
and the combine step accumulates in fp32 too.

Load-balancing loss (Switch Transformer eq. 4, GShard's ``l_aux``)::

    lb_loss = E * sum_e f_e * P_e
    f_e = (number of (token, choice) pairs routed to e) / (T * K)    # not differentiable
    P_e = mean over tokens of the router probability of e             # differentiable

It is 1 for a perfectly uniform router and grows to E when every token picks the same
expert. For the sigmoid router, P uses the scores normalised to sum to 1 per token.
It is computed over this rank's tokens (demand before capacity), like GShard/DeepSpeed.

Router z-loss (ST-MoE): ``z_loss = mean_t logsumexp(logits_t)^2``.
The returned ``aux_loss = aux_loss_coeff * lb_loss + z_loss_coeff * z_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Routing:
    """What a router decided for T tokens; consumed by capacity and the dispatcher."""

    topk_idx_TK: torch.Tensor
    """Expert id of each choice (int64)."""
    topk_weight_TK: torch.Tensor
    """Combine weight of each choice (fp32, differentiable)."""
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


def load_balancing_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` over local tokens (0 for T=0); see the module docstring."""
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum() * 0.0
    counts_E = count_ids(topk_idx_TK, num_experts)
    f_E = counts_E.to(torch.float32) / topk_idx_TK.numel()
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class Router(nn.Module):
    """Linear gate ``D -> E`` plus the selection rule named by ``config.router``."""

    def __init__(self, config: MoEConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        weight_ED = torch.empty(config.num_experts, config.hidden_size)
        weight_ED.normal_(0.0, config.init_std, generator=seeded_generator(seed, ROUTER_TAG))
        self.weight = nn.Parameter(weight_ED)
        # Selection-only bias for aux-loss-free balancing; never receives gradients.
        self.register_buffer(
            "expert_bias", torch.zeros(config.num_experts, dtype=torch.float32), persistent=True
        )

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD.float()
        if self.training and self.config.router_jitter > 0:
            eps = self.config.router_jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return F.linear(x_TD, self.weight.float())

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.config
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = self.logits(x_TD)
            nonfinite = (~torch.isfinite(logits_TE)).any().to(torch.int64)
            if cfg.router == "sigmoid_topk":
                scores_TE = torch.sigmoid(logits_TE)
                # The bias shifts which experts are chosen, not how much they weigh.
                select_TE = scores_TE.detach() + self.expert_bias
                topk_idx_TK = torch.topk(select_TE, cfg.top_k, dim=-1).indices
                weight_TK = scores_TE.gather(-1, topk_idx_TK)
                probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
            else:
                probs_TE = torch.softmax(logits_TE, dim=-1)
                weight_TK, topk_idx_TK = torch.topk(probs_TE, cfg.top_k, dim=-1)
            if cfg.normalize_topk and cfg.router != "switch" and cfg.top_k > 1:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
            lb = load_balancing_loss(probs_TE, topk_idx_TK)
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
