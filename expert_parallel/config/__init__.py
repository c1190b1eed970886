"""Configuration dataclasses: one validated config per component.

``MoEConfig`` (``moe.py``): one MoE layer. ``ParallelConfig`` (``parallel.py``): the
expert-parallel layout of a job. ``checks.py``: the field checks they share.
"""

from .checks import _check_choice, _check_float, _check_int
from .moe import (
    A2A_ALGORITHMS,
    ACTIVATIONS,
    AUX_LOSS_SCOPES,
    DROP_POLICIES,
    EXPERT_BACKENDS,
    GROUP_ROUTERS,
    ROUTER_DTYPES,
    ROUTERS,
    MoEConfig,
)
from .parallel import ParallelConfig, largest_local_ep

__all__ = ["MoEConfig", "ParallelConfig", "largest_local_ep", "ROUTERS", "GROUP_ROUTERS",
           "DROP_POLICIES", "ACTIVATIONS", "EXPERT_BACKENDS", "AUX_LOSS_SCOPES", "ROUTER_DTYPES",
           "A2A_ALGORITHMS", "_check_choice", "_check_float", "_check_int"]
