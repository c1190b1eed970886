"""Shared experts: a dense MLP every token passes through (DeepSeek, Qwen2-MoE).

Legend: T tokens, D model dim, F shared hidden size (``MoEConfig.shared_ffn_hidden``).

Its parameters are replicated on every rank (data-parallel, all-reduced with the dense
parameters), not sharded like the routed experts. With ``shared_expert_gate`` the output
is scaled per token by ``sigmoid(x w_gate)`` (Qwen2-MoE). The layer computes it while the
dispatch all-to-all is in flight (``shared_expert_overlap``) and adds it to the routed
output. Weights depend only on the seed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MoEConfig
from .experts import GATED_ACTIVATIONS, apply_activation
from .router import seeded_generator

SHARED_TAG = 3


class SharedExperts(nn.Module):
    """``(act(x W1) [* x W3]) W2``, optionally gated, on every token."""

    def __init__(self, config: MoEConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        d, f = config.hidden_size, config.shared_ffn_hidden
        gen = seeded_generator(seed, SHARED_TAG)
        # Draw order is fixed: w1, w2, w3 (SwiGLU only), gate.
        self.w1_DF = nn.Parameter(torch.empty(d, f).normal_(0.0, config.init_std, generator=gen))
        self.w2_FD = nn.Parameter(torch.empty(f, d).normal_(0.0, config.init_std, generator=gen))
        self.w3_DF = (nn.Parameter(torch.empty(d, f).normal_(0.0, config.init_std, generator=gen))
                      if config.activation in GATED_ACTIVATIONS else None)
        self.gate_D = (nn.Parameter(torch.empty(d).normal_(0.0, config.init_std, generator=gen))
                       if config.shared_expert_gate else None)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        g_TF = x_TD @ self.w3_DF if self.w3_DF is not None else None
        y_TD = apply_activation(self.config, x_TD @ self.w1_DF, g_TF) @ self.w2_FD
        if self.gate_D is not None:
            y_TD = y_TD * torch.sigmoid(x_TD @ self.gate_D).unsqueeze(-1)
        return y_TD


__all__ = ["SharedExperts"]
