"""Expert-collapse metrics: is the router still using its experts?

Legend: T tokens, E experts.

Four numbers per MoE layer, computed over a sliding window of the last ``window`` steps
from the per-step :class:`~expert_parallel.moe.stats.MoEStats` (reduced over ranks or
not, the ratios are the same):

* ``routing_entropy`` -- mean over tokens of the entropy (nats) of the router
  distribution ``probs_TE``; ``routing_entropy_norm`` divides by ``ln E`` (1 = uniform,
  0 = one-hot). A collapsing router drifts towards 0.
* ``dead_experts`` -- experts that were routed no token at all across the window (their
  ids in ``dead_expert_ids``). They receive no gradient, so they stay dead.
* ``max_expert_share`` -- fraction of the window's routed (token, expert) pairs that
  went to the most-used expert (1/E is perfect balance, 1 is total collapse).
* ``router_confidence`` -- mean over tokens of the largest router probability.

The entropy and confidence come from the sums the layer stores in its stats
(``entropy_sum``, ``max_prob_sum``), so nothing extra is communicated: they ride in the
same all-reduce as the token counts. :class:`CollapseTracker` keeps the window (device
tensors; the host sync happens only in :meth:`CollapseTracker.summary`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..config import _check_int
from .stats import MoEStats

METRIC_NAMES = ("routing_entropy", "routing_entropy_norm", "dead_experts", "max_expert_share",
                "router_confidence")


def routing_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Per-token entropy (nats) of router distributions ``probs_TE`` -> ``[T]``."""
    p = probs_TE.float()
    return -(p * p.clamp_min(1e-20).log()).sum(-1)


@dataclass(frozen=True)
class CollapseConfig:
    """Settings of :class:`CollapseTracker`."""

    window: int = 100
    """Steps the metrics cover; an expert is *dead* if it got no token in all of them."""

    def __post_init__(self) -> None:
        _check_int("window", self.window, 1)


def collapse_metrics(stats: MoEStats, steps: int = 1) -> dict[str, Any]:
    """The collapse metrics of one (possibly accumulated) ``MoEStats``; host values."""
    routed = stats.routed_E.to(torch.float64).cpu()
    num_experts = routed.numel()
    tokens = float(stats.num_tokens)
    total = float(routed.sum())
    entropy = float(stats.entropy_sum) / tokens if tokens else 0.0
    dead = [e for e, n in enumerate(routed.tolist()) if n == 0]
    return {
        "routing_entropy": entropy,
        "routing_entropy_norm": entropy / math.log(num_experts) if num_experts > 1 else 0.0,
        "dead_experts": len(dead),
        "dead_expert_ids": dead,
        "max_expert_share": float(routed.max()) / total if total else 0.0,
        "router_confidence": float(stats.max_prob_sum) / tokens if tokens else 0.0,
        "window_steps": steps,
    }


class CollapseTracker:
    """Sliding-window collapse metrics for every MoE layer of a model.

    Feed it the per-step stats dict (``{layer name: MoEStats}``, e.g. the trainer's
    ``StepResult.stats``) with :meth:`update`; :meth:`summary` returns
    ``{layer name: {metric: value}}`` over the last ``config.window`` steps, and
    :meth:`scalars` the same flattened to ``{"collapse/<layer>/<metric>": float}`` for
    TensorBoard. Every rank may keep one (it is cheap); only the logging rank needs to.
    """

    def __init__(self, config: CollapseConfig = CollapseConfig()) -> None:
        if not isinstance(config, CollapseConfig):
            raise TypeError(f"config must be a CollapseConfig, got {type(config).__name__}")
        self.config = config
        self._steps: dict[str, deque] = {}

    def update(self, stats: Mapping[str, MoEStats]) -> None:
        """Record one step. Keeps detached device tensors; no host sync."""
        for name, s in stats.items():
            if not isinstance(s, MoEStats):
                raise TypeError(f"stats[{name!r}] must be an MoEStats, got {type(s).__name__}")
            window = self._steps.setdefault(name, deque(maxlen=self.config.window))
            window.append(s)

    def reset(self) -> None:
        self._steps.clear()

    def summary(self) -> dict[str, dict[str, Any]]:
        """Metrics per layer over the window (synchronises with the device)."""
        return {name: collapse_metrics(MoEStats.accumulate(list(w)), steps=len(w))
                for name, w in self._steps.items() if w}

    def scalars(self) -> dict[str, float]:
        """``{"collapse/<layer>/<metric>": value}`` for the numeric metrics."""
        return {f"collapse/{layer}/{key}": float(m[key])
                for layer, m in self.summary().items() for key in METRIC_NAMES}

