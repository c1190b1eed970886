"""The training loop behind ``launch/train.py``.

One step: stateless global batch -> forward (bf16 autocast on GPU, fp32 on CPU) ->
cross-entropy + MoE aux losses -> backward -> gradient sync (dense over DP, experts over
expert-DP) -> one all-reduce of loss scalars and every layer's routing stats ->
non-finite check -> global-norm clipping -> AdamW with warmup + cosine LR.
Rank 0 logs a progress line, ``metrics.jsonl`` and TensorBoard; checkpoints are
atomic and EP-resharding (``expert_parallel.checkpoint``).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..checkpoint import manager as ckpt
from ..checkpoint.state import model_state, optimizer_state
from ..distributed.collectives import CollectiveError, comm_scope, guard
from ..distributed.consensus import check_consensus
from ..distributed.device import autocast_dtype
from ..distributed.groups import ParallelGroups
from ..models.transformer import MoETransformer
from ..moe.capacity_tuner import CapacityTuner
from ..moe.dispatcher import NonFiniteRouterError
from ..moe.stats import MoEStats
from ..profiling.timer import PhaseTimer
from .config import TrainConfig
from .data import BatchSampler, load_data
from .host_memory import active_allocator
from .parallel import clip_grad_norm, sync_gradients
from .report import RunLogger

A2A_PHASES = ("count_exchange", "dispatch_a2a", "combine_a2a")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )


@dataclass
class StepResult:
    loss: float
    aux_loss: float
    stats: dict[str, MoEStats]
    skipped: bool


class Trainer:
    def __init__(self, cfg: TrainConfig, groups: ParallelGroups, device: torch.device) -> None:
        self.cfg, self.groups, self.device = cfg, groups, device
        self.rank, self.world = groups.rank, groups.world_size
        check_consensus("run config", {**cfg.to_dict(), "out": None, "world_size": self.world},
                        groups.dp_group)
        self.data = load_data(cfg.data, cfg.vocab_size, cfg.seq_len)
        self.train_sampler = BatchSampler(self.data.train, cfg.seq_len, cfg.global_batch_size,
                                          self.rank, self.world, cfg.seed, stream=0)
        self.val_sampler = BatchSampler(self.data.val, cfg.seq_len, cfg.global_batch_size,
                                        self.rank, self.world, cfg.seed, stream=1)
        self.model = MoETransformer(cfg.model_config(), groups, seed=cfg.seed).to(device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.timer = PhaseTimer(device)
        for layer in self.model.moe_layers().values():
            layer.set_timer(self.timer)
        self.step = 0
        self.grad_norm = 0.0
        self.ckpt_root = os.path.join(cfg.out, "checkpoints")
        self.logger = RunLogger(cfg, self.rank == 0)
        self.tuners = {}
        if cfg.capacity_target_drop is not None:
            self.tuners = {name: CapacityTuner(layer.config, cfg.tuner_config())
                           for name, layer in self.model.moe_layers().items()}
        self.autocast = autocast_dtype(device)

    # -- one step ----------------------------------------------------------------
    def _loss(self, x: torch.Tensor, y: torch.Tensor):
        ctx = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else torch.autocast(self.device.type, enabled=False))
        with ctx:
            out = self.model(x)
            ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        return ce, out

    def _reduce(self, scalars: list[torch.Tensor], stats: dict[str, MoEStats]):
        """One all-reduce (sum over DP) of the loss scalars and every layer's stats."""
        parts = [torch.stack([s.detach().double() for s in scalars])]
        parts += [s._flat() for s in stats.values()]
        flat = torch.cat(parts)
        if self.groups.dp_group is not None:
            dist.all_reduce(flat, group=self.groups.dp_group)
        n = len(scalars)
        sums = (flat[:n] / self.world).tolist()
        reduced, offset = {}, n
        for name, s in stats.items():
            size = s._flat().numel()
            reduced[name] = s._unflat(flat[offset : offset + size])
            offset += size
        return sums, reduced

    def train_step(self) -> StepResult:
        cfg = self.cfg
        self.model.train()
        x, y = self.train_sampler.batch(self.step, self.device)
        try:
            ce, out = self._loss(x, y)
        except NonFiniteRouterError as err:
            # Raised on every EP rank together (the flag rides in the count exchange).
            raise NonFiniteRouterError(
                f"step {self.step}: {err}; set nonfinite_policy=skip to skip such steps"
            ) from None
        (ce + out.aux_loss).backward()
        # Label the dense collectives too, so a dead peer is a named error here as well.
        with comm_scope("trainer", "grad_sync", "backward"), guard("all_reduce"):
            sync_gradients(self.model, self.groups)
        with comm_scope("trainer", "stats_all_reduce", "forward"), guard("all_reduce"):
            (loss, aux), stats = self._reduce([ce, out.aux_loss], out.stats)
        self._tune_capacity(out.stats)
        nonfinite = sum(int(s.nonfinite) for s in stats.values()) or (not math.isfinite(loss))
        if nonfinite:
            if cfg.nonfinite_policy == "raise":
                raise FloatingPointError(
                    f"step {self.step}: non-finite loss or router logits "
                    f"(layers: {[n for n, s in stats.items() if int(s.nonfinite)]}); "
                    "set nonfinite_policy=skip to skip such steps"
                )
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss, aux, stats, skipped=True)
        with comm_scope("trainer", "grad_norm", "backward"), guard("all_reduce"):
            self.grad_norm = clip_grad_norm(self.model, self.groups, cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.bias_update_rate > 0:
            for name, layer in self.model.moe_layers().items():
                layer.update_expert_bias(stats[name])
        return StepResult(loss, aux, stats, skipped=False)

    def _tune_capacity(self, local_stats: dict[str, MoEStats]) -> None:
        """Feed the auto-tuners; every ``capacity_tune_every`` steps apply their choice
        (one small all-reduce per layer, so all ranks set the same factor)."""
        if not self.tuners:
            return
        for name, tuner in self.tuners.items():
            tuner.observe(local_stats[name])
        if (self.step + 1) % self.cfg.capacity_tune_every == 0:
            layers = self.model.moe_layers()
            for name, tuner in self.tuners.items():
                factor = tuner.propose(self.groups.dp_group)
                if factor is not None:
                    layers[name].set_capacity_factor(factor)
            self.logger.info("capacity factors: " + ", ".join(
                f"{n}={l.config.capacity_factor}" for n, l in layers.items()))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(self.cfg.eval_batches):
            x, y = self.val_sampler.batch(i, self.device)
            ce, _ = self._loss(x, y)
            total += ce.double()
        if self.groups.dp_group is not None:
            dist.all_reduce(total, group=self.groups.dp_group)
        self.model.train()
        return float(total) / (self.cfg.eval_batches * self.world)

    # -- checkpoints ----------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {**model_state(self.model), **optimizer_state(self.model, self.optimizer)}

    def save(self) -> str:
        extra = {
            "step": self.step,
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": np.random.get_state(),
            "rng_python": random.getstate(),
            # Tuned capacity factors are training state too.
            "capacity_factors": {n: l.config.capacity_factor
                                 for n, l in self.model.moe_layers().items()},
        }
        meta = {"world_size": self.world, "ep_size": self.groups.ep_size,
                "config_fingerprint": self.cfg.fingerprint(), "data_step": self.step}
        return ckpt.save_checkpoint(self.ckpt_root, self.step, self._state(), extra, meta,
                                    self.rank, self.groups.dp_group, self.cfg.keep_checkpoints,
                                    pause_before_commit_s=self.cfg.fault_save_pause_s)

    def resume(self) -> Optional[str]:
        choice = [ckpt.find_latest(self.ckpt_root, log=self.logger.info) if self.rank == 0 else None]
        if self.groups.dp_group is not None:
            # Rank 0 decides so every rank loads the same checkpoint.
            dist.broadcast_object_list(choice, src=0, group=self.groups.dp_group)
        path = choice[0]
        if path is None:
            self.logger.info(f"no checkpoint under {self.ckpt_root}; starting from step 0")
            return None
        ckpt.load_checkpoint(path, self._state(), self.groups.dp_group)
        manifest = ckpt.read_manifest(path)
        self.step = int(manifest["step"])
        extra = ckpt.load_extra(path, self.rank) or ckpt.load_extra(path, 0)
        if extra is not None and self.tuners:
            for name, layer in self.model.moe_layers().items():
                layer.set_capacity_factor(extra["capacity_factors"][name])
        if extra is not None and manifest.get("world_size") == self.world:
            torch.set_rng_state(extra["rng_torch"])
            np.random.set_state(extra["rng_numpy"])
            random.setstate(extra["rng_python"])
        self.logger.info(f"resumed from {path} at step {self.step} "
                         f"(written at world {manifest.get('world_size')}, ep {manifest.get('ep_size')})")
        return path

    def step_lr(self) -> float:
        """The learning rate the step just taken used (the DeepSpeed trainer overrides:
        there a scheduler from its config may set it)."""
        return lr_at(self.cfg, self.step - 1)

    # -- the run ------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        if cfg.resume:
            self.resume()
        tokens_per_step = cfg.global_batch_size * cfg.seq_len
        # Baseline before any update (about ln(vocab) for the untrained model).
        initial_val_loss = self.evaluate() if self.step == 0 else None
        val_loss = None
        run_t0 = time.perf_counter()
        steps_done = 0
        last_step = min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps
        while self.step < last_step:
            self.timer.collect()
            t0 = time.perf_counter()
            try:
                result = self.train_step()
            except CollectiveError as err:
                raise CollectiveError(f"step {self.step}: {err}") from err
            dt = time.perf_counter() - t0
            phases = self.timer.collect()
            a2a = sum(phases.get(p, 0.0) + phases.get(p + ".bwd", 0.0) for p in A2A_PHASES)
            self.step += 1
            steps_done += 1
            evaluated = self.step % cfg.eval_every == 0 or self.step == last_step
            if evaluated:
                val_loss = self.evaluate()
            self.logger.log_step(self.step, result, self.step_lr(), dt,
                                 tokens_per_step / dt, a2a / dt if dt > 0 else 0.0,
                                 self.grad_norm, phases, val_loss if evaluated else None)
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == last_step:
                path = self.save()
                self.logger.info(f"checkpoint: {path}")
        elapsed = time.perf_counter() - run_t0
        if val_loss is None:
            val_loss = self.evaluate()
        summary = self.logger.finish(
            world_size=self.world, ep_size=self.groups.ep_size, steps=self.step,
            steps_this_run=steps_done, initial_val_loss=initial_val_loss, final_val_loss=val_loss,
            tokens_per_s=(steps_done * tokens_per_step / elapsed) if steps_done and elapsed > 0 else 0.0,
            elapsed_s=elapsed, data_source=self.data.source, host_allocator=active_allocator(),
        )
        return summary


def run(cfg: TrainConfig, groups: ParallelGroups, device: torch.device) -> dict:
    if groups.rank == 0:
        print(f"host allocator: {active_allocator()} (host_allocator={cfg.host_allocator})", flush=True)
    torch.manual_seed(cfg.seed + groups.rank)
    np.random.seed((cfg.seed + groups.rank) % (2**32))
    random.seed(cfg.seed + groups.rank)
    if cfg.deepspeed:
        from .deepspeed_engine import DeepSpeedTrainer  # optional dependency

        return DeepSpeedTrainer(cfg, groups, device).fit()
    return Trainer(cfg, groups, device).fit()


def default_timeout(cfg: TrainConfig) -> timedelta:
    return timedelta(seconds=cfg.collective_timeout_s)


__all__ = ["Trainer", "run", "lr_at", "default_timeout"]
