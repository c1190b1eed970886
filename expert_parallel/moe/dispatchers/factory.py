"""``make_dispatcher``: the one place that maps a validated config onto a sibling.

``MoEConfig.__post_init__`` has already refused the combinations no sibling supports
(static shapes with overlap, with the hierarchical exchange, or with
``nonfinite_policy='raise'``), so the choice below never silently drops an option:

=====================  ==========================  =====================================
static_shapes          ``PaddedDispatcher``        any EP size (EP=1: no exchange)
EP = 1                 ``LocalDispatcher``         no exchange; ``a2a_algorithm`` has no
                                                   all-to-all to shape (``describe()``
                                                   says ``local``)
flat                   ``AllToAllDispatcher``
hierarchical           ``HierarchicalDispatcher``  needs ``ParallelGroups`` built with
                                                   ``ranks_per_node``; an EP group inside
                                                   one node runs the flat exchange and
                                                   says so in ``describe()``
allgather              ``AllGatherDispatcher``     padded all-gather / reduce-scatter of
                                                   up to ``allgather_max_tokens`` tokens
                                                   per rank (flat beyond)
auto                   ``AutoDispatcher``          allgather or flat, from the previous
                                                   forward's token count (all ranks agree)
overlap_chunks > 1     ``OverlappedDispatcher``    wraps local / flat / hierarchical
=====================  ==========================  =====================================
"""

from __future__ import annotations

from typing import Any, Optional

from ...config import MoEConfig
from .all_to_all import AllToAllDispatcher
from .allgather import AllGatherDispatcher, AutoDispatcher
from .base import Dispatcher
from .hierarchical import HierarchicalDispatcher
from .local import LocalDispatcher
from .overlapped import OverlappedDispatcher
from .padded import PaddedDispatcher


def make_dispatcher(config: MoEConfig, groups: Any, num_slots: Optional[int] = None) -> Dispatcher:
    """The dispatcher a layer with ``config`` needs on ``groups``. It moves pairs to
    ``num_slots`` physical expert slots (default: one per expert); with a placement
    table (``moe/placement.py``) the layer hands it slot ids instead of expert ids."""
    E, raise_nf = num_slots or config.num_experts, config.nonfinite_policy == "raise"
    if config.static_shapes:
        return PaddedDispatcher(E, groups.ep_group, groups.ep_size)
    if groups.ep_size == 1:
        inner: Any = LocalDispatcher(E, raise_on_nonfinite=raise_nf)
    elif config.a2a_algorithm == "hierarchical":
        if not groups.ranks_per_node:
            raise ValueError(
                "a2a_algorithm='hierarchical' needs ParallelGroups.build(..., ranks_per_node=L) "
                f"(the launcher: --ranks-per-node, default the ranks per node); got "
                f"ranks_per_node={groups.ranks_per_node} with ep_size={groups.ep_size}")
        if groups.num_nodes == 1:
            inner = AllToAllDispatcher(E, groups.ep_group, groups.ep_size, raise_nf,
                                       name="all_to_all (hierarchical: EP group inside one node)")
        else:
            inner = HierarchicalDispatcher(E, groups, raise_on_nonfinite=raise_nf)
    elif config.a2a_algorithm in ("allgather", "auto"):
        flat = AllToAllDispatcher(E, groups.ep_group, groups.ep_size, raise_nf)
        cls = AllGatherDispatcher if config.a2a_algorithm == "allgather" else AutoDispatcher
        return cls(flat, config.allgather_max_tokens, raise_nf)
    else:
        inner = AllToAllDispatcher(E, groups.ep_group, groups.ep_size, raise_nf)
    if config.overlap_chunks > 1:
        return OverlappedDispatcher(inner, config.overlap_chunks)
    return inner


__all__ = ["make_dispatcher"]
