"""Train the MoE transformer under the DeepSpeed engine (ZeRO-1/2): ``--deepspeed CONFIG``.

What changes against the plain :class:`~expert_parallel.training.trainer.Trainer`:

* model and optimizer go through ``deepspeed.initialize``; ZeRO shards the AdamW state
  (and, at stage 2, the gradients) of the *dense* parameters over all W data-parallel
  ranks, and those of the *expert* parameters over their expert-data-parallel (EDP)
  group only;
* expert parameters are marked the way DeepSpeed marks its own MoE parameters
  (``param.allreduce = False``, ``param.group_name = "ep_size_<EP>"``) and live in
  optimizer param groups with ``moe=True`` (DeepSpeed's
  ``split_params_into_different_moe_groups_for_optimizer``);
* DeepSpeed's expert group registry is filled *from our* ``ParallelGroups`` (the same
  process-group objects), or checked against it when an entry already exists: a
  mismatch is a ``ValueError`` naming both rank lists;
* gradient clipping, bf16/fp32 and (when the JSON has one) the optimizer and LR
  scheduler come from the DeepSpeed config; without a ``scheduler`` section the
  trainer's warmup + cosine schedule (``TrainConfig.lr`` ...) drives the LR exactly as
  on the plain path; without an ``optimizer`` section it is the plain path's AdamW;
* checkpoints are DeepSpeed checkpoints (``engine.save_checkpoint``) under
  ``OUT/checkpoints/step_<N>/``; see ``docs/DEEPSPEED.md`` and
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

DeepSpeed only turns its MoE code on when the model contains a ``deepspeed.moe.layer.MoE``
module (an ``isinstance`` check in the engine). Our layers are not DeepSpeed layers, so
a parameter-free :class:`_MoEMarker` (a ``MoE`` subclass that skips ``MoE.__init__``)
is attached to the model; it owns no state and its forward is never called.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed.collectives import comm_scope, guard
from ..distributed.groups import ParallelGroups, edp_group_ranks
from ..moe.dispatcher import NonFiniteRouterError
from .config import TrainConfig
from .parallel import split_params
from .trainer import StepResult, Trainer, lr_at

EXPERT_GROUP_PREFIX = "ep_size_"
REPLICA_LOG = "deepspeed_replicas.jsonl"
SUPPORTED_STAGES = (1, 2)


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of one EP size (``deepspeed.moe.layer.MoE``)."""
    return f"{EXPERT_GROUP_PREFIX}{ep_size}"


# ----------------------------------------------------------------------------- config


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
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"deepspeed: config file {path!r} does not exist")
    try:
        with open(path) as fh:
            ds = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"deepspeed: {path!r} is not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"deepspeed: {path!r} must hold a JSON object, got {type(ds).__name__}")
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
    if cfg.nonfinite_policy != "raise":
        raise ValueError(f"nonfinite_policy={cfg.nonfinite_policy!r} is not supported with --deepspeed "
                         "(skipping a step after ZeRO has reduced its gradients is not exposed by "
                         "the engine); use 'raise'")
    return ds


def bf16_enabled(ds: dict) -> bool:
    return bool(_get(ds.get("bf16", {}), "enabled", False))


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
            # from the ZeRO fp32 shards (see DeepSpeedTrainer.resume).
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


# ------------------------------------------------------------------------- trainer


