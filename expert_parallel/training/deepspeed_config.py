"""The DeepSpeed JSON of a ``--deepspeed CONFIG`` run: read, validated, filled from TrainConfig.

Pure functions (no DeepSpeed import, no collective), so the launcher checks the file on
every rank before the rendezvous and every rank raises the same ``ValueError``, naming
the field and its value. Why each refused setting is refused is said where it is checked;
``deepspeed_engine.py`` explains the gradient-scale argument behind the ZeRO flags.
"""

from __future__ import annotations

from typing import Any

from .config import TrainConfig
from .jsonio import read_json_object

SUPPORTED_STAGES = (1, 2)


def _get(section: dict, key: str, default: Any) -> Any:
    value = section.get(key, default)
    return default if value is None else value


def load_ds_config(path: str, cfg: TrainConfig, world_size: int) -> dict:
    """Read and validate the DeepSpeed JSON at ``path`` for this run; fill what it omits.

    Filled from ``cfg``: ``train_batch_size`` (= global_batch_size),
    ``train_micro_batch_size_per_gpu`` (= global_batch_size / W),
    ``gradient_accumulation_steps`` (= 1) and ``gradient_clipping`` (= grad_clip). Values
    present in the JSON must agree with ``cfg`` for the batch sizes; clipping, precision,
    optimizer and scheduler sections are taken as given. Pure: raises ``ValueError``
    naming the field and value on every rank, before any collective.
    """
    ds = read_json_object(path, "deepspeed: config")
    if world_size < 1 or cfg.global_batch_size % world_size:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} must divide by the world size {world_size}")
    micro = cfg.global_batch_size // world_size
    for key, want in (("train_batch_size", cfg.global_batch_size),
                      ("train_micro_batch_size_per_gpu", micro),
                      ("gradient_accumulation_steps", 1)):
        got = ds.get(key, want)
        if got != want:
            # One optimizer step per global batch, as on the plain path; gradient
            # accumulation is not implemented by this trainer.
            raise ValueError(f"deepspeed {path!r}: {key}={got!r} must be {want} "
                             f"(global_batch_size={cfg.global_batch_size}, world size {world_size})")
        ds[key] = want
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        raise ValueError(f"deepspeed {path!r}: zero_optimization must be an object with a stage, got {zero!r}")
    stage = zero.get("stage")
    if stage not in SUPPORTED_STAGES:
        raise ValueError(f"deepspeed {path!r}: zero_optimization.stage={stage!r} is not supported; "
                         f"use one of {SUPPORTED_STAGES} (ZeRO-3 would partition the expert weights "
                         "our MoE layers read directly)")
    for key in ("contiguous_gradients", "reduce_scatter", "load_from_fp32_weights"):
        if _get(zero, key, True) is not True:
            # contiguous_gradients/reduce_scatter: the only ZeRO reduction path whose expert
            # gradient scale is 1/W (module docstring). load_from_fp32_weights: expert
            # weights are restored from each rank's own fp32 ZeRO shard (docs/DEEPSPEED.md).
            raise ValueError(f"deepspeed {path!r}: zero_optimization.{key}={zero[key]!r} must be true "
                             "for expert-parallel training")
    if _get(zero, "elastic_checkpoint", False) is not False:
        raise ValueError(f"deepspeed {path!r}: zero_optimization.elastic_checkpoint="
                         f"{zero['elastic_checkpoint']!r} must be false: elastic merging mixes the "
                         "optimizer shards of different experts")
    if _get(zero, "offload_optimizer", {}) or _get(zero, "offload_param", {}):
        raise ValueError(f"deepspeed {path!r}: zero_optimization offload sections are not supported here")
    if _get(ds.get("fp16", {}), "enabled", False):
        raise ValueError(f"deepspeed {path!r}: fp16.enabled=true is not supported (dynamic loss "
                         "scaling would skip steps behind the trainer's back); use bf16 or fp32")
    if ds.get("use_data_before_expert_parallelism", False):
        raise ValueError(f"deepspeed {path!r}: use_data_before_expert_parallelism="
                         f"{ds['use_data_before_expert_parallelism']!r} must be false: our EP groups are "
                         "consecutive ranks and EDP groups strided (distributed/groups.py)")
    clip = ds.setdefault("gradient_clipping", cfg.grad_clip)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ValueError(f"deepspeed {path!r}: gradient_clipping={clip!r} must be a number >= 0")
    opt = ds.get("optimizer")
    if opt is not None and not (isinstance(opt, dict) and isinstance(opt.get("type"), str)):
        raise ValueError(f"deepspeed {path!r}: optimizer={opt!r} must be an object with a 'type'")
    if ds.get("scheduler") is not None and not isinstance(ds["scheduler"], dict):
        raise ValueError(f"deepspeed {path!r}: scheduler={ds['scheduler']!r} must be an object")
    if cfg.moe.nonfinite_policy != "raise":
        raise ValueError(f"nonfinite_policy={cfg.moe.nonfinite_policy!r} is not supported with --deepspeed "
                         "(skipping a step after ZeRO has reduced its gradients is not exposed by "
                         "the engine); use 'raise'")
    return ds


def bf16_enabled(ds: dict) -> bool:
    return bool(_get(ds.get("bf16", {}), "enabled", False))


__all__ = ["load_ds_config", "bf16_enabled", "SUPPORTED_STAGES"]
