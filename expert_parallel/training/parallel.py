"""Gradient synchronisation and clipping for expert + data parallelism.

Loss convention: each rank's loss is the mean over its own tokens, and the training
objective is the mean of those over all W ranks (equal-sized shards).

* Dense parameters are replicated on all W ranks: their gradient is all-reduced (sum)
  over the DP group and divided by W.
* An expert's gradient on its owner already sums the contributions of every rank of the
  owner's EP group (the backward all-to-all brought them home). Summing it over the
  expert-data-parallel group (the replicas of that expert) therefore covers all W ranks
  exactly once, so it is divided by W as well, not by the EDP size.
* The global gradient norm counts each dense parameter once and each expert once: the
  expert part is summed over one EP group (which holds every expert exactly once).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.groups import ParallelGroups
from ..moe.experts import GroupedExperts
from ..moe.layer import MoELayer


def _flat_all_reduce(grads: list[torch.Tensor], group, divide_by: int) -> None:
    """Sum ``grads`` over ``group`` with one collective, then divide."""
    if not grads:
        return
    if group is not None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
    if divide_by != 1:
        for g in grads:
            g.div_(divide_by)


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(dense, expert)`` parameters of ``model``, in ``model.parameters()`` order.

    Expert parameters are those owned by a :class:`GroupedExperts` module (this rank's
    shard of an MoE layer), whatever the module is called; everything else is dense
    (replicated on every rank)."""
    expert_ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts)
                  for p in m.parameters()}
    dense, expert = [], []
    for p in model.parameters():
        (expert if id(p) in expert_ids else dense).append(p)
    return dense, expert


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    out = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        out.append(p.grad)
    return out


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Average dense grads over DP and expert grads over EDP (see module docstring);
    then sum the replicas of each replicated expert over the EP group (placement tables
    with redundant slots, ``moe/rebalance.py``), so every replica steps identically."""
    dense, expert = split_params(model)
    world = groups.world_size
    _flat_all_reduce(_grads(dense), groups.dp_group, world)
    _flat_all_reduce(_grads(expert), groups.edp_group, world)
    for layer in moe_layers(model):
        layer.sync_replica_grads()


def _expert_sq(model: nn.Module, expert: list[nn.Parameter]) -> torch.Tensor:
    """Squared norm of this rank's expert gradients, each logical expert counted once
    over the EP group: a replica's slot weighs ``1 / replicas``."""
    weights = {}
    for layer in moe_layers(model):
        w = layer.slot_norm_weights()
        for p in layer.experts.parameters():
            weights[id(p)] = w
    total = torch.zeros((), dtype=torch.float64)  # 0-dim: adds to a tensor on any device
    for p in expert:
        if p.grad is None:
            continue
        sq = p.grad.double().square()
        w = weights.get(id(p))
        if w is None or p.dim() == 0:
            total = total + sq.sum()
        else:  # the weights are host-built: a non-blocking copy, no sync
            total = total + (sq.reshape(p.shape[0], -1).sum(1) * w.to(sq.device, non_blocking=True)).sum()
    return total


def clip_grad_norm(model: nn.Module, groups: ParallelGroups, max_norm: float) -> float:
    """Clip to the true global norm (each expert counted once). Returns the norm."""
    dense, expert = split_params(model)
    dense_sq = sum((p.grad.double().square().sum() for p in dense if p.grad is not None),
                   torch.zeros((), dtype=torch.float64))
    expert_sq = _expert_sq(model, expert)
    device = dense[0].device if dense else torch.device("cpu")
    expert_sq = expert_sq.to(device)
    if groups.ep_group is not None:
        dist.all_reduce(expert_sq, group=groups.ep_group)
    total = math.sqrt(float(dense_sq) + float(expert_sq))
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in dense + expert:
            if p.grad is not None:
                p.grad.mul_(scale)
    return total
