"""``MoELayer``: route -> capacity -> (placement) -> run (dispatch -> experts -> combine) -> stats.

Legend: T tokens, D model dim, E experts, K choices.

The layer holds a replicated router and this rank's ``E / ep_size`` experts. Its
forward reads as the calls of the data path; the dispatcher (``moe/dispatchers/``)
runs dispatch -> experts -> combine behind one ``run`` call, pipelined or not. Every
forward also returns the aux loss and an :class:`MoEStats` with exact per-expert
routed / kept / dropped counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..config import MoEConfig
from ..distributed.collectives import all_gather_rows, comm_scope
from ..distributed.consensus import check_consensus
from ..distributed.groups import ParallelGroups
from ..profiling.timer import NULL_TIMER
from .capacity import plan_capacity
from .dispatchers import NonFiniteRouterError, make_dispatcher
from .balance import GlobalLoad
from .experts import GroupedExperts
from .permute import count_ids
from .placement import PlacementTable, slots_for_pairs
from .planner import plan_placement
from .rebalance import move_slots, sync_replica_grads
from .router import Router
from .shared import SharedExperts
from .stats import MoEStats, routing_summary

EXPERT_PARAM_NAMES = ("w1_eDF", "w2_eFD", "w3_eDF", "b1_eF", "b3_eF", "b2_eD")
"""Stacked per-expert parameters of ``GroupedExperts`` (the biases with ``expert_proj_bias``)."""


@dataclass(frozen=True)
class MoEOutput:
    output: torch.Tensor
    """Same shape and dtype as the input."""
    aux_loss: torch.Tensor
    """Scalar fp32: ``aux_loss_coeff * lb_loss + z_loss_coeff * z_loss``."""
    stats: MoEStats
    """Routing statistics of this rank's tokens."""


