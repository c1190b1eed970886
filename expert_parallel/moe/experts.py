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
``auto`` picks ``grouped_mm`` on CUDA where its kernel applies and ``loop`` otherwise.

``torch._grouped_mm``'s rules (:func:`grouped_mm_problem`), refused up front with a
:class:`GroupedMMUnsupported` (a ``ValueError``) instead of failing inside torch:
16-byte row strides (D and F multiples of 8 in bf16, of 4 in fp32), fewer than 1024
local experts, and on CUDA bf16 on an sm90/sm100 GPU -- anything else runs torch's
fallback, a per-expert loop that reads the offsets back to the host on every call (a
hidden sync). Per-expert row counts need no padding: with contiguous rows the kernel
checks no per-group alignment, and empty experts are fine (an empty batch never reaches
the kernel). Counts and offsets reach the device with :func:`~.permute.host_ints` (no
sync).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .permute import host_ints
from .router import seeded_generator

EXPERT_TAG = 2
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUPED_MM_MAX_GROUPS = 1023


class GroupedMMUnsupported(ValueError):
    """``expert_backend='grouped_mm'`` cannot run these experts (the message says why)."""


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: Optional[int]) -> Optional[tuple[int, int]]:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(index)


def grouped_mm_problem(hidden_size: int, ffn_hidden_size: int, num_local: int,
                       device_type: str, dtype: torch.dtype,
                       capability: Optional[tuple[int, int]] = None) -> Optional[str]:
    """Why ``torch._grouped_mm`` cannot compute these experts correctly and without a host
    sync (None: it can). ``capability`` is the CUDA compute capability (CUDA only)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"this torch ({torch.__version__}) has no torch._grouped_mm"
    if dtype not in GROUPED_MM_DTYPES:
        return f"torch._grouped_mm computes in float32, bfloat16 or float16, not {dtype}"
    multiple = 16 // dtype.itemsize
    if hidden_size % multiple or ffn_hidden_size % multiple:
        return (f"it needs 16-byte aligned rows: hidden_size={hidden_size} and ffn_hidden_size="
                f"{ffn_hidden_size} must be multiples of {multiple} for {dtype}")
    if num_local > GROUPED_MM_MAX_GROUPS:
        return f"torch._grouped_mm takes at most {GROUPED_MM_MAX_GROUPS} groups, got {num_local} local experts"
    if device_type == "cuda":
        if dtype != torch.bfloat16:
            return (f"on CUDA its kernel is bf16-only (use bf16 autocast), got {dtype}: other dtypes "
                    "run torch's fallback, which reads the offsets to the host every call")
        if capability is None or capability[0] not in (9, 10):
            found = "unknown" if capability is None else f"sm{capability[0]}{capability[1]}"
            return (f"on CUDA its kernel needs an sm90/sm100 GPU (H100, H200, B200), this one is "
                    f"{found}: elsewhere torch's fallback reads the offsets to the host every call")
    return None


AUTO_BACKEND: dict[str, str] = {"cuda": "grouped_mm", "cpu": "loop"}
"""What ``expert_backend="auto"`` runs per device type, where that backend applies
(``GroupedExperts.backend``). CPU: measured by ``benchmarks/expert_backends.py``
(``benchmarks/results/expert_backends.md``, E = 8 ... 128, fp32 and bf16); CUDA: the
one-kernel grouped GEMM (not measured yet: nothing here has run on a GPU)."""

GATED_ACTIVATIONS = ("swiglu", "swiglu_clamped")
"""Activations with a second (up) projection W3."""


def apply_activation(config: MoEConfig, h_NF: torch.Tensor, g_NF: torch.Tensor | None) -> torch.Tensor:
    """``config.activation`` of the gate projection ``h_NF`` (times the up projection
    ``g_NF`` for the gated ones)."""
    name = config.activation
    if name == "swiglu":
        return F.silu(h_NF) * g_NF
    if name == "swiglu_clamped":  # GPT-OSS: clamped gate and up, sigmoid slope alpha, up + 1
        limit = config.swiglu_limit
        h_NF = h_NF.clamp(max=limit)
        glu_NF = h_NF * torch.sigmoid(h_NF * config.swiglu_alpha)
        return (g_NF.clamp(min=-limit, max=limit) + 1) * glu_NF
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
            if config.activation in GATED_ACTIVATIONS:
                w3.append(torch.empty(d, f).normal_(0.0, config.init_std, generator=gen))
        self.w1_eDF = nn.Parameter(torch.stack(w1) if w1 else torch.empty(0, d, f))
        self.w2_eFD = nn.Parameter(torch.stack(w2) if w2 else torch.empty(0, f, d))
        self.w3_eDF = (
            nn.Parameter(torch.stack(w3) if w3 else torch.empty(0, d, f))
            if config.activation in GATED_ACTIVATIONS
            else None
        )
        # Projection biases (expert_proj_bias, GPT-OSS): zero init, so the seeded weight
        # draws above are the same with or without them.
        e, bias = len(self.expert_ids), config.expert_proj_bias
        self.b1_eF = nn.Parameter(torch.zeros(e, f)) if bias else None
        self.b3_eF = nn.Parameter(torch.zeros(e, f)) if bias and self.w3_eDF is not None else None
        self.b2_eD = nn.Parameter(torch.zeros(e, d)) if bias else None

    @property
    def num_local(self) -> int:
        return len(self.expert_ids)

    def grouped_mm_problem(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """:func:`grouped_mm_problem` for these experts on ``device`` in ``dtype``."""
        cap = _cuda_capability(device.index) if device.type == "cuda" else None
        return grouped_mm_problem(self.config.hidden_size, self.config.ffn_hidden_size,
                                  self.num_local, device.type, dtype, cap)

    @staticmethod
    def compute_dtype(x_ND: torch.Tensor) -> torch.dtype:
        """What the expert GEMMs compute in: the autocast dtype when autocast is on."""
        if torch.is_autocast_enabled(x_ND.device.type):
            return torch.get_autocast_dtype(x_ND.device.type)
        return x_ND.dtype

    def backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        """The backend ``forward`` runs: the configured one, or for ``auto`` the measured
        best of this device type (:data:`AUTO_BACKEND`) where it applies -- ``grouped_mm``
        only where :func:`grouped_mm_problem` finds nothing against it -- else ``loop``."""
        choice = self.config.expert_backend
        if choice != "auto":
            return choice
        best = AUTO_BACKEND.get(device.type, "loop")
        if best == "grouped_mm" and (dtype is None or self.grouped_mm_problem(device, dtype) is not None):
            return "loop"
        return best

    def forward(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        dtype = self.compute_dtype(x_ND)
        backend = self.backend(x_ND.device, dtype)
        if backend == "grouped_mm":
            problem = self.grouped_mm_problem(x_ND.device, dtype)
            if problem is not None:
                # Same config, dtype and GPU model on every rank: every rank raises alike.
                raise GroupedMMUnsupported(
                    f"expert_backend='grouped_mm' cannot run here: {problem} "
                    "(use expert_backend='loop' or 'bmm', or 'auto')")
            if x_ND.shape[0] == 0:  # nothing to multiply: no kernel launch on an empty batch
                return self._forward_loop(x_ND, counts)
            return self._forward_grouped(x_ND.to(dtype).contiguous(), counts)
        if backend == "bmm":
            return self._forward_bmm(x_ND, counts)
        return self._forward_loop(x_ND, counts)

    def _mlp(self, x, w1, w3, w2, b1=None, b3=None, b2=None):
        h = x @ w1 if b1 is None else torch.addmm(b1, x, w1)
        g = None if w3 is None else (x @ w3 if b3 is None else torch.addmm(b3, x, w3))
        a = apply_activation(self.config, h, g)
        return a @ w2 if b2 is None else torch.addmm(b2, a, w2)

    def _unbind(self, name: str) -> Optional[tuple[torch.Tensor, ...]]:
        p = getattr(self, name)
        return p.unbind(0) if p is not None else None

    def _forward_loop(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        outs = []
        # unbind, not w[l]: the backward of w[l] materialises a zero [e, ...] gradient per
        # expert (O(e^2) memory traffic, ~5x slower at 32 local experts on CPU); unbind's
        # backward stacks the e slices once.
        w1s, w2s = self.w1_eDF.unbind(0), self.w2_eFD.unbind(0)
        optional = [self._unbind(n) for n in ("w3_eDF", "b1_eF", "b3_eF", "b2_eD")]
        for l, x_nD in enumerate(torch.split(x_ND, list(counts))):
            w3, b1, b3, b2 = (t[l] if t is not None else None for t in optional)
            outs.append(self._mlp(x_nD, w1s[l], w3, w2s[l], b1, b3, b2))
        if not outs:
            return x_ND.new_zeros(0, self.config.hidden_size)
        return torch.cat(outs, dim=0)

    def _forward_bmm(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        e, d = self.num_local, self.config.hidden_size
        width = max(counts) if len(counts) else 0
        counts_e = host_ints(counts, x_ND.device)
        expert_of_row = torch.repeat_interleave(torch.arange(e, device=x_ND.device), counts_e,
                                                output_size=x_ND.shape[0])
        starts = torch.cumsum(counts_e, 0) - counts_e
        slot_of_row = torch.arange(x_ND.shape[0], device=x_ND.device) - starts[expert_of_row]
        flat_idx = expert_of_row * width + slot_of_row
        x_pad = x_ND.new_zeros(e * width, d).index_copy(0, flat_idx, x_ND).view(e, width, d)

        def bmm(a, w, b):  # b [e, out] broadcast over each expert's padded rows
            return torch.bmm(a, w) if b is None else torch.baddbmm(b.unsqueeze(1), a, w)

        h = bmm(x_pad, self.w1_eDF, self.b1_eF)
        g = bmm(x_pad, self.w3_eDF, self.b3_eF) if self.w3_eDF is not None else None
        y_pad = bmm(apply_activation(self.config, h, g), self.w2_eFD, self.b2_eD)
        return y_pad.reshape(e * width, d).index_select(0, flat_idx)

    def _forward_grouped(self, x_ND: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        offs = torch.cumsum(host_ints(counts, x_ND.device), 0).to(torch.int32)
        mm = torch._grouped_mm  # type: ignore[attr-defined]
        # _grouped_mm is not on autocast's list: it needs both operands in one dtype, so
        # under bf16 autocast the (fp32 master) weights are cast here, as autocast would.
        w1, w2 = self.w1_eDF.to(x_ND.dtype), self.w2_eFD.to(x_ND.dtype)
        w3 = self.w3_eDF.to(x_ND.dtype) if self.w3_eDF is not None else None
        counts_e = host_ints(counts, x_ND.device)

        def add_bias(y, b):  # each row gets its expert's bias
            if b is None:
                return y
            return y + torch.repeat_interleave(b.to(y.dtype), counts_e, dim=0, output_size=y.shape[0])

        h = add_bias(mm(x_ND, w1, offs=offs), self.b1_eF)
        g = add_bias(mm(x_ND, w3, offs=offs), self.b3_eF) if w3 is not None else None
        return add_bias(mm(apply_activation(self.config, h, g), w2, offs=offs), self.b2_eD)
