"""Balancing losses: load-balancing (per micro-batch, per sequence, global batch), z-loss,
the noisy-top-k importance/load loss, and the global-load tracker.

Legend: T tokens, B sequences, S tokens per sequence, E experts, K choice slots.

Load-balancing loss (Switch Transformer eq. 4, GShard's ``l_aux``, DeepSeek-V3's
balance loss)::

    lb = E * sum_e f_e * P_e
    f_e = (valid (token, choice) pairs routed to e) / (valid pairs)    # no gradient
    P_e = mean over tokens of the router probability of e              # differentiable

1 for a perfectly uniform router, up to E when every token picks one expert.
``aux_loss_scope`` decides over which tokens f and P are taken:

* ``micro_batch`` -- this rank's tokens of this forward (GShard, DeepSpeed).
* ``sequence`` -- DeepSeek-V3's complementary sequence-wise loss: f and P per sequence of
  a ``[B, S, D]`` input, the B losses averaged.
* ``global_batch`` -- f from the load summed over the data-parallel group (and over the
  micro-batches since the tracker's :meth:`GlobalLoad.start`), P from this rank's tokens,
  scaled by ``W * T_rank / T_global``. The mean of the W per-rank losses (the trainer's
  objective) is then exactly the loss one process computes over the concatenated global
  batch (Megatron's global aux loss; Qwen, "Demons in the Detail", arXiv 2501.11873).

Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)^2``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..distributed.collectives import CALL_COUNTS, comm_scope, guard
from .permute import count_ids

CV_EPS = 1e-10


def expert_counts(topk_idx_TK: torch.Tensor, valid_TK: Optional[torch.Tensor], num_experts: int,
                  num_rows: int = 1) -> torch.Tensor:
    """Valid pairs per (row, expert): ``[num_rows, E]`` int64 for tokens split into
    ``num_rows`` equal rows (sequences); invalid slots fall in a cut-off sentinel bin."""
    ids_TK = topk_idx_TK
    if valid_TK is not None:
        ids_TK = torch.where(valid_TK, topk_idx_TK, torch.full_like(topk_idx_TK, num_experts))
    if num_rows > 1:
        row_T = torch.arange(ids_TK.shape[0], device=ids_TK.device) // (ids_TK.shape[0] // num_rows)
        ids_TK = ids_TK + (row_T * (num_experts + 1)).unsqueeze(1)
    return count_ids(ids_TK, num_rows * (num_experts + 1)).view(num_rows, num_experts + 1)[:, :num_experts]


def load_balancing_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor,
                        valid_TK: Optional[torch.Tensor] = None, num_sequences: int = 1,
                        global_f_E: Optional[torch.Tensor] = None, p_scale: Any = 1.0) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` (0 for T=0). ``num_sequences > 1``: per sequence, averaged.
    ``global_f_E``: use this load instead of the local one, P scaled by ``p_scale``."""
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.sum() * 0.0
    if global_f_E is not None:
        return num_experts * torch.sum(global_f_E.to(probs_TE.dtype) * probs_TE.mean(0)) * p_scale
    counts_BE = expert_counts(topk_idx_TK, valid_TK, num_experts, num_sequences).to(probs_TE.dtype)
    f_BE = counts_BE / counts_BE.sum(-1, keepdim=True).clamp_min(1.0)
    p_BE = probs_TE.view(num_sequences, -1, num_experts).mean(1)
    return num_experts * (f_BE * p_BE).sum(-1).mean()


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


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.special.erf(z * 0.7071067811865476))


def noisy_load(clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor,
               k: int) -> torch.Tensor:
    """Shazeer et al.'s smooth load estimator: ``sum_t P(expert e in token t's top k)``
    under a fresh draw of e's noise, the other logits held fixed."""
    num_tokens, num_experts = noisy_TE.shape
    if k >= num_experts:
        # Every expert is in every token's top k whatever the noise: the load is T for
        # each, with no gradient (the smooth estimate would divide inf by the noise).
        return clean_TE.new_full((num_experts,), float(num_tokens))
    top_TJ = torch.topk(noisy_TE, k + 1, dim=-1).values
    # If e is in the top k now, it stays there while it beats the (k+1)-th value;
    # otherwise it must beat the k-th.
    threshold_in_T1, threshold_out_T1 = top_TJ[:, k : k + 1], top_TJ[:, k - 1 : k]
    # The standard normal CDF written out: torch.distributions.Normal builds its loc and
    # scale with torch.tensor on the host (a host-to-device copy per forward on CUDA).
    prob_in_TE = _normal_cdf((clean_TE - threshold_in_T1) / noise_std_TE)
    prob_out_TE = _normal_cdf((clean_TE - threshold_out_T1) / noise_std_TE)
    return torch.where(noisy_TE > threshold_in_T1, prob_in_TE, prob_out_TE).sum(dim=0)


class GlobalLoad:
    """Load summed over the data-parallel ``group`` for ``aux_loss_scope='global_batch'``.

    :meth:`reduce` all-reduces ``[counts_E, tokens]`` over ``group`` (one small
    collective per layer forward, no host sync) and adds what the micro-batches since
    :meth:`start` contributed; without ``start`` every forward is its own global batch.
    Activation checkpointing re-runs the forward inside backward: a recompute (detected
    by running inside the autograd engine) reuses the load its original forward saw,
    with no collective, so the load is never counted twice.
    """

    def __init__(self, group: Any, world_size: int) -> None:
        self.group, self.world_size = group, world_size
        self.accumulating = False
        self._acc: Optional[torch.Tensor] = None
        self._pending: deque = deque(maxlen=1024)  # loads awaiting a recompute (bounded)

    def start(self) -> None:
        """Begin a global batch: the next forwards' loads accumulate until the next call."""
        self.accumulating, self._acc = True, None
        self._pending.clear()

    def reduce(self, counts_E: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_E over the global batch so far, this rank's P scale ``W T / T_global``)."""
        if torch._C._current_graph_task_id() != -1 and self._pending:
            return self._pending.popleft()  # recompute under activation checkpointing
        local = torch.cat([counts_E.to(torch.float64),
                           torch.full((1,), float(num_tokens), dtype=torch.float64, device=counts_E.device)])
        now = local.clone()
        if self.group is not None:
            CALL_COUNTS["all_reduce_load"] += 1
            with comm_scope(phase="aux_load_all_reduce"), guard("all_reduce"):
                dist.all_reduce(now, group=self.group)
        total = now if self._acc is None else self._acc + now
        if self.accumulating:
            self._acc = total
        f_E = total[:-1] / total[:-1].sum().clamp_min(1.0)
        scale = self.world_size * local[-1] / now[-1].clamp_min(1.0)
        result = (f_E, scale)
        if torch.is_grad_enabled():
            self._pending.append(result)
            if not self.accumulating and len(self._pending) > 1:
                self._pending.popleft()  # no global batch open: keep only the latest
        return result


__all__ = ["load_balancing_loss", "expert_counts", "z_loss", "cv_squared", "noisy_load", "GlobalLoad"]
