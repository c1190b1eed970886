"""``TrainConfig``: every setting of a launcher run, from a JSON file and ``--key value``.

Precedence: dataclass defaults < ``--config FILE`` (JSON object) < command-line
``--key value`` pairs (``--capacity-factor`` and ``--capacity_factor`` both work; ``none``
means None; ``--resume`` alone means true). Unknown keys and bad values raise
``ValueError`` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, get_type_hints

from ..config import MoEConfig, _check_float, _check_int
from ..models.transformer import ModelConfig
from ..moe.capacity_tuner import CapacityTunerConfig
from .host_memory import check_allocator


@dataclass(frozen=True)
class TrainConfig:
    """Launcher settings. Model and MoE fields are forwarded to their configs."""

    # -- model
    vocab_size: int = 256
    """Vocabulary size (256 = bytes)."""
    seq_len: int = 128
    """Tokens per sequence."""
    d_model: int = 128
    """Model width."""
    n_layers: int = 4
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads."""
    moe_every: int = 1
    """1: every FFN is MoE; 2: every other one."""
    dense_ffn_hidden: int = 512
    """Dense FFN hidden size (non-MoE blocks)."""
    activation_checkpointing: bool = False
    """Recompute blocks in backward."""
    # -- MoE
    num_experts: int = 8
    """Experts per MoE layer."""
    top_k: int = 2
    """Experts per token."""
    expert_ffn_hidden: int = 256
    """Hidden size of each expert MLP."""
    router: str = "softmax_topk"
    """Router kind (see MoEConfig.router)."""
    top_p: Optional[float] = None
    """Cumulative probability for router='top_p' (top_k is then the maximum k)."""
    capacity_factor: Optional[float] = 1.25
    """Training capacity factor; none = dropless."""
    eval_capacity_factor: Optional[float] = 2.0
    """Capacity factor for validation; none = dropless."""
    min_capacity: int = 4
    """Minimum per-expert capacity."""
    drop_policy: str = "position"
    """position | probs."""
    aux_loss_coeff: float = 0.01
    """Load-balancing loss coefficient."""
    z_loss_coeff: float = 0.001
    """Router z-loss coefficient."""
    router_jitter: float = 0.0
    """Router input jitter."""
    activation: str = "swiglu"
    """swiglu | gelu."""
    expert_backend: str = "auto"
    """auto | loop | bmm | grouped_mm."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing rate (sigmoid_topk)."""
    capacity_target_drop: Optional[float] = None
    """Auto-tune the capacity factor to drop at most this fraction (none = fixed)."""
    capacity_tune_every: int = 50
    """Steps between capacity auto-tuner updates."""
    # -- parallelism
    ep_size: int = 1
    """Expert-parallel size; must divide the world size and num_experts."""
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
    seed: int = 1234
    """Seed for weights and data."""
    stop_after: int = 0
    """Stop (with a checkpoint) once this step is reached, without changing the LR
    schedule that ``max_steps`` defines; 0 = run to max_steps. For planned interruptions."""
    # -- evaluation, logging, checkpoints
    eval_every: int = 50
    """Validation every N steps (and at the end)."""
    eval_batches: int = 4
    """Global batches per validation."""
    ckpt_every: int = 100
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """How many complete checkpoints to keep."""
    out: str = "runs/default"
    """Output directory (metrics, summary, report, checkpoints)."""
    data: Optional[str] = None
    """Text file or uint16 .bin; none = built-in Python-stdlib corpus."""
    resume: bool = False
    """Continue from the latest complete checkpoint in OUT/checkpoints."""
    collective_timeout_s: float = 300.0
    """Timeout of every collective; a dead peer fails the run within it."""
    tensorboard: bool = True
    """Write TensorBoard scalars to OUT/tb."""
    host_allocator: str = "auto"
    """Host memory allocator of the launcher's processes: auto (jemalloc when installed,
    else the system's), jemalloc, tcmalloc or glibc. glibc's heap fragments over long
    runs; see ``training/host_memory.py`` for the measurements."""
    deepspeed: Optional[str] = None
    """Path of a DeepSpeed JSON config: train under ``deepspeed.initialize`` (ZeRO)."""
    nonfinite_policy: str = "raise"
    """raise: stop on NaN/Inf router logits; skip: count them and skip the step."""
    fault_save_pause_s: float = 0.0
    """For fault-injection tests only: every rank sleeps this long inside each checkpoint
    save, after writing its files and before the manifest and the atomic rename, so a
    test can SIGKILL a rank while the ``.partial`` directory exists. 0 in real runs."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "global_batch_size", "ep_size", "eval_every", "eval_batches",
                     "keep_checkpoints", "capacity_tune_every"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "ckpt_every", "seed", "stop_after"):
            _check_int(name, getattr(self, name), 0)
        for name in ("lr", "collective_timeout_s"):
            _check_float(name, getattr(self, name), 0.0, strict=True)
        for name in ("min_lr", "weight_decay", "grad_clip", "fault_save_pause_s"):
            _check_float(name, getattr(self, name), 0.0, strict=False)
        check_allocator(self.host_allocator)  # a known choice; an explicit library is installed
        if self.nonfinite_policy not in ("raise", "skip"):
            raise ValueError(f"nonfinite_policy must be 'raise' or 'skip', got {self.nonfinite_policy!r}")
        self.model_config()  # validates the model and MoE fields
        if self.capacity_target_drop is not None:
            if self.capacity_factor is None:
                raise ValueError("capacity_target_drop needs a capacity_factor to tune, got none")
            self.tuner_config()
        if self.num_experts % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide num_experts={self.num_experts}")

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            hidden_size=self.d_model, ffn_hidden_size=self.expert_ffn_hidden,
            num_experts=self.num_experts, top_k=self.top_k, router=self.router, top_p=self.top_p,
            capacity_factor=self.capacity_factor, eval_capacity_factor=self.eval_capacity_factor,
            min_capacity=self.min_capacity, drop_policy=self.drop_policy,
            aux_loss_coeff=self.aux_loss_coeff, z_loss_coeff=self.z_loss_coeff,
            router_jitter=self.router_jitter, activation=self.activation,
            expert_backend=self.expert_backend, bias_update_rate=self.bias_update_rate,
            nonfinite_policy="raise" if self.nonfinite_policy == "raise" else "count",
        )

    def tuner_config(self) -> CapacityTunerConfig:
        return CapacityTunerConfig(target_drop=self.capacity_target_drop or 0.0)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size, seq_len=self.seq_len, d_model=self.d_model,
            n_layers=self.n_layers, n_heads=self.n_heads, moe_every=self.moe_every,
            dense_ffn_hidden=self.dense_ffn_hidden,
            activation_checkpointing=self.activation_checkpointing, moe=self.moe_config(),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, ignore: Sequence[str] = ("resume", "out")) -> str:
        blob = {k: v for k, v in self.to_dict().items() if k not in ignore}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _convert(key: str, raw: Any, annotation: Any) -> Any:
    text = str(annotation)
    if isinstance(raw, str) and raw.lower() in ("none", "null") and "Optional" in text:
        return None
    if not isinstance(raw, str):
        return raw
    try:
        if "bool" in text:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "int" in text and "float" not in text:
            return int(raw)
        if "float" in text:
            return float(raw)
    except ValueError:
        raise ValueError(f"--{key}: cannot parse {raw!r} as {text}") from None
    return raw


def parse_args(argv: Sequence[str]) -> TrainConfig:
    """Build a TrainConfig from ``--config FILE`` and ``--key value`` arguments."""
    hints = get_type_hints(TrainConfig)
    values: dict[str, Any] = {}
    pairs: list[tuple[str, Any]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; use --key value")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        elif key in ("resume", "activation_checkpointing", "tensorboard") and (
            i + 1 >= len(args) or args[i + 1].startswith("--")
        ):
            val, i = "true", i + 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"--{key} needs a value")
            val, i = args[i + 1], i + 2
        pairs.append((key, val))
    for key, val in pairs:
        if key == "config":
            if not os.path.isfile(val):
                raise ValueError(f"--config: file {val!r} does not exist")
            try:
                with open(val) as fh:
                    loaded = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"--config: {val!r} is not valid JSON ({err})") from None
            if not isinstance(loaded, dict):
                raise ValueError(f"--config: {val!r} must hold a JSON object")
            for k, v in loaded.items():
                if k not in hints:
                    raise ValueError(f"--config {val!r}: unknown key {k!r}")
                values[k] = _convert(k, v, hints[k])
    for key, val in pairs:
        if key == "config":
            continue
        if key not in hints:
            raise ValueError(f"unknown option --{key.replace('_', '-')}")
        values[key] = _convert(key, val, hints[key])
    return TrainConfig(**values)
