"""How our model and groups are presented to DeepSpeed, and how its files are read.

* :func:`register_expert_groups`: DeepSpeed's expert group registry is filled *from our*
  ``ParallelGroups`` (the same process-group objects), or checked against it when an
  entry already exists: a mismatch is a ``ValueError`` naming both rank lists.
* :func:`mark_expert_params` / :func:`optimizer_groups`: expert parameters are tagged
  the way DeepSpeed tags its own MoE parameters (``allreduce = False``,
  ``group_name = "ep_size_<EP>"``) and live in ``moe=True`` optimizer param groups.
* ``_moe_marker_class``: DeepSpeed only turns its MoE code on when the model contains a
  ``deepspeed.moe.layer.MoE``; a parameter-free subclass that skips ``MoE.__init__`` is
  attached for that (it owns no state, its forward is never called).
* :func:`expert_checksum`: an exact fingerprint of this rank's experts, for the replica
  check after every step.
* :func:`safe_torch_load` / :class:`SafeCheckpointEngine`: DeepSpeed 0.19 reads its
  checkpoint files with ``torch.load(weights_only=False)``, which runs whatever code a
  crafted file names. These read them with ``weights_only=True`` and the allow-list
  :data:`DS_SAFE_GLOBALS` of the plain types DeepSpeed stores there.

``deepspeed`` is an optional dependency, imported only inside the functions that need it.
"""

from __future__ import annotations

import importlib
import pickle
from typing import Any, Optional

import torch
from torch import nn

from ..checkpoint.safe_load import UnsafeCheckpointError
from ..distributed.groups import ParallelGroups
from .config import TrainConfig
from .parallel import split_params

EXPERT_GROUP_PREFIX = "ep_size_"


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of one EP size (``deepspeed.moe.layer.MoE``)."""
    return f"{EXPERT_GROUP_PREFIX}{ep_size}"


# ------------------------------------------------------------------- safe loading

DS_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
"""The plain (data-only) classes DeepSpeed 0.19's ZeRO-1/2 optimizer files pickle besides
tensors and builtins: a loss-scaler record (its attributes only), an enum and a small
dataclass. Found by loading real checkpoints with ``weights_only=True``
(``tests/integration/test_deepspeed.py`` keeps it honest). Everything else is refused."""


def _safe_globals() -> list:
    return [getattr(importlib.import_module(module), name) for module, name in DS_SAFE_GLOBALS]


def safe_torch_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a DeepSpeed checkpoint file, with
    :data:`DS_SAFE_GLOBALS` allowed; :class:`UnsafeCheckpointError` for anything else."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).strip().splitlines()
        raise UnsafeCheckpointError(f"{path}: refusing to load: it is not plain checkpoint data "
                                    f"({detail[-1] if detail else type(err).__name__})") from None


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with ``load`` reading through :func:`safe_torch_load`;
    everything else (save, commit, ...) is delegated to the engine it wraps."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location=map_location if map_location is not None else "cpu")


# ------------------------------------------------------------------- groups and params


def check_group_ranks(kind: str, name: str, registered: Optional[Any], ours: tuple[int, ...]) -> None:
    """Raise ``ValueError`` when DeepSpeed already has a group ``name`` with other ranks."""
    if registered is not None and list(registered) != list(ours):
        raise ValueError(
            f"DeepSpeed's {kind} group {name!r} holds ranks {list(registered)} on this rank, but "
            f"ParallelGroups has {list(ours)}; DeepSpeed's groups must be the project's "
            "(EP = consecutive ranks, EDP = strided; see distributed/groups.py)"
        )


def register_expert_groups(groups: ParallelGroups) -> str:
    """Put our EP and EDP groups into DeepSpeed's registry under ``ep_size_<EP>``.

    DeepSpeed would otherwise build its own copies (``_create_expert_and_data_parallel``)
    when an MoE layer asks; registering ours first makes ZeRO reduce expert gradients over
    exactly the process group our dispatcher and ``parallel.py`` use. An entry that
    already exists (another model in the process) must name the same ranks.
    """
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(groups.ep_size)
    check_group_ranks("expert-parallel", name, ds_groups._EXPERT_PARALLEL_GROUP_RANKS.get(name), groups.ep_ranks)
    check_group_ranks("expert-data-parallel", name, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS.get(name),
                      groups.edp_ranks)
    if name not in ds_groups._EXPERT_PARALLEL_GROUP:
        ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.ep_ranks)
    if name not in ds_groups._EXPERT_DATA_PARALLEL_GROUP:
        ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.edp_ranks)
    return name


def mark_expert_params(model: nn.Module, group_name: str) -> list[nn.Parameter]:
    """Tag expert parameters as DeepSpeed tags its own (``is_moe_param`` becomes true)."""
    _, expert = split_params(model)
    for p in expert:
        p.allreduce = False  # DeepSpeed: not all-reduced over the dense DP group
        p.group_name = group_name  # DeepSpeed: reduced / sharded over this EDP group
    return expert


def optimizer_groups(model: nn.Module, cfg: TrainConfig, with_decay: bool) -> list[dict]:
    """AdamW groups as on the plain path (decay on matrices only), split DeepSpeed's way
    into dense groups and ``moe=True`` expert groups named by their EDP group."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    decay = {"name": "decay", "params": [p for p in params if p.dim() >= 2]}
    if with_decay:
        decay["weight_decay"] = cfg.weight_decay
    no_decay = {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}
    groups = [g for g in (decay, no_decay) if g["params"]]
    # max_group_size=None: one group per (decay, EDP group), never split by size, so the
    # group layout (and hence the ZeRO checkpoint) does not depend on parameter counts.
    return split_params_into_different_moe_groups_for_optimizer(groups, max_group_size=None)


