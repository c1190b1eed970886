"""``TrainConfig``: every setting of a launcher run, as one tree of config dataclasses.

::

    TrainConfig
      model:    ModelConfig            the transformer's shape
        moe:    MoEConfig              every MoE layer (hidden_size = model.d_model)
      parallel: ParallelConfig         EP size (int or "auto"), ranks per node
      tuner:    CapacityTunerConfig    capacity-factor auto-tuning (off by default)
      max_steps, lr, out, resume, ...  the training loop's own fields (below)

Nothing is copied between the levels: the launcher's options are generated from these
dataclasses (``options.py``), so a field added to ``MoEConfig`` is an option at once.
Each dataclass validates its own fields; ``TrainConfig.__post_init__`` checks the
combinations that span levels, naming both fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from ..config import MoEConfig, ParallelConfig, _check_float, _check_int
from ..distributed.device import PRECISIONS
from ..models.transformer import ModelConfig
from ..moe.capacity_tuner import CapacityTunerConfig
from .host_memory import check_allocator


@dataclass(frozen=True)
class TrainConfig:
    """A launcher run: model, parallel layout, capacity tuner and the training loop."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The MoE transformer (``model.moe`` configures every MoE layer)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the ranks are split into expert-parallel groups."""
    tuner: CapacityTunerConfig = field(default_factory=CapacityTunerConfig)
    """Capacity-factor auto-tuning from the measured load (off unless target_drop is set)."""
    # -- optimisation
    max_steps: int = 500
    """Training steps."""
    global_batch_size: int = 16
    """Sequences per step over all ranks; must divide by the world size."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 30
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    grad_clip: float = 1.0
    """Clip gradients to this global norm (0 disables)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute precision: auto = bf16 autocast where the device computes bf16 natively
    (CUDA with native bf16, CPUs with AVX512-BF16 or AMX-BF16), fp32 elsewhere. Master
    weights, optimizer state, router, combine and gradient reduction stay fp32
    (docs/PRECISION.md). With --deepspeed its JSON's bf16 section decides instead."""
    seed: int = 1234
    """Seed for weights and data."""
    stop_after: int = 0
    """Stop (with a checkpoint) once this step is reached, without changing the LR
    schedule that max_steps defines; 0 = run to max_steps. For planned interruptions."""
    # -- evaluation, logging, checkpoints
    eval_every: int = 50
    """Validation every N steps (and at the end)."""
    eval_batches: int = 4
    """Global batches per validation."""
    ckpt_every: int = 100
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """How many complete checkpoints to keep (the one just written always among them)."""
    sample_tokens: int = 32
    """At the end, the trained model continues sample_prompt by this many tokens (greedy,
    KV cache; byte-level data only), shown in the final report and summary.json; 0 = no
    sample. Cut to what fits the context."""
    sample_prompt: str = "def "
    """The prompt of the final report's sample."""
    out: str = "runs/default"
    """Run directory: metrics, summary, report, checkpoints. A directory that already holds
    a run needs --resume (continue it) or --overwrite (delete it and start over)."""
    data: Optional[str] = None
    """Text file or uint16 .bin; none = built-in Python-stdlib corpus."""
    resume: bool = False
    """Continue the run in OUT from its latest complete checkpoint (from step 0 when it
    has none); refused when that checkpoint is at or past max_steps."""
    overwrite: bool = False
    """Delete the run already in OUT (its metrics, summary, report, TensorBoard logs and
    checkpoints) and start a new one there."""
    collective_timeout_s: float = 300.0
    """Timeout of every collective; a dead peer fails the run within it."""
    tensorboard: bool = True
    """Write TensorBoard scalars to OUT/tb."""
    host_allocator: str = "auto"
    """Host memory allocator of the launcher's processes: auto (jemalloc when installed,
    else the system's), jemalloc, tcmalloc or glibc. glibc's heap fragments over long
    runs; see training/host_memory.py for the measurements."""
    deepspeed: Optional[str] = None
    """Path of a DeepSpeed JSON config: train under deepspeed.initialize (ZeRO-1/2)."""
    # -- expert load balancing (placement of experts over the EP group)
    rebalance_every: int = 0
    """Every N steps, plan a new expert placement from the measured load and move the
    experts (weights and AdamW state) there, live; 0 = never. With
    num_redundant_experts > 0 the hot experts get replicas (training/balancer.py)."""
    rebalance_window: int = 0
    """Steps of load the planner looks at; 0 = the last rebalance_every steps."""
    replica_check_every: int = 50
    """Every N steps verify that expert replicas (redundant slots, expert-data-parallel
    copies) are bit-identical; 0 = never."""
    fault_save_pause_s: float = 0.0
    """For fault-injection tests only: every rank sleeps this long inside each checkpoint
    save, after writing its files and before the manifest and the atomic rename, so a
    test can SIGKILL a rank while the .partial directory exists. 0 in real runs."""

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelConfig), ("parallel", ParallelConfig),
                          ("tuner", CapacityTunerConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        for name in ("max_steps", "global_batch_size", "eval_every", "eval_batches", "keep_checkpoints"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "ckpt_every", "seed", "stop_after", "sample_tokens", "rebalance_every",
                     "rebalance_window", "replica_check_every"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "collective_timeout_s"):
            _check_float(name, getattr(self, name), 0.0, strict=True)
        for name in ("min_lr", "weight_decay", "grad_clip", "fault_save_pause_s"):
            _check_float(name, getattr(self, name), 0.0, strict=False)
        if not isinstance(self.sample_prompt, str):
            raise TypeError(f"sample_prompt must be a str, got {self.sample_prompt!r}")
        for name in ("resume", "overwrite", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume=True and overwrite=True exclude each other: --resume continues "
                             "the run in --out, --overwrite deletes it")
        check_allocator(self.host_allocator)  # a known choice; an explicit library is installed
        if self.dtype not in PRECISIONS:
            raise ValueError(f"dtype must be one of {list(PRECISIONS)}, got {self.dtype!r}")
        moe = self.model.moe
        if self.tuner.target_drop is not None and moe.capacity_factor is None:
            raise ValueError(f"tuner.target_drop={self.tuner.target_drop!r} needs a capacity_factor "
                             "to tune, got capacity_factor=None (dropless)")
        if self.deepspeed and (self.rebalance_every or moe.num_redundant_experts):
            raise ValueError(
                f"deepspeed={self.deepspeed!r} cannot be combined with rebalance_every={self.rebalance_every} / "
                f"num_redundant_experts={moe.num_redundant_experts}: ZeRO keeps the expert gradients and "
                "optimizer state in flat partitions that neither replica sync nor re-placement can reach; "
                "use the plain engine (no --deepspeed)")
        ep = self.parallel.ep_size
        if ep != "auto" and moe.num_experts % ep:
            raise ValueError(f"ep_size={ep} must divide num_experts={moe.num_experts}")

    @property
    def moe(self) -> MoEConfig:
        return self.model.moe

    def with_parallel(self, ep_size: int, ranks_per_node: int) -> "TrainConfig":
        """This config with the parallel layout resolved (``ParallelConfig.resolve``)."""
        return dataclasses.replace(self, parallel=ParallelConfig(ep_size=ep_size, ranks_per_node=ranks_per_node))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict:
        """``{"model.moe.top_k": 2, ..., "lr": 0.003}``: one entry per leaf field (so a
        cross-rank mismatch names the field, not a whole section)."""
        def walk(obj: dict, prefix: str) -> dict:
            out = {}
            for key, value in obj.items():
                if isinstance(value, dict):  # a nested config section
                    out.update(walk(value, f"{prefix}{key}."))
                else:
                    out[prefix + key] = value
            return out

        return walk(self.to_dict(), "")

    def fingerprint(self, ignore: Sequence[str] = ("resume", "overwrite", "out")) -> str:
        blob = {k: v for k, v in self.to_dict().items() if k not in ignore}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["TrainConfig"]
