"""expert_parallel: a distributed expert-parallel Mixture-of-Experts runtime for PyTorch.

Public API::

    MoEConfig          configuration of one MoE layer (validated)
    ParallelGroups     explicit EP / expert-DP / DP process groups
    MoELayer           route -> dispatch -> experts -> combine
    MoEOutput, MoEStats
"""

from .config import MoEConfig
from .distributed.groups import ParallelGroups
from .moe.dispatchers import NonFiniteRouterError
from .moe.layer import MoELayer, MoEOutput
from .moe.stats import MoEStats

__version__ = "0.1.0"

__all__ = [
    "MoEConfig",
    "ParallelGroups",
    "MoELayer",
    "MoEOutput",
    "MoEStats",
    "NonFiniteRouterError",
    "__version__",
]
