"""Per-forward routing statistics: tokens routed, kept, dropped, capacity, per expert.

Every ``MoELayer.forward`` returns an ``MoEStats`` for this rank's tokens (the source
side: "tokens this rank sent to expert e"). All counts stay on the device; nothing here
synchronises until you call :meth:`MoEStats.to_dict`. :meth:`MoEStats.reduce` sums the
stats over a process group with one all-reduce, giving exact global numbers per layer
and step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..distributed.collectives import CALL_COUNTS


@dataclass(frozen=True)
class MoEStats:
    """Routing statistics of one layer for one forward (optionally reduced over ranks).

    Per-expert tensors are indexed by *global* expert id and are int64.
    """

    routed_E: torch.Tensor
    """(token, choice) pairs routed to each expert, before capacity (demand)."""
    kept_E: torch.Tensor
    """Pairs each expert accepted."""
    dropped_E: torch.Tensor
    """Pairs each expert dropped (``routed - kept``)."""
    capacity_E: torch.Tensor
    """Capacity each expert offered (summed over source ranks after ``reduce``); equal to
    ``routed_E`` in dropless mode."""
    num_tokens: torch.Tensor
    """Tokens seen (0-dim int64)."""
    tokens_all_dropped: torch.Tensor
    """Tokens whose every choice was dropped (they leave the layer as zeros)."""
    nonfinite: torch.Tensor
    """Forwards whose router logits held NaN/Inf (0-dim int64)."""
    lb_loss: torch.Tensor
    """Unscaled load-balancing loss (summed over ranks after ``reduce``)."""
    z_loss: torch.Tensor
    """Unscaled z-loss (summed over ranks after ``reduce``)."""
    num_ranks: torch.Tensor
    """How many ranks' stats were summed (1 before ``reduce``)."""
    experts_per_token: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    """Histogram [K + 1]: tokens the router sent to exactly k experts (k = 0..K choice
    slots, before capacity). Constant K for top-k routers; varies for ``top_p`` and
    ``expert_choice`` (where bin 0 counts the tokens no expert chose)."""
    entropy_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))
    """Sum over tokens of the entropy (nats) of the router distribution ``probs_TE``."""
    max_prob_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))
    """Sum over tokens of the largest router probability (router confidence)."""
    kept_slots_P: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    """Kept pairs sent to each *physical* expert slot (``moe/placement.py``; equal to
    ``kept_E`` without redundant experts). Slot p lives on EP rank ``p // (P / ep_size)``."""

    def rank_load(self, ep_size: int) -> list[int]:
        """Kept pairs per EP rank (from the slot loads; host values)."""
        slots = self.kept_slots_P.tolist()
        per = len(slots) // ep_size if ep_size else 0
        return [sum(slots[r * per : (r + 1) * per]) for r in range(ep_size)]

    def _flat(self) -> torch.Tensor:
        return torch.cat([getattr(self, f.name).reshape(-1).to(torch.float64) for f in fields(self)])

    def _unflat(self, flat: torch.Tensor) -> "MoEStats":
        out, offset = {}, 0
        for f in fields(self):
            ref = getattr(self, f.name)
            n = ref.numel()
            out[f.name] = flat[offset : offset + n].reshape(ref.shape).to(ref.dtype)
            offset += n
        return MoEStats(**out)

    def reduce(self, group: Optional[Any]) -> "MoEStats":
        """Sum over ``group`` with a single all-reduce (``group=None``: no-op)."""
        if group is None:
            return self
        CALL_COUNTS["all_reduce_stats"] += 1
        flat = self._flat()
        dist.all_reduce(flat, group=group)
        return self._unflat(flat)

    @staticmethod
    def accumulate(items: list["MoEStats"]) -> "MoEStats":
        """Sum a list of stats (e.g. micro-batches or steps)."""
        first = items[0]
        total = sum((s._flat() for s in items[1:]), first._flat())
        return first._unflat(total)

    @property
    def drop_fraction(self) -> float:
        routed = int(self.routed_E.sum())
        return float(self.dropped_E.sum()) / routed if routed else 0.0

    def load_imbalance(self) -> float:
        """max / mean of tokens kept per expert (1.0 is perfect balance)."""
        kept = self.kept_E.to(torch.float64)
        mean = float(kept.mean()) if kept.numel() else 0.0
        return float(kept.max()) / mean if mean > 0 else 0.0

    def experts_per_token_mean(self) -> float:
        """Mean number of experts the router chose per token."""
        hist = self.experts_per_token.to(torch.float64)
        total = float(hist.sum())
        if total == 0:
            return 0.0
        k = torch.arange(hist.numel(), dtype=torch.float64, device=hist.device)
        return float((hist * k).sum()) / total

    def to_dict(self) -> dict:
        """Host-side summary for logs (this synchronises with the device)."""
        ranks = max(int(self.num_ranks), 1)
        tokens = max(int(self.num_tokens), 1)
        return {
            "num_tokens": int(self.num_tokens),
            "routed": self.routed_E.tolist(),
            "kept": self.kept_E.tolist(),
            "dropped": self.dropped_E.tolist(),
            "capacity": self.capacity_E.tolist(),
            "drop_fraction": self.drop_fraction,
            "tokens_all_dropped": int(self.tokens_all_dropped),
            "load_imbalance": self.load_imbalance(),
            "nonfinite": int(self.nonfinite),
            "lb_loss": float(self.lb_loss) / ranks,
            "z_loss": float(self.z_loss) / ranks,
            "experts_per_token_hist": self.experts_per_token.tolist(),
            "experts_per_token_mean": self.experts_per_token_mean(),
            "router_entropy": float(self.entropy_sum) / tokens,
            "router_confidence": float(self.max_prob_sum) / tokens,
        }


def routing_summary(routing: Any) -> dict[str, torch.Tensor]:
    """The per-token routing fields of :class:`MoEStats` for one router decision
    (``moe.router.Routing``): experts-per-token histogram, entropy and max-probability
    sums. Device-side only, no host sync."""
    idx_TK = routing.topk_idx_TK
    num_slots = idx_TK.shape[1]
    if routing.valid_TK is None:
        chosen_T = torch.full(idx_TK.shape[:1], num_slots, dtype=torch.int64, device=idx_TK.device)
    else:
        chosen_T = routing.valid_TK.sum(-1).to(torch.int64)
    hist = torch.zeros(num_slots + 1, dtype=torch.int64, device=idx_TK.device)
    hist.scatter_add_(0, chosen_T, torch.ones_like(chosen_T))
    probs_TE = routing.probs_TE.detach().float()
    entropy_T = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1)
    max_T = probs_TE.max(-1).values if probs_TE.shape[0] else probs_TE.new_zeros(0)
    return {
        "experts_per_token": hist,
        "entropy_sum": entropy_T.sum(),
        "max_prob_sum": max_T.sum(),
    }