class DeepSpeedTrainer(Trainer):
    """:class:`Trainer` whose model and optimizer are a DeepSpeed engine (ZeRO-1/2)."""

    def __init__(self, cfg: TrainConfig, groups: ParallelGroups, device: torch.device) -> None:
        if not cfg.deepspeed:
            raise ValueError("deepspeed: DeepSpeedTrainer needs TrainConfig.deepspeed (a config path)")
        # Pure checks first: every rank raises the same ValueError before any collective.
        self.ds_config = load_ds_config(cfg.deepspeed, cfg, groups.world_size)
        if not groups.distributed:
            raise ValueError("deepspeed: needs an initialised process group; launch with torchrun "
                             "(--nproc_per_node=1 is fine for one process)")
        import deepspeed

        super().__init__(cfg, groups, device)
        self.ds_version = deepspeed.__version__
        # torch.distributed is initialised by the launcher (backend from device.py: gloo on
        # CPU, NCCL on CUDA); DeepSpeed wraps that group instead of picking its own (its
        # CPU accelerator would ask for "ccl").
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        self.group_name = register_expert_groups(groups)
        mark_expert_params(self.model, self.group_name)
        marker = _moe_marker_class()(cfg.num_experts, groups, self.group_name)
        self.model.add_module("deepspeed_moe_marker", marker)
        self.owns_lr = "scheduler" not in self.ds_config
        if "optimizer" in self.ds_config:
            client_opt, params = None, optimizer_groups(self.model, cfg, with_decay=False)
        else:
            params = optimizer_groups(self.model, cfg, with_decay=True)
            client_opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False)
        self.optimizer = None  # the plain path's AdamW (built by Trainer) is not used
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=client_opt, model_parameters=params, config=self.ds_config)
        self._check_engine(groups)
        # The DeepSpeed config decides precision (bf16 params or fp32): no extra autocast.
        self.autocast = None
        self._last_lr = 0.0
        self.replica_log = os.path.join(cfg.out, REPLICA_LOG) if self.rank == 0 else None
        self.logger.info(f"deepspeed {self.ds_version}: ZeRO-{self.ds_config['zero_optimization']['stage']}, "
                         f"{'bf16' if bf16_enabled(self.ds_config) else 'fp32'}, clip "
                         f"{self.ds_config['gradient_clipping']}, expert groups {self.group_name!r} "
                         f"(EDP {groups.edp_size}), LR schedule from "
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
    def _loss(self, x: torch.Tensor, y: torch.Tensor):
        out = self.engine(x)
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        return ce, out

    def train_step(self) -> StepResult:
        cfg = self.cfg
        self.engine.train()
        x, y = self.train_sampler.batch(self.step, self.device)
        try:
            ce, out = self._loss(x, y)
        except NonFiniteRouterError as err:
            raise NonFiniteRouterError(f"step {self.step}: {err}") from None
        # ZeRO reduces (stage 2: reduce-scatters) gradients inside backward: dense over all
        # W ranks, experts over their EDP group, each divided by W (module docstring).
        with comm_scope("deepspeed", "zero_grad_reduce", "backward"), guard("reduce"):
            self.engine.backward(ce + out.aux_loss)
        with comm_scope("trainer", "stats_all_reduce", "forward"), guard("all_reduce"):
            (loss, aux), stats = self._reduce([ce, out.aux_loss], out.stats)
        self._tune_capacity(out.stats)
        nonfinite = sum(int(s.nonfinite) for s in stats.values()) or (not math.isfinite(loss))
        if nonfinite:
            raise FloatingPointError(
                f"step {self.step}: non-finite loss or router logits "
                f"(layers: {[n for n, s in stats.items() if int(s.nonfinite)]})")
        if self.owns_lr:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr_at(cfg, self.step)
        self._last_lr = float(self.engine.optimizer.param_groups[0]["lr"])
        # Clipping (config gradient_clipping, global norm: each expert counted once),
        # optimizer step on the local shard, all-gather of updated weights, zero_grad.
        with comm_scope("deepspeed", "zero_step", "backward"), guard("all_gather"):
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.grad_norm = float(norm) if norm is not None else 0.0
        if cfg.bias_update_rate > 0:
            for name, layer in self.model.moe_layers().items():
                layer.update_expert_bias(stats[name])
        self._check_replicas(self.step + 1)
        return StepResult(loss, aux, stats, skipped=False)

    def step_lr(self) -> float:
        return self._last_lr

    def _check_replicas(self, step: int) -> None:
        """Every expert must be bit-identical on all its EDP replicas after each step.

        One all-gather of one int64 per rank over the DP group; rank 0 appends the
        checksums to ``OUT/deepspeed_replicas.jsonl``. A mismatch raises on every rank.
        """
        local = torch.tensor([expert_checksum(self.model)], dtype=torch.int64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        with comm_scope("deepspeed", "replica_check", "forward"), guard("all_gather"):
            dist.all_gather(gathered, local, group=self.groups.dp_group)
        sums = [int(t.item()) for t in gathered]
        edp = edp_group_ranks(self.world, self.groups.ep_size)
        if self.replica_log is not None:
            with open(self.replica_log, "a") as fh:
                fh.write(json.dumps({"step": step, "checksums": sums, "edp_groups": edp}) + "\n")
        for ranks in edp:
            if len({sums[r] for r in ranks}) != 1:
                raise RuntimeError(f"step {step}: expert replicas diverged across EDP ranks {ranks}: "
                                   f"checksums {[sums[r] for r in ranks]}")

    # -- checkpoints -------------------------------------------------------------------
    def save(self) -> str:
        tag = f"step_{self.step:08d}"
        path = os.path.join(self.ckpt_root, tag)
        os.makedirs(path, exist_ok=True)
        # Per-rank extras go in before DeepSpeed writes ``latest`` (its last act), so a
        # checkpoint named by ``latest`` always has them.
        torch.save({"rng_torch": torch.get_rng_state(), "rng_numpy": np.random.get_state(),
                    "rng_python": random.getstate()},
                   os.path.join(path, f"extra_rank{self.rank}.pt"))
        client_state = {
            "ep_step": self.step,
            "ep_capacity_factors": {n: l.config.capacity_factor for n, l in self.model.moe_layers().items()},
            "ep_meta": {"world_size": self.world, "ep_size": self.groups.ep_size,
                        "config_fingerprint": self.cfg.fingerprint(), "format": "deepspeed",
                        "expert_group": self.group_name},
        }
        with comm_scope("deepspeed", "save_checkpoint", "forward"):
            self.engine.save_checkpoint(self.ckpt_root, tag=tag, client_state=client_state)
        if self.rank == 0:
            tags = sorted(n for n in os.listdir(self.ckpt_root) if n.startswith("step_"))
            for old in tags[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(os.path.join(self.ckpt_root, old), ignore_errors=True)
        dist.barrier(group=self.groups.dp_group)
        return path

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
    def _refresh_params_from_fp32(self) -> None:
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

    def resume(self) -> Optional[str]:
        choice = [None]
        if self.rank == 0:
            latest = os.path.join(self.ckpt_root, "latest")
            if os.path.isfile(latest):
                with open(latest) as fh:
                    choice = [fh.read().strip()]
        dist.broadcast_object_list(choice, src=0, group=self.groups.dp_group)
        tag = choice[0]
        if tag is None:
            self.logger.info(f"no DeepSpeed checkpoint under {self.ckpt_root}; starting from step 0")
            return None
        path = os.path.join(self.ckpt_root, tag)
        if os.path.isfile(os.path.join(path, "manifest.json")):
            raise ValueError(f"checkpoint {path} is in the project's DCP format, not DeepSpeed's; "
                             "convert it with python -m expert_parallel.training.deepspeed_convert")
        with comm_scope("deepspeed", "load_checkpoint", "forward"):
            load_path, client = self.engine.load_checkpoint(
                self.ckpt_root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                custom_load_fn=self._load_dense)
        if load_path is None or client is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        self._refresh_params_from_fp32()
        meta = client.get("ep_meta", {})
        for key, want in (("world_size", self.world), ("ep_size", self.groups.ep_size)):
            if meta.get(key) != want:
                # ZeRO shards are per rank and per EDP group: same layout only.
                raise ValueError(f"DeepSpeed checkpoint {path} was written with {key}={meta.get(key)}, "
                                 f"this run has {key}={want}; convert through DCP to reshard "
                                 "(docs/DEEPSPEED.md)")
        self.step = int(client["ep_step"])
        if self.tuners:
            for name, layer in self.model.moe_layers().items():
                layer.set_capacity_factor(client["ep_capacity_factors"][name])
        extra_path = os.path.join(path, f"extra_rank{self.rank}.pt")
        if os.path.isfile(extra_path):
            extra = torch.load(extra_path, weights_only=False)
            torch.set_rng_state(extra["rng_torch"])
            np.random.set_state(extra["rng_numpy"])
            random.setstate(extra["rng_python"])
        self.logger.info(f"resumed DeepSpeed checkpoint {path} at step {self.step}")
        return path


__all__ = ["DeepSpeedTrainer", "load_ds_config", "register_expert_groups", "mark_expert_params",
           "optimizer_groups", "expert_group_name", "check_group_ranks", "expert_checksum"]
