"""``ParallelConfig``: how the ranks of a job form expert-parallel groups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .checks import _check_int


def largest_local_ep(num_experts: int, ranks_per_node: int, world_size: int) -> int:
    """The largest EP size that divides ``num_experts``, ``ranks_per_node`` and
    ``world_size``: experts sharded as widely as possible while every EP group stays
    inside one node (the all-to-all then never crosses the slow link)."""
    best = 1
    for d in range(1, min(num_experts, ranks_per_node) + 1):
        if num_experts % d == 0 and ranks_per_node % d == 0 and world_size % d == 0:
            best = d
    return best


@dataclass(frozen=True)
class ParallelConfig:
    """How the ranks of a job are split into expert-parallel groups."""

    ep_size: Any = "auto"
    """Expert-parallel size: an int that divides the world size and ``num_experts``, or
    ``auto``: the largest divisor of ``num_experts`` that divides the ranks per node, so
    EP stays inside a node (8 ranks per node, 8 experts -> EP=8)."""

    ranks_per_node: Optional[int] = None
    """Ranks per node, for ``ep_size=auto`` and the hierarchical all-to-all. ``None``:
    taken from the launcher (torchrun ``LOCAL_WORLD_SIZE``, SLURM tasks per node, Open
    MPI ``OMPI_COMM_WORLD_LOCAL_SIZE``)."""

    def __post_init__(self) -> None:
        if self.ep_size != "auto":
            if isinstance(self.ep_size, str) and self.ep_size.strip().isdigit():
                object.__setattr__(self, "ep_size", int(self.ep_size))
            elif isinstance(self.ep_size, str):
                raise ValueError(f"ep_size must be a positive int or 'auto', got {self.ep_size!r}")
            _check_int("ep_size", self.ep_size, 1)
        if self.ranks_per_node is not None:
            _check_int("ranks_per_node", self.ranks_per_node, 1)

    def resolve(self, num_experts: int, world_size: int, local_world_size: int) -> tuple[int, int]:
        """``(ep_size, ranks_per_node)`` for a job of ``world_size`` ranks with
        ``local_world_size`` on this node. Pure: the same on every rank."""
        per_node = self.ranks_per_node if self.ranks_per_node is not None else local_world_size
        _check_int("ranks_per_node", per_node, 1)
        if world_size % per_node:
            raise ValueError(
                f"ranks_per_node={per_node} must divide the world size {world_size}"
            )
        if self.ep_size == "auto":
            ep = largest_local_ep(num_experts, per_node, world_size)
        else:
            ep = self.ep_size
            if world_size % ep:
                raise ValueError(f"ep_size={ep} must divide the world size {world_size}")
            if num_experts % ep:
                raise ValueError(f"ep_size={ep} must divide num_experts={num_experts}")
        return ep, per_node


__all__ = ["ParallelConfig", "largest_local_ep"]