def _moe_marker_class() -> type:
    from deepspeed.moe.layer import MoE

    class _MoEMarker(MoE):
        """Parameter-free stand-in that makes DeepSpeed enable its MoE code paths."""

        def __init__(self, num_experts: int, groups: ParallelGroups, group_name: str) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: that builds DeepSpeed's own gate + experts
            self.num_experts = num_experts
            self.ep_size = groups.ep_size
            self.expert_group_name = group_name
            # 0: DeepSpeed's per-expert files stay empty; our expert weights are restored
            # from the ZeRO fp32 shards (see DeepSpeedEngine.load).
            self.num_local_experts = 0
            self._groups = groups

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            # Called by the engine on every module that has it; DeepSpeed's MoE would create
            # its groups here. Ours are registered already: re-check instead.
            if use_data_before_expert_parallel_:
                raise ValueError("use_data_before_expert_parallelism=true does not match ParallelGroups")
            register_expert_groups(self._groups)

        def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
            raise RuntimeError("the DeepSpeed MoE marker has no forward")

    return _MoEMarker


_CHECKSUM_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def expert_checksum(model: nn.Module) -> int:
    """Exact fingerprint of this rank's expert weights: a position-weighted sum of their
    raw bits read as int32 words (int16 for an odd number of 2-byte elements)."""
    _, expert = split_params(model)
    words = []
    for p in expert:
        flat = p.detach().reshape(-1).contiguous()  # on its device: no host copy of the weights
        nbytes = flat.numel() * flat.element_size()
        words.append(flat.view(torch.int32 if nbytes % 4 == 0 else torch.int16).long())
    if not words:
        return 0
    raw = torch.cat(words)
    key = (raw.numel(), str(raw.device))
    weights = _CHECKSUM_WEIGHTS.get(key)
    if weights is None:  # cached: the expert shapes never change during a run
        weights = _CHECKSUM_WEIGHTS[key] = torch.arange(raw.numel(), dtype=torch.int64,
                                                        device=raw.device) % 65521 + 1
    # int64 arithmetic wraps identically everywhere; one scalar leaves the device.
    return int((raw * weights).sum())


__all__ = ["expert_group_name", "check_group_ranks", "register_expert_groups", "mark_expert_params",
           "optimizer_groups", "expert_checksum", "safe_torch_load", "SafeCheckpointEngine",
           "DS_SAFE_GLOBALS"]
