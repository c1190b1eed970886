"""Pick the training engine for a run: the only module that knows both engines.

``engine.py`` (plain) and ``deepspeed_engine.py`` do not import each other or the loop;
the loop (``trainer.py``) asks this factory. DeepSpeed itself is imported only when a run
uses it (it is an optional extra).
"""

from __future__ import annotations

import torch

from ..distributed.groups import ParallelGroups
from ..models.transformer import MoETransformer
from .config import TrainConfig
from .deepspeed_config import load_ds_config
from .deepspeed_engine import DeepSpeedEngine
from .engine import Engine, PlainEngine


def check_engine_config(cfg: TrainConfig, world_size: int) -> None:
    """Pure checks of the engine's own inputs (the DeepSpeed JSON), before any rendezvous."""
    if world_size < 1 or cfg.global_batch_size % world_size:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} must divide by the world size {world_size}")
    if cfg.deepspeed:
        load_ds_config(cfg.deepspeed, cfg, world_size)


def make_engine(cfg: TrainConfig, model: MoETransformer, groups: ParallelGroups,
                device: torch.device) -> Engine:
    if cfg.deepspeed:
        return DeepSpeedEngine(cfg, model, groups, device)
    return PlainEngine(cfg, model, groups, device)


__all__ = ["make_engine", "check_engine_config"]
