"""Process groups for expert + data parallelism, passed explicitly to every module.

Layout for a world of W = ep_size x edp_size ranks::

    EP groups  (experts sharded):     [0 .. ep-1], [ep .. 2ep-1], ...   consecutive runs,
                                      so an EP group stays inside a node by default
    EDP groups (expert replicas):     [j, j+ep, j+2ep, ...] for j in 0..ep-1, the ranks
                                      holding the same experts; expert grads average here
    DP group   (dense parameters):    all W ranks

Rank ``r`` holds the experts ``[ep_rank * e, (ep_rank + 1) * e)`` with
``e = num_experts / ep_size`` and ``ep_rank = r % ep_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch.distributed as dist


def ep_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """Global ranks of every EP group (consecutive runs of ``ep_size``)."""
    return [list(range(i, i + ep_size)) for i in range(0, world_size, ep_size)]


def edp_group_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """Global ranks of every expert-data-parallel group (same ``ep_rank``)."""
    return [list(range(j, world_size, ep_size)) for j in range(ep_size)]


def check_ep_size(ep_size: Any, world_size: int) -> None:
    if isinstance(ep_size, bool) or not isinstance(ep_size, int):
        raise TypeError(f"ep_size must be an int, got {ep_size!r}")
    if ep_size < 1:
        raise ValueError(f"ep_size must be >= 1, got {ep_size}")
    if world_size % ep_size != 0:
        raise ValueError(
            f"ep_size={ep_size} must divide the world size {world_size} "
            f"(world = ep_size x expert-data-parallel size)"
        )


def node_layout(ep_size: int, ranks_per_node: Any) -> int:
    """Ranks of one node inside an EP group of ``ep_size``, from the job's
    ``ranks_per_node`` (0 = no layout). An EP group of consecutive ranks either spans
    ``ep_size / L`` whole nodes (L divides ep_size) or lies inside one node (ep_size
    divides L, returns ep_size); anything else straddles nodes unevenly and is refused."""
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 0:
        raise TypeError(f"ranks_per_node must be an int >= 0, got {ranks_per_node!r}")
    if not ranks_per_node:
        return 0
    if ep_size % ranks_per_node == 0:
        return ranks_per_node
    if ranks_per_node % ep_size == 0:
        return ep_size
    raise ValueError(
        f"ranks_per_node={ranks_per_node} and ep_size={ep_size}: one must divide the other "
        "(an EP group spans whole nodes or lies inside one node)")


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups one MoE model uses; ``None`` groups mean a single process."""

    world_size: int
    rank: int
    ep_size: int
    ep_rank: int
    ep_group: Optional[Any]
    ep_ranks: tuple[int, ...]
    edp_size: int
    edp_rank: int
    edp_group: Optional[Any]
    edp_ranks: tuple[int, ...]
    dp_group: Optional[Any]
    ranks_per_node: int = 0
    """Ranks of one node inside the EP group, for the hierarchical all-to-all (0 = not
    given). Equal to ``ep_size`` when the whole EP group lives on one node."""
    intra_group: Optional[Any] = None
    """This rank's node-local slice of its EP group (hierarchical all-to-all only)."""
    inter_group: Optional[Any] = None
    """The ranks of this EP group with the same node-local index, one per node."""

    @staticmethod
    def single() -> "ParallelGroups":
        """EP=1 in one process: no process group at all."""
        return ParallelGroups(1, 0, 1, 0, None, (0,), 1, 0, None, (0,), None)

    @staticmethod
    def build(
        ep_size: int, timeout: Optional[timedelta] = None, ranks_per_node: int = 0
    ) -> "ParallelGroups":
        """Create EP, EDP and DP groups over the initialised default process group.

        Every rank must call this with the same ``ep_size`` (the launcher checks that by
        consensus first). With ``ep_size=1`` and no initialised process group, returns
        :meth:`single`. ``timeout`` bounds every collective on the new groups.
        ``ranks_per_node`` > 0 records the node layout (:func:`node_layout`) and, when an EP
        group spans several nodes, builds the node-local and cross-node sub-groups of
        each EP group that the hierarchical all-to-all uses.
        """
        if not dist.is_available() or not dist.is_initialized():
            check_ep_size(ep_size, 1)
            return ParallelGroups.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        check_ep_size(ep_size, world)
        ranks_per_node = node_layout(ep_size, ranks_per_node)  # pure: before any new_group
        kwargs = {} if timeout is None else {"timeout": timeout}
        # new_group is collective: every rank creates every group, in the same order.
        ep_group = edp_group = None
        ep_ranks = edp_ranks = ()
        for ranks in ep_group_ranks(world, ep_size):
            group = dist.new_group(ranks=ranks, **kwargs)
            if rank in ranks:
                ep_group, ep_ranks = group, tuple(ranks)
        for ranks in edp_group_ranks(world, ep_size):
            group = dist.new_group(ranks=ranks, **kwargs)
            if rank in ranks:
                edp_group, edp_ranks = group, tuple(ranks)
        dp_group = dist.new_group(ranks=list(range(world)), **kwargs)
        intra_group = inter_group = None
        if ranks_per_node and ranks_per_node < ep_size:
            for ep_ranks_i in ep_group_ranks(world, ep_size):
                for start in range(0, ep_size, ranks_per_node):
                    ranks = ep_ranks_i[start : start + ranks_per_node]
                    group = dist.new_group(ranks=ranks, **kwargs)
                    if rank in ranks:
                        intra_group = group
                for local in range(ranks_per_node):
                    ranks = ep_ranks_i[local::ranks_per_node]
                    group = dist.new_group(ranks=ranks, **kwargs)
                    if rank in ranks:
                        inter_group = group
        return ParallelGroups(
            world_size=world,
            rank=rank,
            ep_size=ep_size,
            ep_rank=ep_ranks.index(rank),
            ep_group=ep_group,
            ep_ranks=ep_ranks,
            edp_size=world // ep_size,
            edp_rank=edp_ranks.index(rank),
            edp_group=edp_group,
            edp_ranks=edp_ranks,
            dp_group=dp_group,
            ranks_per_node=ranks_per_node,
            intra_group=intra_group,
            inter_group=inter_group,
        )

    @property
    def num_nodes(self) -> int:
        """Nodes the EP group spans (1 without a node layout)."""
        return self.ep_size // self.ranks_per_node if self.ranks_per_node else 1

    @property
    def distributed(self) -> bool:
        return self.dp_group is not None

    def local_expert_range(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds."""
        if num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by ep_size={self.ep_size}"
            )
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: ep {self.ep_rank}/{self.ep_size} "
            f"{list(self.ep_ranks)}, edp {self.edp_rank}/{self.edp_size} {list(self.edp_ranks)}"
        )

