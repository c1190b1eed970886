"""``DeepSpeedEngine``: the MoE transformer under ``deepspeed.initialize`` (ZeRO-1/2).

The training loop is ``trainer.py``'s, unchanged; this engine replaces the plain one's
forward, backward-and-step and checkpoint format (``engine.py``). What changes:

* model and optimizer go through ``deepspeed.initialize``; ZeRO shards the AdamW state
  (and, at stage 2, the gradients) of the *dense* parameters over all W data-parallel
  ranks, and those of the *expert* parameters over their expert-data-parallel (EDP)
  group only. How the model, its expert parameters and our groups are presented to
  DeepSpeed is ``deepspeed_setup.py``;
* gradient clipping, bf16/fp32 and (when the JSON has one) the optimizer and LR
  scheduler come from the DeepSpeed config (``deepspeed_config.py``); without a
  ``scheduler`` section the loop's warmup + cosine schedule drives the LR exactly as on
  the plain path; without an ``optimizer`` section it is the plain path's AdamW;
* after every step each expert is checked bit-identical on its EDP replicas;
* checkpoints are DeepSpeed checkpoints (``engine.save_checkpoint``) under
  ``OUT/checkpoints/step_<N>/``, with the loop's side state beside them as tensors +
  JSON; DeepSpeed's own files are read with ``weights_only=True``
  (``deepspeed_setup.SafeCheckpointEngine``). See ``docs/DEEPSPEED.md`` and
  :mod:`expert_parallel.training.deepspeed_convert` for the DCP conversion.

Gradient scale. Our convention (``training/parallel.py``) divides dense *and* expert
gradients by the world size W. DeepSpeed 0.19's ZeRO-1/2 reduction with
``contiguous_gradients`` and ``reduce_scatter`` (``average_tensor``) divides every
bucket by the size of the *dense* DP group (W) before reducing the expert slices over
the EDP group, which is exactly that convention, so no rescaling is applied. Its other
reduction path (``buffered_reduce_fallback``) divides expert gradients by the EDP size,
which would be EP times too large; the config check therefore requires both flags.
``tests/integration/test_deepspeed.py`` proves the scale by matching the plain path's
loss trajectory with clipping active.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import manager as ckpt
from ..checkpoint.extra import load_extra, save_extra
from ..checkpoint.safe_load import UnsafeCheckpointError
from ..distributed.collectives import comm_scope, guard
from ..distributed.device import Precision
from ..distributed.groups import ParallelGroups, edp_group_ranks
from ..models.transformer import ModelOutput, MoETransformer
from .config import TrainConfig
from .deepspeed_config import bf16_enabled, load_ds_config
from .deepspeed_setup import (SafeCheckpointEngine, _moe_marker_class, expert_checksum, mark_expert_params,
                              optimizer_groups, register_expert_groups, safe_torch_load)
from .engine import Engine, Log
from .run_dir import ResumeError

REPLICA_LOG = "deepspeed_replicas.jsonl"
MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO_FILE = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


# ------------------------------------------------------------------------- engine


class DeepSpeedEngine(Engine):
    """Model and optimizer inside a DeepSpeed engine; our groups, dispatcher and stats."""

    kind = "deepspeed"

    def __init__(self, cfg: TrainConfig, model: MoETransformer, groups: ParallelGroups,
                 device: torch.device) -> None:
        if not cfg.deepspeed:
            raise ValueError("deepspeed: DeepSpeedEngine needs TrainConfig.deepspeed (a config path)")
        # Pure checks first: every rank raises the same ValueError before any collective.
        self.ds_config = load_ds_config(cfg.deepspeed, cfg, groups.world_size)
        if not groups.distributed:
            raise ValueError("deepspeed: needs an initialised process group; launch with torchrun "
                             "(--nproc_per_node=1 is fine for one process)")
        import deepspeed

        super().__init__(cfg, model, groups, device)
        self.ds_version = deepspeed.__version__
        # torch.distributed is initialised by the launcher (backend from device.py: gloo on
        # CPU, NCCL on CUDA); DeepSpeed wraps that group instead of picking its own (its
        # CPU accelerator would ask for "ccl").
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        self.group_name = register_expert_groups(groups)
        mark_expert_params(model, self.group_name)
        model.add_module("deepspeed_moe_marker", _moe_marker_class()(cfg.moe.num_experts, groups, self.group_name))
        self.owns_lr = "scheduler" not in self.ds_config
        if "optimizer" in self.ds_config:
            client_opt, params = None, optimizer_groups(model, cfg, with_decay=False)
        else:
            params = optimizer_groups(model, cfg, with_decay=True)
            client_opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=client_opt, model_parameters=params, config=self.ds_config)
        self.engine.checkpoint_engine = SafeCheckpointEngine(self.engine.checkpoint_engine)
        self._check_engine(groups)
        self.replica_log = os.path.join(cfg.out, REPLICA_LOG) if self.rank == 0 else None
        # The DeepSpeed JSON decides precision here (bf16 params + fp32 master copy, or fp32).
        self.precision = Precision("bf16" if bf16_enabled(self.ds_config) else "fp32", cfg.dtype,
                                   "the DeepSpeed config's bf16.enabled decides")

    def describe(self) -> str:
        return (f"deepspeed {self.ds_version}: ZeRO-{self.ds_config['zero_optimization']['stage']}, "
                f"{'bf16' if bf16_enabled(self.ds_config) else 'fp32'}, clip "
                f"{self.ds_config['gradient_clipping']}, expert groups {self.group_name!r} "
                f"(EDP {self.groups.edp_size}), LR schedule from "
                f"{'TrainConfig' if self.owns_lr else 'the DeepSpeed config'}")

    def _check_engine(self, groups: ParallelGroups) -> None:
        """The engine's dense DP group is our DP group, its expert groups are ours, and
        ZeRO partitions every expert param group over the EDP group (no collective)."""
        eng = self.engine
        if eng.dp_world_size != groups.world_size:
            raise ValueError(f"DeepSpeed's data-parallel size {eng.dp_world_size} != world size "
                             f"{groups.world_size} of ParallelGroups")
        dp_ranks = dist.get_process_group_ranks(eng.data_parallel_group)
        if list(dp_ranks) != list(range(groups.world_size)):
            raise ValueError(f"DeepSpeed's data-parallel group {dp_ranks} != ParallelGroups' DP group "
                             f"{list(range(groups.world_size))}")
        if eng.expert_data_parallel_group.get(self.group_name) is not groups.edp_group:
            raise ValueError(f"DeepSpeed's expert-data-parallel group {self.group_name!r} is not "
                             "ParallelGroups.edp_group")
        opt = eng.optimizer
        if not getattr(opt, "has_moe_layers", False):
            raise ValueError("DeepSpeed's ZeRO optimizer did not enable its MoE handling")
        for i, group in enumerate(opt.optimizer.param_groups):
            want = groups.edp_size if group.get("moe") else groups.world_size
            if opt.partition_count[i] != want:
                raise ValueError(f"ZeRO partitions param group {group.get('name')!r} {opt.partition_count[i]} "
                                 f"ways; expected {want}")

    # -- one step ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> ModelOutput:
        # The DeepSpeed config decides precision (bf16 params or fp32): no extra autocast.
        return self.engine(x)

    def backward(self, loss: torch.Tensor) -> None:
        # ZeRO reduces (stage 2: reduce-scatters) gradients inside backward: dense over all
        # W ranks, experts over their EDP group, each divided by W (module docstring).
        with comm_scope("deepspeed", "zero_grad_reduce", "backward"), guard("reduce"):
            self.engine.backward(loss)

    def skip_step(self) -> None:
        # load_ds_config refuses nonfinite_policy='count' for this engine.
        raise RuntimeError("deepspeed: skipping a step is not supported (nonfinite_policy must be 'raise')")

    def step(self, lr: float, step: int) -> tuple[float, float]:
        if self.owns_lr:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
        used = float(self.engine.optimizer.param_groups[0]["lr"])
        # Clipping (config gradient_clipping, global norm: each expert counted once),
        # optimizer step on the local shard, all-gather of updated weights, zero_grad.
        with comm_scope("deepspeed", "zero_step", "backward"), guard("all_gather"):
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self._check_replicas(step)
        return (float(norm) if norm is not None else 0.0), used

    def _check_replicas(self, step: int) -> None:
        """Every expert must be bit-identical on all its EDP replicas after each step.

        One all-gather of one int64 per rank over the DP group; rank 0 appends the
        checksums to ``OUT/deepspeed_replicas.jsonl``. A mismatch raises on every rank.
        """
        world = self.groups.world_size
        local = torch.tensor([expert_checksum(self.model)], dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(world)]
        with comm_scope("deepspeed", "replica_check", "forward"), guard("all_gather"):
            dist.all_gather(gathered, local, group=self.groups.dp_group)
        sums = [int(t.item()) for t in gathered]
        edp = edp_group_ranks(world, self.groups.ep_size)
        if self.replica_log is not None:
            with open(self.replica_log, "a") as fh:
                fh.write(json.dumps({"step": step, "checksums": sums, "edp_groups": edp}) + "\n")
        for ranks in edp:
            if len({sums[r] for r in ranks}) != 1:
                raise RuntimeError(f"step {step}: expert replicas diverged across EDP ranks {ranks}: "
                                   f"checksums {[sums[r] for r in ranks]}")

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    # -- checkpoints -------------------------------------------------------------------
    def save(self, root: str, step: int, extra: Mapping[str, Any], meta: Mapping[str, Any],
             log: Log) -> str:
        tag = os.path.basename(ckpt.step_dir(root, step))
        path = os.path.join(root, tag)
        os.makedirs(path, exist_ok=True)
        # The side state goes in before DeepSpeed writes ``latest`` (its last act), so a
        # checkpoint named by ``latest`` always has it.
        save_extra(path, self.rank, extra)
        client_state = {"ep_meta": {**meta, "format": "deepspeed", "expert_group": self.group_name}}
        with comm_scope("deepspeed", "save_checkpoint", "forward"):
            self.engine.save_checkpoint(root, tag=tag, client_state=client_state)
        if self.rank == 0:
            ckpt.prune(root, self.cfg.keep_checkpoints, tag, log=log)
        dist.barrier(group=self.groups.dp_group)
        return path

    def find_checkpoint(self, root: str, log: Log) -> Optional[str]:
        latest = os.path.join(root, ckpt.LATEST)
        if not os.path.isfile(latest):
            return None
        with open(latest) as fh:
            tag = fh.read().strip()
        path = os.path.join(root, tag)
        if ckpt.step_of(tag) is None or not os.path.isdir(path):
            raise ResumeError(f"{latest} names {tag!r}, which is not a checkpoint directory under {root}")
        if os.path.isfile(os.path.join(path, ckpt.MANIFEST)):
            raise ResumeError(f"checkpoint {path} is in the project's DCP format, not DeepSpeed's; "
                              "convert it with python -m expert_parallel.training.deepspeed_convert")
        return path

    def inspect(self, path: str) -> int:
        names = [MODEL_FILE, ZERO_FILE.format(rank=self.rank)]
        for name in names:
            file = os.path.join(path, name)
            if os.path.isfile(file):
                safe_torch_load(file)
        extra = load_extra(path, self.rank) or load_extra(path, 0) or {}
        step = extra.get("step", ckpt.step_of(path))
        if isinstance(step, bool) or not isinstance(step, int):
            raise UnsafeCheckpointError(f"{path}: step {step!r} is not a step number")
        return step

    def _load_dense(self, src: dict[str, torch.Tensor], dst: nn.Module) -> None:
        """``custom_load_fn`` for DeepSpeed: the module file is written by rank 0 and holds
        rank 0's local experts only, so load the dense tensors from it and leave expert
        weights to the ZeRO fp32 shards each rank restores next."""
        expert_names = {n for n, p in dst.named_parameters() if getattr(p, "allreduce", True) is False}
        dense = {k: v for k, v in src.items() if k not in expert_names}
        missing, unexpected = dst.load_state_dict(dense, strict=False)
        if unexpected or set(missing) - expert_names:
            raise ValueError(f"DeepSpeed checkpoint does not match the model: missing "
                             f"{sorted(set(missing) - expert_names)}, unexpected {sorted(unexpected)}")

    @torch.no_grad()
    def refresh_params_from_fp32(self) -> None:
        """Set every model parameter from its ZeRO fp32 master copy.

        DeepSpeed 0.19 restores the fp32 shards on load but leaves the module's own
        parameters as the module file had them until the next ``step()``; that file holds
        rank 0's experts only. One all-reduce per parameter over its ZeRO partition group
        (EDP for experts, all W ranks for dense parameters), at resume time only.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        with comm_scope("deepspeed", "refresh_params", "forward"), guard("all_reduce"):
            for name, p in self.model.named_parameters():
                full = safe_get_full_fp32_param(p)
                if full is None:
                    raise RuntimeError(f"DeepSpeed has no fp32 master copy of {name}")
                p.copy_(full.to(p.dtype))

    def load(self, path: str) -> None:
        root, tag = os.path.split(path)
        with comm_scope("deepspeed", "load_checkpoint", "forward"):
            load_path, client = self.engine.load_checkpoint(
                root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                custom_load_fn=self._load_dense)
        if load_path is None or client is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        self.refresh_params_from_fp32()
        meta = client.get("ep_meta", {})
        for key, want in (("world_size", self.groups.world_size), ("ep_size", self.groups.ep_size)):
            if meta.get(key) != want:
                # ZeRO shards are per rank and per EDP group: same layout only.
                raise ValueError(f"DeepSpeed checkpoint {path} was written with {key}={meta.get(key)}, "
                                 f"this run has {key}={want}; convert through DCP to reshard "
                                 "(docs/DEEPSPEED.md)")


__all__ = ["DeepSpeedEngine", "REPLICA_LOG"]
