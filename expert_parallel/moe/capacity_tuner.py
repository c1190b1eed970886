"""Capacity auto-tuning: pick the smallest capacity factor that meets a drop target.

For one source rank with T tokens, top-k K and E experts, an expert that was routed
``routed_e`` pairs drops exactly ``max(0, routed_e - C(cf))`` of them under *either* drop
policy, with ``C(cf) = max(min_capacity, ceil(cf * T * K / E))``. So the drop fraction
every candidate factor *would* have produced on the observed load histograms is exact,
not a model. The tuner accumulates it on the device for a grid of candidate factors
(no host sync per step), and :meth:`CapacityTuner.propose` reduces the totals over the
data-parallel group (one small all-reduce, so every rank picks the same factor) and
returns the smallest candidate whose drop fraction is at most the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..config import MoEConfig, _check_float, _check_int
from .stats import MoEStats


@dataclass(frozen=True)
class CapacityTunerConfig:
    """Settings of the capacity auto-tuner (off while ``target_drop`` is None)."""

    target_drop: Optional[float] = None
    """Largest acceptable fraction of dropped (token, expert) pairs; none = no tuning
    (the capacity factor stays fixed)."""
    tune_every: int = 50
    """Steps between updates: the tuner observes this many steps, then every rank sets
    the smallest candidate factor meeting the target."""
    min_factor: float = 1.0
    """Smallest capacity factor considered."""
    max_factor: float = 4.0
    """Largest capacity factor considered (used when nothing smaller meets the target)."""
    step: float = 0.05
    """Spacing of the candidate grid."""

    def __post_init__(self) -> None:
        if self.target_drop is not None:
            _check_float("target_drop", self.target_drop, 0.0, strict=False)
            if self.target_drop >= 1:
                raise ValueError(f"target_drop must be < 1, got {self.target_drop!r}")
        _check_int("tune_every", self.tune_every, 1)
        _check_float("min_factor", self.min_factor, 0.0, strict=True)
        _check_float("step", self.step, 0.0, strict=True)
        _check_float("max_factor", self.max_factor, self.min_factor, strict=False)


class CapacityTuner:
    """Observes per-rank stats of one layer; proposes a capacity factor."""

    def __init__(self, moe: MoEConfig, config: CapacityTunerConfig) -> None:
        if config.target_drop is None:
            raise ValueError("CapacityTuner needs CapacityTunerConfig.target_drop, got None")
        self.moe, self.config = moe, config
        n = int(round((config.max_factor - config.min_factor) / config.step)) + 1
        self.candidates = [round(config.min_factor + i * config.step, 6) for i in range(n)]
        self._dropped: Optional[torch.Tensor] = None
        self._routed: Optional[torch.Tensor] = None

    def observe(self, stats: MoEStats) -> None:
        """Add one forward's *local* (unreduced) stats. Device-only, no sync."""
        routed_E = stats.routed_E.to(torch.float64)
        tokens = stats.num_tokens.to(torch.float64)
        cf = torch.tensor(self.candidates, dtype=torch.float64, device=routed_E.device)
        raw = torch.ceil(cf * tokens * self.moe.top_k / self.moe.num_experts)
        cap_c = torch.clamp(raw, min=float(self.moe.min_capacity))
        dropped_c = torch.clamp(routed_E.unsqueeze(0) - cap_c.unsqueeze(1), min=0).sum(1)
        routed = routed_E.sum()
        self._dropped = dropped_c if self._dropped is None else self._dropped + dropped_c
        self._routed = routed if self._routed is None else self._routed + routed

    def drop_curve(self, group: Any = None) -> list[tuple[float, float]]:
        """(factor, drop fraction) for every candidate, reduced over ``group``."""
        if self._dropped is None:
            return []
        flat = torch.cat([self._dropped, self._routed.reshape(1)])
        if group is not None:
            dist.all_reduce(flat, group=group)
        values = flat.tolist()
        routed = values[-1]
        return [(c, (d / routed) if routed else 0.0) for c, d in zip(self.candidates, values[:-1])]

    def propose(self, group: Any = None) -> Optional[float]:
        """Smallest factor meeting the target over the observed window, then reset.
        Collective over ``group`` (every rank must call it)."""
        curve = self.drop_curve(group)
        self._dropped = self._routed = None
        if not curve:
            return None
        for factor, drop in curve:
            if drop <= self.config.target_drop + 1e-12:
                return factor
        return curve[-1][0]