class MoELayer(nn.Module):
    """An expert-parallel mixture-of-experts feed-forward block.

    Args:
        config: the layer's :class:`MoEConfig`.
        groups: explicit process groups; ``None`` means a single process (EP=1).
        seed: initial weights depend only on ``seed`` and the global expert id.
        name: used in error messages (e.g. ``"layers.3.moe"``).
    """

    def __init__(
        self,
        config: MoEConfig,
        groups: Optional[ParallelGroups] = None,
        seed: int = 0,
        name: str = "moe",
    ) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be an MoEConfig, got {type(config).__name__}")
        self.config = config
        self.groups = groups if groups is not None else ParallelGroups.single()
        self.name = name
        self.timer: Any = NULL_TIMER
        self.forward_calls = 0
        # Build locally first, but hold any error back: a rank that raised here while its
        # peers entered the consensus collective would leave them waiting. The error
        # travels in the payload instead, so every rank raises it (or the mismatch).
        setup_error: Optional[Exception] = None
        shapes: dict[str, list[int]] = {}
        try:
            self.placement = initial_placement(config, self.groups)
            self.router = Router(config, seed=seed)
            # This rank's slots; replicas of one expert start identical (seeded by its id).
            self.experts = GroupedExperts(config, self.placement.local_experts(self.groups.ep_rank), seed=seed)
            # Replicated like the other dense parameters (its grads average over DP).
            self.shared = SharedExperts(config, seed=seed) if config.num_shared_experts else None
            self.dispatcher = make_dispatcher(config, self.groups, num_slots=config.num_slots)
            self.global_load = (GlobalLoad(self.groups.dp_group, self.groups.world_size)
                                if config.aux_loss_scope == "global_batch" else None)
            shapes = {n: list(t.shape) for n, t in [*self.named_parameters(), *self.named_buffers()]}
        except (ValueError, TypeError) as err:
            setup_error = err
        # Every rank of the EP group must agree before the first all-to-all; a mismatch
        # raises the same ValueError on all of them instead of hanging in the exchange.
        check_consensus(
            f"MoE layer {name!r}",
            {**config.to_dict(), "ep_size": self.groups.ep_size, "param_shapes": shapes,
             "placement": getattr(getattr(self, "placement", None), "fingerprint", lambda: None)(),
             "setup_error": None if setup_error is None else repr(setup_error)},
            self.groups.ep_group,
            list(self.groups.ep_ranks),
        )
        if setup_error is not None:
            raise setup_error

    def set_timer(self, timer: Any) -> None:
        """Attach a phase timer (``NULL_TIMER`` to detach)."""
        self.timer = timer
        self.dispatcher.timer = timer

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"{self.name}: input last dim must be hidden_size={self.config.hidden_size}, "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: input dtype must be floating point, got {x.dtype}")
        if self.config.aux_loss_scope == "sequence" and x.dim() != 3:
            raise ValueError(
                f"{self.name}: aux_loss_scope='sequence' needs a [batch, seq, hidden] input to "
                f"know its sequences, got shape {tuple(x.shape)}")
        weight = self.router.weight
        if x.device != weight.device:
            raise ValueError(
                f"{self.name}: input is on device {x.device} but the layer is on {weight.device}"
            )

    def forward(self, x: torch.Tensor) -> MoEOutput:
        self._check_input(x)
        self.forward_calls += 1
        timer = self.timer
        # Backward-time marks (identity; only with an enabled timer, see profiling/timer.py):
        # the input's gradient is complete when the whole layer backward is done ("router"),
        # and the output's gradient arriving starts it ("begin", below).
        x_TD = timer.mark(x.reshape(-1, self.config.hidden_size), "router")
        with timer.phase("router"):
            routing, capacity, plan = self._route(x_TD, x.shape[0] if x.dim() == 3 else 1)
        slots = self._slots(routing, plan)
        out_TD = self._run(x_TD, slots, plan)
        with timer.phase("stats"):
            stats = self._stats(plan, routing, capacity, x_TD.shape[0], slots)
        out_TD = timer.mark(out_TD.to(x.dtype), "begin")
        return MoEOutput(output=out_TD.view(x.shape), aux_loss=routing.aux_loss, stats=stats)

    def _route(self, x_TD: torch.Tensor, num_sequences: int):
        """Router (scores, choices, losses) and the per-expert capacity decision."""
        cfg = self.config
        routing = self.router(x_TD, num_sequences=num_sequences, global_load=self.global_load)
        capacity = cfg.capacity(x_TD.shape[0], self.training)
        plan = plan_capacity(routing.topk_idx_TK, routing.topk_weight_TK, cfg.num_experts,
                             capacity, cfg.drop_policy, valid_TK=routing.valid_TK)
        return routing, capacity, plan

    def _slots(self, routing, plan):
        """The routing in physical slot ids (identity table: unchanged). Capacity was
        decided per logical expert; here each kept pair picks one replica."""
        if self.placement.is_identity:
            return routing
        with self.timer.phase("permute"):
            return dataclasses.replace(routing, topk_idx_TK=slots_for_pairs(
                routing.topk_idx_TK, plan.kept_TK, *self._placement_tensors(routing.topk_idx_TK.device)))

    def _run(self, x_TD: torch.Tensor, slots, plan) -> torch.Tensor:
        """dispatch -> experts -> combine (one dispatcher call) of the pairs routed to
        ``slots``, plus the shared expert, computed while the dispatch exchange is in
        flight when ``shared_expert_overlap``."""
        # Under autocast the experts compute in the autocast dtype anyway: cast the rows
        # before the exchange, so the all-to-all moves bf16 (half the bytes), not fp32.
        rows_TD = x_TD
        if torch.is_autocast_enabled(x_TD.device.type):
            rows_TD = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        shared: dict[str, torch.Tensor] = {}

        overlap = self.shared is not None and self.config.shared_expert_overlap

        def shared_expert(mark: bool = True) -> None:
            # ``mark``: its backward-time mark (profiling/timer.py); the dispatcher says no
            # inside a multi-chunk pipeline, whose backward carries no marks.
            with self.timer.phase("shared_expert"):
                shared["y"] = self.shared(self.timer.mark(rows_TD, "shared_expert") if mark else rows_TD)
        # Collectives issued inside are labelled with this layer's name (error messages).
        with comm_scope(f"MoE layer {self.name!r}", direction="forward"):
            try:
                out_TD = self.dispatcher.run(rows_TD, slots, plan, self.experts,
                                             concurrent=shared_expert if overlap else None)
            except NonFiniteRouterError as err:
                raise NonFiniteRouterError(
                    f"{self.name} (forward call {self.forward_calls}): {err}") from None
        if self.shared is None:
            return out_TD
        if not overlap:
            shared_expert()
        return out_TD + shared["y"]

    def _stats(self, plan, routing, capacity, num_tokens, routing_slots) -> MoEStats:
        device = plan.routed_E.device
        if capacity is None:
            capacity_E = plan.routed_E.clone()
        else:
            capacity_E = torch.full_like(plan.routed_E, capacity)
        all_dropped = (plan.kept_TK.sum(-1) == 0).sum() if num_tokens else plan.routed_E.new_zeros(())

        def scalar(v: int) -> torch.Tensor:  # a fill on the device: no host-to-device copy
            return torch.full((), v, dtype=torch.int64, device=device)

        return MoEStats(
            routed_E=plan.routed_E,
            kept_E=plan.kept_E,
            dropped_E=plan.routed_E - plan.kept_E,
            capacity_E=capacity_E,
            num_tokens=scalar(num_tokens),
            tokens_all_dropped=all_dropped.to(torch.int64),
            nonfinite=routing.nonfinite.to(torch.int64),
            lb_loss=routing.lb_loss.to(torch.float32),
            z_loss=routing.z_loss.to(torch.float32),
            num_ranks=scalar(1),
            kept_slots_P=count_ids(torch.where(plan.kept_TK, routing_slots.topk_idx_TK, P),
                                   P + 1)[:P] if (P := self.config.num_slots) else plan.kept_E,
            **routing_summary(routing),
        )

    # -- placement ---------------------------------------------------------------------
    def _placement_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = getattr(self, "_placement_cache", None)
        if cache is None or cache[0] != (self.placement, device):
            cache = ((self.placement, device), self.placement.tensors(device))
            self._placement_cache = cache
        return cache[1]

    def check_placement(self, table: PlacementTable) -> None:
        """Raise ``ValueError`` unless ``table`` fits this layer (pure, no collective)."""
        if not isinstance(table, PlacementTable):
            raise TypeError(f"{self.name}: placement must be a PlacementTable, got {type(table).__name__}")
        want = (self.config.num_experts, self.groups.ep_size, self.config.num_slots)
        if (table.num_experts, table.ep_size, table.num_slots) != want:
            raise ValueError(f"{self.name}: placement has num_experts={table.num_experts}, ep_size="
                             f"{table.ep_size}, {table.num_slots} slots; this layer needs {want[0]}, "
                             f"{want[1]}, {want[2]} slots")

    def set_placement(self, table: PlacementTable, state: Sequence[torch.Tensor] = ()) -> None:
        """Re-place the experts (collective over the EP group): move every expert weight,
        and the stacked per-slot ``state`` tensors (e.g. their AdamW moments), to the slots
        of ``table``. Every rank must pass the same table: a disagreement raises the same
        ``ValueError`` on all of them, before anything moves."""
        self.check_placement(table)
        check_consensus(f"MoE layer {self.name!r} placement", {"placement": table.to_json()},
                        self.groups.ep_group, list(self.groups.ep_ranks))
        if table == self.placement:
            return
        tensors = [p.data for p in self.experts.parameters()] + list(state)
        with comm_scope(f"MoE layer {self.name!r}", direction="forward"):
            move_slots(tensors, self.placement, table, self.groups.ep_rank, self.groups.ep_group)
        self.placement = table
        self.experts.expert_ids = table.local_experts(self.groups.ep_rank)

    def sync_replica_grads(self) -> None:
        """Sum each replicated expert's gradient over its replicas (collective over the EP
        group; after the expert-data-parallel reduction). No-op without replicas."""
        grads = [p.grad for p in self.experts.parameters() if p.grad is not None]
        with comm_scope(f"MoE layer {self.name!r}", direction="backward"):
            sync_replica_grads(grads, self.placement, self.groups.ep_rank, self.groups.ep_group)

    def slot_norm_weights(self) -> torch.Tensor:
        """``1 / replicas`` of each local slot's expert: weights that count every logical
        expert once in a global gradient norm summed over the EP group."""
        n = self.placement.replica_counts()
        return torch.tensor([1.0 / n[e] for e in self.experts.expert_ids], dtype=torch.float64)

    def start_global_batch(self) -> None:
        """``aux_loss_scope='global_batch'``: the following forwards (the micro-batches of
        one optimizer step) accumulate their load until the next call. No-op otherwise."""
        if self.global_load is not None:
            self.global_load.start()

    def set_capacity_factor(self, factor: Optional[float]) -> None:
        """Change the training capacity factor (e.g. from a ``CapacityTuner``). Every rank
        of the EP group must set the same value: capacity is part of the split math."""
        self.config = self.config.replace(capacity_factor=factor)

    @torch.no_grad()
    def update_expert_bias(self, global_stats: MoEStats) -> None:
        """Aux-loss-free balancing: nudge the selection bias from the observed load.

        Pass stats reduced over the data-parallel group so every replica applies the
        same update (the router is replicated).
        """
        self.router.update_bias(global_stats.routed_E)

    # -- resharding ---------------------------------------------------------------
    def expert_param_names(self) -> list[str]:
        return [n for n in EXPERT_PARAM_NAMES if getattr(self.experts, n) is not None]

    @torch.no_grad()
    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded parameters on every rank (all-gather over the EP group).

        Keys: ``router.weight`` [E, D], ``router.expert_bias`` [E] (plus
        ``router.noise_weight`` [E, D] for ``noisy_topk``), ``shared.*`` (the shared
        experts, replicated), and
        ``experts.<name>`` stacked over all E experts in global expert order.
        """
        sd = {f"router.{k}": v.detach().clone() for k, v in self.router.state_dict().items()}
        if self.shared is not None:
            sd.update({f"shared.{k}": v.detach().clone() for k, v in self.shared.state_dict().items()})
        first = [self.placement.replicas(e)[0] for e in range(self.config.num_experts)]
        for name in self.expert_param_names():
            local = getattr(self.experts, name).detach()
            slots = torch.cat(all_gather_rows(local, self.groups.ep_group), 0)  # [P, ...] slot order
            sd[f"experts.{name}"] = slots if self.placement.is_identity else slots[first]
        return sd

    @torch.no_grad()
    def load_global_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load full parameters (as from :meth:`global_state_dict`), keeping our shard."""
        router_sd = self.router.state_dict(keep_vars=True)
        shared_sd = self.shared.state_dict(keep_vars=True) if self.shared is not None else {}
        expected = {f"router.{k}" for k in router_sd} | {f"shared.{k}" for k in shared_sd}
        expected |= {f"experts.{n}" for n in self.expert_param_names()}
        if set(sd) != expected:
            raise ValueError(
                f"{self.name}: global state dict keys {sorted(sd)} != expected {sorted(expected)}"
            )
        ids = self.experts.expert_ids
        targets = {f"router.{k}": v for k, v in router_sd.items()}
        targets.update({f"shared.{k}": v for k, v in shared_sd.items()})
        for name in self.expert_param_names():
            targets[f"experts.{name}"] = getattr(self.experts, name)
        for key, dst in targets.items():
            src = sd[key]
            if key.startswith("experts."):
                full_shape = (self.config.num_experts,) + tuple(dst.shape[1:])
                if tuple(src.shape) != full_shape:
                    raise ValueError(
                        f"{self.name}: {key} has shape {tuple(src.shape)}, expected {full_shape}"
                    )
                src = src[torch.tensor(ids, dtype=torch.long)] if ids else src[:0]
            elif tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"{self.name}: {key} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(src.to(dst.dtype))


def initial_placement(config: MoEConfig, groups: ParallelGroups) -> PlacementTable:
    """Identity without redundant slots; else the planner's table for a uniform load."""
    R = groups.ep_size
    if config.num_redundant_experts == 0:
        return PlacementTable.identity(config.num_experts, R)
    if R == 1:
        raise ValueError(f"num_redundant_experts={config.num_redundant_experts} needs ep_size >= 2 "
                         "(replicas live on distinct ranks), got ep_size=1")
    return plan_placement([1.0] * config.num_experts, R, config.num_slots, groups.ranks_per_node,
                          config.num_groups)
