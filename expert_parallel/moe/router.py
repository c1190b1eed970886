"""The router: a linear gate D -> E, a scoring rule, and the balancing losses.

Legend: T tokens, D model dim, E experts, K choice slots per token.

Router math runs in ``MoEConfig.router_dtype`` (fp32, or fp64) whatever the model dtype
and autocast: the logits, the scores, the selection, the combine weights and the losses;
the combine step accumulates in that precision too. One forward::

    logits = x W^T (+ noise for noisy_topk in training)
    scored = RULES[config.router](config, logits)     # moe/scoring.py, one function each
    weights: renormalised over the K (``normalize_topk``), times ``routed_scaling_factor``
    aux_loss = aux_loss_coeff * lb_loss + z_loss_coeff * z_loss    # moe/balance.py

The load-balancing loss is taken over this forward's tokens, per sequence, or over the
global batch (``aux_loss_scope``); the layer passes the sequence count and the
:class:`~.balance.GlobalLoad` tracker for the last two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .balance import GlobalLoad, expert_counts, load_balancing_loss, z_loss
from .scoring import RULES, Logits, noise_std


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``keys`` (e.g. seed, tag, expert)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & ((1 << 63) - 1))


ROUTER_TAG = 1
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class Routing:
    """What a router decided for T tokens; consumed by capacity and the dispatcher."""

    topk_idx_TK: torch.Tensor
    """Expert id of each choice slot (int64)."""
    topk_weight_TK: torch.Tensor
    """Combine weight of each choice slot (router dtype, differentiable; 0 in invalid slots)."""
    probs_TE: torch.Tensor
    """Router probabilities over all experts (router dtype), for losses and metrics."""
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


class Router(nn.Module):
    """Linear gate ``D -> E`` plus the scoring rule named by ``config.router``."""

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
        # router_bias (GPT-OSS): a learned logit bias, zero init (the seeded draws above
        # are unchanged), replicated and trained like the weight.
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        # Selection-only bias for aux-loss-free balancing; never receives gradients.
        self.register_buffer(
            "expert_bias", torch.zeros(config.num_experts, dtype=torch.float32), persistent=True
        )

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.config.router_dtype]

    def _inputs(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TD = x_TD.to(self.dtype)
        if self.training and self.config.router_jitter > 0:
            eps = self.config.router_jitter
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD

    def _linear(self, x_TD: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.dtype) if self.bias is not None else None
        return F.linear(x_TD, self.weight.to(self.dtype), bias)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self._linear(self._inputs(x_TD))

    def forward(self, x_TD: torch.Tensor, num_sequences: int = 1,
                global_load: Optional[GlobalLoad] = None) -> Routing:
        cfg = self.config
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = self._inputs(x_TD)
            clean_TE = self._linear(x_TD)
            logits_TE, std_TE = clean_TE, None
            if cfg.router == "noisy_topk":
                std_TE = noise_std(x_TD, self.noise_weight.to(self.dtype))
                if self.training:
                    logits_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
            nonfinite = (~torch.isfinite(logits_TE)).any().to(torch.int64)
            scored = RULES[cfg.router](cfg, Logits(logits_TE, clean_TE, std_TE, self.expert_bias,
                                                   cfg.capacity(x_TD.shape[0], self.training)))
            weight_TK = scored.weight_TK
            if cfg.normalize_topk and scored.renormalise and cfg.top_k > 1:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
            if cfg.routed_scaling_factor != 1.0:
                weight_TK = weight_TK * cfg.routed_scaling_factor
            lb = scored.lb_loss
            if lb is None:
                lb = self._balance(scored, num_sequences, global_load)
            zl = z_loss(logits_TE)
            aux = cfg.aux_loss_coeff * lb + cfg.z_loss_coeff * zl
        return Routing(topk_idx_TK=scored.topk_idx_TK, topk_weight_TK=weight_TK,
                       probs_TE=scored.probs_TE, aux_loss=aux, lb_loss=lb.detach(),
                       z_loss=zl.detach(), nonfinite=nonfinite, valid_TK=scored.valid_TK)

    def _balance(self, scored, num_sequences: int, global_load: Optional[GlobalLoad]) -> torch.Tensor:
        scope = self.config.aux_loss_scope
        if scope == "global_batch":
            if global_load is None:
                raise ValueError("aux_loss_scope='global_batch' needs the layer's GlobalLoad tracker")
            counts_E = expert_counts(scored.topk_idx_TK, scored.valid_TK, self.config.num_experts)[0]
            f_E, scale = global_load.reduce(counts_E, scored.probs_TE.shape[0])
            return load_balancing_loss(scored.probs_TE, scored.topk_idx_TK, scored.valid_TK,
                                       global_f_E=f_E, p_scale=scale.to(scored.probs_TE.dtype))
        return load_balancing_loss(scored.probs_TE, scored.topk_idx_TK, scored.valid_TK,
                                   num_sequences=num_sequences if scope == "sequence" else 1)

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
