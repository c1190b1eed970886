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

from ..checkpoint.state import ensure_adam_state
from ..distributed.device import local_device
from ..distributed.groups import ParallelGroups
from ..distributed.launch_env import discover_rank_info, init_distributed, shutdown
from .deepspeed_engine import DeepSpeedEngine
from .engine import PlainEngine, build_optimizer
from .launcher import fail, prepare
from .run_dir import AGREED_ERRORS
from .trainer import Trainer, default_timeout

DIRECTIONS = ("to-dcp", "from-dcp")
PROG = "deepspeed_convert"


def _zero_base_states(engine: DeepSpeedEngine) -> list[dict]:
    """The per-partition AdamW state dicts inside DeepSpeed's ZeRO optimizer."""
    base = engine.engine.optimizer.optimizer
    return [base.state[p] for group in base.param_groups for p in group["params"] if p in base.state]


def _link_zero_adam_state(engine: DeepSpeedEngine) -> None:
    """Make sure the ZeRO partitions have AdamW state and that each parameter's fragment
    points into it, so ``safe_get/set_full_optimizer_state`` work.

    DeepSpeed creates the state lazily at the first ``step()`` and links the fragments
    there (``_lazy_init_hp_params_optimizer_state``, a private method of its ZeRO-1/2
    optimizer); a freshly built or freshly loaded engine has neither yet.
    """
    zero = engine.engine.optimizer
    base = zero.optimizer
    for group in base.param_groups:
        for flat in group["params"]:
            if not base.state[flat]:
                base.state[flat] = {"step": torch.zeros((), dtype=torch.float32),
                                    "exp_avg": torch.zeros_like(flat),
                                    "exp_avg_sq": torch.zeros_like(flat)}
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def export_dcp(trainer: Trainer, dst_root: str) -> str:
    """Collective: write the DeepSpeed engine's full fp32 weights and AdamW state as a DCP
    checkpoint (the plain engine's writer, the loop's side state)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    ds = trainer.engine
    _link_zero_adam_state(ds)
    states = _zero_base_states(ds)
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
    engine = PlainEngine(trainer.cfg, trainer.model, trainer.groups, trainer.device, optimizer=plain)
    return trainer.save(engine=engine, root=dst_root)


def import_dcp(trainer: Trainer, src_root: str) -> int:
    """Collective: load the latest DCP checkpoint under ``src_root`` into the DeepSpeed
    engine's ZeRO shards (any EP size: DCP reshards the experts by key). Returns its step."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    plain = build_optimizer(trainer.model, trainer.cfg)
    ensure_adam_state(plain)
    engine = PlainEngine(trainer.cfg, trainer.model, trainer.groups, trainer.device, optimizer=plain)
    if trainer.resume(engine=engine, root=src_root, check_step=False) is None:
        raise ValueError(f"--src: no complete DCP checkpoint under {src_root}")
    steps = {float(plain.state[p]["step"]) for p in trainer.model.parameters()}
    _link_zero_adam_state(trainer.engine)
    for name, p in trainer.model.named_parameters():
        safe_set_full_fp32_param(p, p.detach().float())
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, plain.state[p][key].float(), key)
    for st in _zero_base_states(trainer.engine):
        st["step"] = torch.full_like(torch.as_tensor(st["step"]), max(steps) if steps else trainer.step)
    return trainer.step


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in DIRECTIONS:
        return fail(0, ValueError(f"first argument must be one of {DIRECTIONS}, got {args[:1]!r}"), PROG)
    direction, rest = args[0], args[1:]
    paths: dict[str, str] = {}
    keep: list[str] = []
    i = 0
    while i < len(rest):
        if rest[i] in ("--src", "--dst"):
            if i + 1 >= len(rest):
                return fail(0, ValueError(f"{rest[i]} needs a directory"), PROG)
            paths[rest[i][2:]], i = rest[i + 1], i + 2
        else:
            keep.append(rest[i])
            i += 1
    info = discover_rank_info()
    try:
        for key in ("src", "dst"):
            if key not in paths:
                raise ValueError(f"--{key} DIR is required")
        if os.path.abspath(paths["src"]) == os.path.abspath(paths["dst"]):
            raise ValueError(f"--src and --dst must differ, got {paths['src']!r} for both")
        cfg = prepare(keep + ["--out", paths["dst"], "--tensorboard", "false"], info, PROG)
        if not cfg.deepspeed:
            raise ValueError("--deepspeed CONFIG is required (the engine layout to convert from/to)")
    except (ValueError, TypeError) as err:
        return fail(info.rank, err, PROG)
    src_root = os.path.join(paths["src"], "checkpoints")
    try:
        info = init_distributed(timeout=default_timeout(cfg))
        groups = ParallelGroups.build(cfg.parallel.ep_size, timeout=default_timeout(cfg))
        trainer = Trainer(dataclasses.replace(cfg, resume=False), groups, local_device(info.local_rank))
        if not isinstance(trainer.engine, DeepSpeedEngine):
            raise ValueError("--deepspeed CONFIG is required")
        if direction == "to-dcp":
            if trainer.resume(root=src_root, check_step=False) is None:
                raise ValueError(f"--src {paths['src']!r}: no DeepSpeed checkpoint under {src_root}")
            out = export_dcp(trainer, os.path.join(paths["dst"], "checkpoints"))
        else:
            import_dcp(trainer, src_root)
            out = trainer.save()
        trainer.logger.info(f"converted ({direction}) -> {out}")
    except AGREED_ERRORS as err:
        return fail(info.rank, err, PROG, named=True)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
