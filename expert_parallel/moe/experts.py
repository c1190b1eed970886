"""The local experts of one rank, as stacked parameters.

Legend: e local experts, D model dim, F ffn dim, N rows (tokens) for this rank's
experts in local-expert-major order, with ``counts[l]`` rows for local expert l.

Weights of global expert ``g`` are drawn from a generator seeded by ``(seed, g)`` only,
so the same seed gives the same model whatever the EP size.

Three ways to compute the same thing:
  * ``loop``: one GEMM chain per expert (fast on CPU; zero-row experts are fine).
  * ``bmm``: pad every expert to the largest count and run batched GEMMs.
  * ``grouped_mm``: ``torch._grouped_mm`` with row offsets (CUDA; one kernel for all
    experts, no padding).
``auto`` picks ``grouped_mm`` on CUDA when torch has it and ``loop`` otherwise.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .router import seeded_generator

EXPERT_TAG = 2


def _activation(name: str, h_NF: torch.Tensor, g_NF: torch.Tensor | None) -> torch.Tensor:
    if name == "swiglu":
        return F.silu(h_NF) * g_NF
    return F.gelu(h_NF)


class GroupedExperts(nn.Module):
    """``num_local`` expert MLPs stored as ``[e, ...]`` stacked parameters."""

    def __init__(self, config: MoEConfig, expert_ids: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.expert_ids = list(expert_ids)
        d, f = config.hidden_size, config.ffn_hidden_size
        w1, w3, w2 = [], [], []
        for g in self.expert_ids:
            gen = seeded_generator(seed, EXPERT_TAG, g)
            # Draw order is fixed per expert: w1, w2, then w3 (SwiGLU only).
            w1.append(torch.empty(d, f).normal_(0.0, config.init_std, generator=gen))
            w2.append(torch.empty(f, d).normal_(0.0, config.init_std, generator=gen))
            if config.activation == "swiglu":
                w3.append(torch.empty(d, f).normal_(0.0, config.init_std, generator=gen))
        self.w1_eDF = nn.Parameter(torch.stack(w1) if w1 else torch.empty(0, d, f))
        self.w2_eFD = nn.Parameter(torch.stack(w2) if w2 else torch.empty(0, f, d))
        self.w3_eDF = (
            nn.Parameter(torch.stack(w3) if w3 else torch.empty(0, d, f))
            if config.activation == "swiglu"
            else None
        )

    @property
    def num_local(self) -> int:
        return len(self.expert_ids)

    def grouped_mm_aligned(self, dtype: torch.dtype) -> bool:
        """``torch._grouped_mm`` needs 16-byte row strides for inputs and weights."""
        sizes = (self.config.hidden_size, self.config.ffn_hidden_size)
        itemsizes = {torch.empty((), dtype=dt).element_size() for dt in (dtype, self.w1_eDF.dtype)}
        return all(n * b % 16 == 0 for n in sizes for b in itemsizes)

    def backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        choice = self.config.expert_backend
        if choice != "auto":
            return choice
        if device.type == "cuda" and hasattr(torch, "_grouped_mm") and (
            dtype is None or self.grouped_mm_aligned(dtype)
        ):
            return "grouped_mm"
        # Measured on CPU: the per-expert loop is as fast as padded bmm and needs no
        # padding memory, so it is the CPU default.
        return "loop"

    def forward(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        backend = self.backend(x_ND.device, x_ND.dtype)
        if backend == "grouped_mm" and not self.grouped_mm_aligned(x_ND.dtype):
            # Same config and dtype on every rank, so every rank raises here alike.
            multiple = 16 // min(x_ND.element_size(), self.w1_eDF.element_size())
            raise ValueError(
                f"expert_backend='grouped_mm' needs 16-byte aligned rows: hidden_size="
                f"{self.config.hidden_size} and ffn_hidden_size={self.config.ffn_hidden_size} "
                f"must be multiples of {multiple} for {x_ND.dtype} "
                "(use expert_backend='loop' or 'bmm')"
            )
        if backend == "bmm":
            return self._forward_bmm(x_ND, counts)
        if backend == "grouped_mm":
            return self._forward_grouped(x_ND, counts)
        return self._forward_loop(x_ND, counts)

    def _mlp(self, x, w1, w3, w2):
        h = x @ w1
        g = x @ w3 if w3 is not None else None
        return _activation(self.config.activation, h, g) @ w2

    def _forward_loop(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        outs = []
        # unbind, not w[l]: the backward of w[l] materialises a zero [e, ...] gradient per
        # expert (O(e^2) memory traffic, ~5x slower at 32 local experts on CPU); unbind's
        # backward stacks the e slices once.
        w1s, w2s = self.w1_eDF.unbind(0), self.w2_eFD.unbind(0)
        w3s = self.w3_eDF.unbind(0) if self.w3_eDF is not None else None
        for l, x_nD in enumerate(torch.split(x_ND, list(counts))):
            outs.append(self._mlp(x_nD, w1s[l], w3s[l] if w3s is not None else None, w2s[l]))
        if not outs:
            return x_ND.new_zeros(0, self.config.hidden_size)
        return torch.cat(outs, dim=0)

    def _forward_bmm(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        e, d = self.num_local, self.config.hidden_size
        width = max(counts) if len(counts) else 0
        counts_e = torch.tensor(list(counts), device=x_ND.device)
        expert_of_row = torch.repeat_interleave(torch.arange(e, device=x_ND.device), counts_e,
                                                output_size=x_ND.shape[0])
        starts = torch.cumsum(counts_e, 0) - counts_e
        slot_of_row = torch.arange(x_ND.shape[0], device=x_ND.device) - starts[expert_of_row]
        flat_idx = expert_of_row * width + slot_of_row
        x_pad = x_ND.new_zeros(e * width, d).index_copy(0, flat_idx, x_ND).view(e, width, d)
        h = torch.bmm(x_pad, self.w1_eDF)
        g = torch.bmm(x_pad, self.w3_eDF) if self.w3_eDF is not None else None
        y_pad = torch.bmm(_activation(self.config.activation, h, g), self.w2_eFD)
        return y_pad.reshape(e * width, d).index_select(0, flat_idx)

    def _forward_grouped(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        offs = torch.cumsum(torch.tensor(list(counts), device=x_ND.device), 0).to(torch.int32)
        mm = torch._grouped_mm  # type: ignore[attr-defined]
        # _grouped_mm is not on autocast's list: it needs both operands in one dtype, so
        # under bf16 autocast the (fp32 master) weights are cast here, as autocast would.
        w1, w2 = self.w1_eDF.to(x_ND.dtype), self.w2_eFD.to(x_ND.dtype)
        w3 = self.w3_eDF.to(x_ND.dtype) if self.w3_eDF is not None else None
        h = mm(x_ND, w1, offs=offs)
        g = mm(x_ND, w3, offs=offs) if w3 is not None else None
        return mm(_activation(self.config.activation, h, g), w2, offs=offs)
