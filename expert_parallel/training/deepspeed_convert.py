"""Convert checkpoints between the DeepSpeed path and the project's DCP format.

A DeepSpeed ZeRO-1/2 checkpoint of our model is per rank: ``mp_rank_00_model_states.pt``
(written by rank 0: dense weights, rank 0's local experts, our ``ep_*`` client state)
and one ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank (the fp32 master shard
and AdamW state of that rank's ZeRO partitions: dense groups split over all W ranks,
expert groups over the rank's EDP group). Nothing in those files says which global
expert a shard belongs to, so no offline tool can re-key them; the conversion runs
*online*, on the world size and EP size the DeepSpeed checkpoint was written with:

* ``to-dcp``: load the DeepSpeed checkpoint into a DeepSpeed engine, gather every
  parameter's fp32 master copy and AdamW moments (``safe_get_full_*``, one all-reduce
  per parameter over its ZeRO group) and write them with the plain path's atomic,
  EP-resharding DCP writer (per-global-expert keys). Resume with the plain launcher at
  any EP size.
* ``from-dcp``: load a DCP checkpoint (any EP size: DCP reshards the experts) into the
  model and a plain AdamW, push weights and moments into the engine's ZeRO shards
  (``safe_set_full_*``) and write a DeepSpeed checkpoint at this run's layout.

Usage (same launcher options as the run; ``--src``/``--dst`` are run directories)::

    torchrun --nproc_per_node=4 -m expert_parallel.training.deepspeed_convert to-dcp \\
        --src runs/ds --dst runs/ds_as_dcp --deepspeed launch/configs/ds_zero2.json --ep-size 2
    torchrun --nproc_per_node=4 launch/train.py --ep-size 4 --out runs/ds_as_dcp --resume

A DeepSpeed -> DCP -> DeepSpeed round trip is also the way to change the world or EP
size of a DeepSpeed run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

import torch

from ..checkpoint import manager as ckpt
from ..checkpoint.state import ensure_adam_state, model_state, optimizer_state
from ..distributed.device import local_device
from ..distributed.groups import ParallelGroups
from ..distributed.launch_env import init_distributed, shutdown
from .config import TrainConfig, parse_args
from .deepspeed_engine import DeepSpeedTrainer
from .trainer import Trainer, build_optimizer, default_timeout

DIRECTIONS = ("to-dcp", "from-dcp")


def _zero_base_states(trainer: DeepSpeedTrainer) -> list[dict]:
    """The per-partition AdamW state dicts inside DeepSpeed's ZeRO optimizer."""
    base = trainer.engine.optimizer.optimizer
    return [base.state[p] for group in base.param_groups for p in group["params"] if p in base.state]


def _link_zero_adam_state(trainer: DeepSpeedTrainer) -> None:
    """Make sure the ZeRO partitions have AdamW state and that each parameter's fragment
    points into it, so ``safe_get/set_full_optimizer_state`` work.

    DeepSpeed creates the state lazily at the first ``step()`` and links the fragments
    there (``_lazy_init_hp_params_optimizer_state``, a private method of its ZeRO-1/2
    optimizer); a freshly built or freshly loaded engine has neither yet.
    """
    zero = trainer.engine.optimizer
    base = zero.optimizer
    for group in base.param_groups:
        for flat in group["params"]:
            if not base.state[flat]:
                base.state[flat] = {"step": torch.zeros((), dtype=torch.float32),
                                    "exp_avg": torch.zeros_like(flat),
                                    "exp_avg_sq": torch.zeros_like(flat)}
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def export_dcp(trainer: DeepSpeedTrainer, dst_root: str) -> str:
    """Collective: write the engine's full fp32 weights and AdamW state as a DCP checkpoint."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_zero_adam_state(trainer)
    states = _zero_base_states(trainer)
    step_t = states[0]["step"] if states else torch.zeros(())
    plain = build_optimizer(trainer.model, trainer.cfg)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            full = safe_get_full_fp32_param(p)
            if full is None:
                raise RuntimeError(f"DeepSpeed has no fp32 master copy of {name}")
            p.copy_(full.to(p.dtype))
            plain.state[p] = {
                "step": torch.as_tensor(step_t, dtype=torch.float32).clone().reshape(()),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").to(p.dtype).clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").to(p.dtype).clone(),
            }
    # The plain writer, with the plain path's metadata (Trainer.save reads self.optimizer).
    trainer.optimizer, trainer.ckpt_root = plain, dst_root
    return Trainer.save(trainer)


def import_dcp(trainer: DeepSpeedTrainer, path: str) -> int:
    """Collective: load DCP checkpoint ``path`` into the engine's ZeRO shards. Returns its step."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    plain = build_optimizer(trainer.model, trainer.cfg)
    ensure_adam_state(plain)
    state = {**model_state(trainer.model), **optimizer_state(trainer.model, plain)}
    ckpt.load_checkpoint(path, state, trainer.groups.dp_group)  # reshards experts by key
    step = int(ckpt.read_manifest(path)["step"])
    steps = {float(plain.state[p]["step"]) for p in trainer.model.parameters()}
    _link_zero_adam_state(trainer)
    for name, p in trainer.model.named_parameters():
        safe_set_full_fp32_param(p, p.detach().float())
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, plain.state[p][key].float(), key)
    for st in _zero_base_states(trainer):
        st["step"] = torch.full_like(torch.as_tensor(st["step"]), max(steps) if steps else step)
    trainer.step = step
    return step


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in DIRECTIONS:
        raise ValueError(f"first argument must be one of {DIRECTIONS}, got {args[:1]!r}")
    direction, rest = args[0], args[1:]
    paths: dict[str, str] = {}
    keep: list[str] = []
    i = 0
    while i < len(rest):
        if rest[i] in ("--src", "--dst"):
            if i + 1 >= len(rest):
                raise ValueError(f"{rest[i]} needs a directory")
            paths[rest[i][2:]], i = rest[i + 1], i + 2
        else:
            keep.append(rest[i])
            i += 1
    for key in ("src", "dst"):
        if key not in paths:
            raise ValueError(f"--{key} DIR is required")
    if os.path.abspath(paths["src"]) == os.path.abspath(paths["dst"]):
        raise ValueError(f"--src and --dst must differ, got {paths['src']!r} for both")
    cfg: TrainConfig = parse_args(keep + ["--out", paths["dst"], "--tensorboard", "false"])
    if not cfg.deepspeed:
        raise ValueError("--deepspeed CONFIG is required (the engine layout to convert from/to)")
    src_root = os.path.join(paths["src"], "checkpoints")
    try:
        info = init_distributed(timeout=default_timeout(cfg))
        groups = ParallelGroups.build(cfg.ep_size, timeout=default_timeout(cfg))
        trainer = DeepSpeedTrainer(dataclasses.replace(cfg, resume=False), groups, local_device(info.local_rank))
        if direction == "to-dcp":
            trainer.ckpt_root = src_root
            if trainer.resume() is None:
                raise ValueError(f"--src {paths['src']!r}: no DeepSpeed checkpoint under {src_root}")
            out = export_dcp(trainer, os.path.join(paths["dst"], "checkpoints"))
        else:
            choice = [ckpt.find_latest(src_root) if groups.rank == 0 else None]
            torch.distributed.broadcast_object_list(choice, src=0, group=groups.dp_group)
            if choice[0] is None:
                raise ValueError(f"--src {paths['src']!r}: no complete DCP checkpoint under {src_root}")
            import_dcp(trainer, choice[0])
            out = trainer.save()
        trainer.logger.info(f"converted ({direction}) -> {out}")
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
