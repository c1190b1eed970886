"""Load a launcher checkpoint for inference, at any EP size.

A launcher run (``launch/train.py --out DIR``) leaves ``DIR/config.json`` (its
``TrainConfig``) and ``DIR/checkpoints/step_N/`` (DCP with one key per *logical* expert,
``checkpoint/state.py``). :func:`resolve_checkpoint` accepts either the run directory
(its newest checkpoint that verifies) or one ``step_N`` directory in it;
:func:`build_model` rebuilds the transformer for the current process groups, so each
rank holds its ``E / ep_size`` experts exactly as training shards them, and
:func:`load_weights` asks DCP for this rank's keys only (collective). Optimizer state in
the checkpoint is never read.

Every refusal is a :class:`CheckpointNotFoundError` (a ``ValueError``) naming the path and
what is missing; all of it is decided from the file system before any collective, so
every rank refuses alike.

Inference overrides (:func:`inference_moe`): the layers run dropless
(``eval_capacity_factor=None``) unless the dispatch mode needs a capacity (static
shapes), and the dispatch options (``a2a_algorithm``, ``static_shapes``,
``allgather_max_tokens``, ``expert_backend``) may differ from training's: they change how
tokens move, never what the layer computes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import torch

from ..checkpoint.manager import MANIFEST, find_latest, load_checkpoint, read_manifest, step_of, verify
from ..checkpoint.state import model_state
from ..config import MoEConfig
from ..distributed.groups import ParallelGroups
from ..models.transformer import ModelConfig, MoETransformer
from ..training.config import TrainConfig
from ..training.options import build_config, config_values

INFERENCE_MOE_FIELDS = ("a2a_algorithm", "static_shapes", "allgather_max_tokens", "expert_backend",
                        "eval_capacity_factor", "nonfinite_policy", "overlap_chunks")
"""``MoEConfig`` fields inference may set differently from training (dispatch only)."""


class CheckpointNotFoundError(ValueError):
    """``--checkpoint`` names no loadable launcher checkpoint (the message says why)."""


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    run_dir: str
    checkpoint: str
    """The ``step_N`` directory that will be loaded."""
    step: int
    manifest: dict
    config: TrainConfig


def _read_config(run_dir: str, checkpoint: str) -> TrainConfig:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(
            f"--checkpoint {checkpoint}: no config.json in the run directory {run_dir} (the launcher "
            "writes it next to checkpoints/; the model's shape is read from it)")
    try:
        with open(path) as fh:
            saved = json.load(fh)
        return build_config(config_values(saved, f"{path}"))
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as err:
        raise CheckpointNotFoundError(f"--checkpoint {checkpoint}: unreadable run config {path}: {err}") from None


def resolve_checkpoint(path: str) -> RunCheckpoint:
    """The checkpoint ``path`` names: a launcher ``--out`` directory (its newest verified
    checkpoint) or one ``step_N`` checkpoint in it. Reads files only (no collective)."""
    if not isinstance(path, str) or not path:
        raise CheckpointNotFoundError(f"--checkpoint must name a directory, got {path!r}")
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"--checkpoint {path} does not exist")
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"--checkpoint {path} is a file; expected a launcher --out "
                                      "directory or one of its checkpoints/step_N directories")
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        run_dir = path
        ckpt = find_latest(os.path.join(path, "checkpoints"), log=lambda _msg: None)
        if ckpt is None:
            raise CheckpointNotFoundError(f"--checkpoint {path}: checkpoints/ holds no complete checkpoint "
                                          "whose manifest verifies")
    elif step_of(path) is not None and not path.endswith(".partial"):
        ckpt, run_dir = path, os.path.dirname(os.path.dirname(path))
        ok, reason = verify(path)
        if not ok:
            raise CheckpointNotFoundError(f"--checkpoint {path}: {reason}")
    else:
        raise CheckpointNotFoundError(
            f"--checkpoint {path} is neither a launcher --out directory (with checkpoints/) nor a "
            f"checkpoint (checkpoints/step_N with {MANIFEST})")
    manifest = read_manifest(ckpt)
    if manifest.get("engine", "plain") != "plain":
        raise CheckpointNotFoundError(
            f"--checkpoint {ckpt} was written by the {manifest['engine']!r} engine; generation loads "
            "the plain engine's DCP checkpoints (convert it first)")
    return RunCheckpoint(run_dir, ckpt, int(manifest.get("step", step_of(ckpt) or 0)), manifest,
                         _read_config(run_dir, path))


def inference_moe(moe: MoEConfig, overrides: Optional[Mapping[str, Any]] = None) -> MoEConfig:
    """The trained layers' config for inference: dropless unless the mode needs a capacity,
    with the dispatch ``overrides`` (only :data:`INFERENCE_MOE_FIELDS`)."""
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(INFERENCE_MOE_FIELDS))
    if bad:
        raise ValueError(f"inference may override only {list(INFERENCE_MOE_FIELDS)} of MoEConfig, got {bad}")
    static = overrides.get("static_shapes", moe.static_shapes)
    if not static and moe.router != "expert_choice":
        overrides.setdefault("eval_capacity_factor", None)  # decoding drops nothing
    if static:
        overrides.setdefault("nonfinite_policy", "count")
        overrides.setdefault("a2a_algorithm", "flat")
        if moe.eval_capacity_factor is None and overrides.get("eval_capacity_factor") is None:
            overrides["eval_capacity_factor"] = 2.0
    if overrides.get("a2a_algorithm", moe.a2a_algorithm) in ("allgather", "auto"):
        overrides.setdefault("overlap_chunks", 1)
    return moe.replace(**overrides)


def build_model(model_cfg: ModelConfig, groups: ParallelGroups, device: torch.device | str, seed: int = 0,
                moe_overrides: Optional[Mapping[str, Any]] = None) -> MoETransformer:
    """The transformer of ``model_cfg`` with its layers set up for inference
    (:func:`inference_moe`), sharded over ``groups`` (collective: the MoE layers agree on
    their config), on ``device``, in eval mode."""
    cfg = dataclasses.replace(model_cfg, moe=inference_moe(model_cfg.moe, moe_overrides))
    return MoETransformer(cfg, groups, seed=seed).to(device).eval()


def load_weights(model: MoETransformer, checkpoint: str, groups: ParallelGroups) -> None:
    """Collective over all ranks: this rank's parameters and buffers from ``checkpoint``
    (dense ones replicated, experts by their logical ids)."""
    load_checkpoint(checkpoint, model_state(model), groups.dp_group)


__all__ = ["CheckpointNotFoundError", "RunCheckpoint", "resolve_checkpoint", "inference_moe",
           "build_model", "load_weights", "INFERENCE_MOE_FIELDS"]
