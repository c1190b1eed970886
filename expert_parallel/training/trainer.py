"""The training loop behind ``launch/train.py``, written once for every engine.

One step: stateless global batch -> ``engine.forward`` -> cross-entropy + MoE aux losses
-> ``engine.backward`` (gradient reduction) -> one all-reduce of loss scalars and every
layer's routing stats -> non-finite check (raise, or skip the step under
``nonfinite_policy='count'``) -> capacity tuning -> ``engine.step`` (clip + optimizer,
warmup + cosine LR) -> router bias update. Rank 0 logs a progress line,
``metrics.jsonl`` and TensorBoard. Checkpoints carry the loop's side state (step,
capacity factors, RNG states) as tensors + JSON next to the engine's own format.

Resume: rank 0 picks the checkpoint; every rank checks that its files load without
running code; all ranks agree on the outcome before the collective load, so a refused
checkpoint is the same named error everywhere (``run_dir.AGREED_ERRORS``).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import NonFiniteRouterError
from ..checkpoint.extra import capture_rng, load_extra, restore_rng
from ..checkpoint.safe_load import UnsafeCheckpointError
from ..distributed.collectives import CollectiveError, comm_scope, guard
from ..distributed.consensus import check_consensus
from ..distributed.groups import ParallelGroups
from ..models.generation import decode, encode, generate
from ..models.transformer import MoETransformer
from ..moe.capacity_tuner import CapacityTuner
from ..moe.stats import MoEStats
from ..profiling.timer import A2A_PHASES, PhaseTimer
from .config import TrainConfig
from .balancer import Balancer
from .data import BatchSampler, load_data
from .engine import Engine
from .factory import make_engine
from .host_memory import active_allocator
from .report import RunLogger, phase_groups
from .run_dir import AGREED_ERRORS, check_resume_step, check_run_dir, clear_run, last_step


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def describe_dispatch(model: MoETransformer) -> str:
    """Which dispatcher the MoE layers run (``Dispatcher.describe()``), e.g. ``all_to_all``."""
    names = {layer.dispatcher.describe() for layer in model.moe_layers().values()}
    return ",".join(sorted(names)) or "none"


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
        if cfg.parallel.ep_size not in ("auto", groups.ep_size):
            raise ValueError(f"ep_size={cfg.parallel.ep_size} but the process groups have "
                             f"ep_size={groups.ep_size}")
        check_consensus("run config", {**cfg.flat_dict(), "out": None, "world_size": self.world},
                        groups.dp_group)
        check_run_dir(cfg)  # reads only: identical on every rank
        self.data = load_data(cfg.data, cfg.model.vocab_size, cfg.model.seq_len)
        self.train_sampler = BatchSampler(self.data.train, cfg.model.seq_len, cfg.global_batch_size,
                                          self.rank, self.world, cfg.seed, stream=0)
        self.val_sampler = BatchSampler(self.data.val, cfg.model.seq_len, cfg.global_batch_size,
                                        self.rank, self.world, cfg.seed, stream=1)
        self.model = MoETransformer(cfg.model, groups, seed=cfg.seed).to(device)
        self.engine = make_engine(cfg, self.model, groups, device)
        self.timer = PhaseTimer(device)
        for layer in self.model.moe_layers().values():
            layer.set_timer(self.timer)
        self.step = 0
        self.grad_norm = 0.0
        self.lr = 0.0
        self.ckpt_root = os.path.join(cfg.out, "checkpoints")
        self.dispatch = describe_dispatch(self.model)
        self.ranks_per_node = cfg.parallel.ranks_per_node or groups.ranks_per_node or None
        self.precision = self.engine.precision
        self.logger = RunLogger(cfg, self.rank == 0,
                                context=f"{self.dispatch} ep={groups.ep_size} rpn={self.ranks_per_node} "
                                        f"{self.precision.name}")
        self.logger.info(f"precision: {self.precision.name} (dtype={cfg.dtype}: {self.precision.reason})")
        self.balancer = Balancer(self.model.moe_layers(), groups, cfg.rebalance_every, cfg.rebalance_window,
                                 cfg.replica_check_every, self.logger.info)
        self.tuners = {}
        if cfg.tuner.target_drop is not None:
            self.tuners = {name: CapacityTuner(layer.config, cfg.tuner)
                           for name, layer in self.model.moe_layers().items()}

    # -- one step ----------------------------------------------------------------
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

    def _loss(self, x: torch.Tensor, y: torch.Tensor):
        out = self.engine.forward(x)
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1))
        return ce, out

    def train_step(self) -> StepResult:
        cfg = self.cfg
        self.engine.train()
        x, y = self.train_sampler.batch(self.step, self.device)
        try:
            ce, out = self._loss(x, y)
        except NonFiniteRouterError as err:
            # Raised on every EP rank together (the flag rides in the count exchange).
            raise NonFiniteRouterError(
                f"step {self.step}: {err}; set nonfinite_policy=count to skip such steps") from None
        self.engine.backward(ce + out.aux_loss)
        with comm_scope("trainer", "stats_all_reduce", "forward"), guard("all_reduce"):
            (loss, aux), stats = self._reduce([ce, out.aux_loss], out.stats)
        self._tune_capacity(out.stats)
        bad = [n for n, s in stats.items() if int(s.nonfinite)]
        if bad or not math.isfinite(loss):
            if cfg.moe.nonfinite_policy == "raise":
                raise FloatingPointError(f"step {self.step}: non-finite loss or router logits (layers: {bad}); "
                                         "set nonfinite_policy=count to skip such steps")
            self.engine.skip_step()
            self.lr = lr_at(cfg, self.step)
            return StepResult(loss, aux, stats, skipped=True)
        self.grad_norm, self.lr = self.engine.step(lr_at(cfg, self.step), self.step + 1)
        self.balancer.observe(stats)
        if cfg.moe.bias_update_rate > 0:
            for name, layer in self.model.moe_layers().items():
                layer.update_expert_bias(stats[name])
        return StepResult(loss, aux, stats, skipped=False)

    def _tune_capacity(self, local_stats: dict[str, MoEStats]) -> None:
        """Feed the auto-tuners; every ``tune_every`` steps apply their choice (one small
        all-reduce per layer, so all ranks set the same factor)."""
        if not self.tuners:
            return
        for name, tuner in self.tuners.items():
            tuner.observe(local_stats[name])
        if (self.step + 1) % self.cfg.tuner.tune_every == 0:
            layers = self.model.moe_layers()
            for name, tuner in self.tuners.items():
                factor = tuner.propose(self.groups.dp_group)
                if factor is not None:
                    layers[name].set_capacity_factor(factor)
            self.logger.info("capacity factors: " + ", ".join(
                f"{n}={l.config.capacity_factor}" for n, l in layers.items()))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(self.cfg.eval_batches):
            x, y = self.val_sampler.batch(i, self.device)
            ce, _ = self._loss(x, y)
            total += ce.double()
        if self.groups.dp_group is not None:
            dist.all_reduce(total, group=self.groups.dp_group)
        self.engine.train()
        return float(total) / (self.cfg.eval_batches * self.world)

    # -- checkpoints ----------------------------------------------------------------
    def save(self, engine: Optional[Engine] = None, root: Optional[str] = None) -> str:
        """Collective: checkpoint the current step through ``engine`` (default: the run's)
        under ``root`` (default ``OUT/checkpoints``). The converter passes both."""
        engine = engine or self.engine
        extra = {
            "step": self.step, "world_size": self.world, "ep_size": self.groups.ep_size,
            # Tuned capacity factors are training state too.
            "capacity_factors": {n: l.config.capacity_factor for n, l in self.model.moe_layers().items()},
            "placement": self.balancer.tables(),  # where the experts live (restored at the same EP size)
            **capture_rng(),
        }
        meta = {"world_size": self.world, "ep_size": self.groups.ep_size, "engine": engine.kind,
                "config_fingerprint": self.cfg.fingerprint(), "data_step": self.step}
        return engine.save(root or self.ckpt_root, self.step, extra, meta, self.logger.info)

    def _agree(self, error: Optional[BaseException]) -> None:
        """Collective over DP: when any rank holds an error, every rank raises the first."""
        payload = None if error is None else (type(error).__name__, str(error))
        gathered = [payload]
        if self.groups.dp_group is not None:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, payload, group=self.groups.dp_group)
        kinds = {cls.__name__: cls for cls in AGREED_ERRORS}
        for item in gathered:
            if item is not None:
                raise kinds[item[0]](item[1])

    def resume(self, engine: Optional[Engine] = None, root: Optional[str] = None,
               check_step: bool = True) -> Optional[str]:
        """Collective: load the latest checkpoint under ``root`` (default
        ``OUT/checkpoints``) through ``engine`` (default: the run's); None when there is
        none. ``check_step``: refuse one at or past the last step (``ResumeError``); the
        converter, which trains nothing, turns that off."""
        engine = engine or self.engine
        root = root or self.ckpt_root
        path, error = None, None
        if self.rank == 0:  # one rank decides, so every rank loads the same checkpoint
            try:
                path = engine.find_checkpoint(root, self.logger.info)
            except AGREED_ERRORS as err:
                error = err
        self._agree(error)
        choice = [path]
        if self.groups.dp_group is not None:
            dist.broadcast_object_list(choice, src=0, group=self.groups.dp_group)
        path = choice[0]
        if path is None:
            self.logger.info(f"no checkpoint under {root}; starting from step 0")
            return None
        step, error = 0, None
        try:
            step = engine.inspect(path)  # this rank's files, before anything is loaded
        except UnsafeCheckpointError as err:
            error = err
        self._agree(error)
        if check_step:
            check_resume_step(self.cfg, path, step)
        extra = load_extra(path, self.rank) or load_extra(path, 0) or {}
        if extra.get("ep_size") == self.groups.ep_size and extra.get("placement"):
            self.balancer.restore(extra["placement"], self.logger.info)  # slots first, then their weights
        engine.load(path)
        self.step = step
        if self.tuners and "capacity_factors" in extra:
            for name, layer in self.model.moe_layers().items():
                layer.set_capacity_factor(extra["capacity_factors"][name])
        if extra.get("world_size") == self.world and "rng_torch" in extra:
            restore_rng(extra)  # same world: this rank continues its own streams
        self.logger.info(f"resumed from {path} at step {self.step} "
                         f"(written at world {extra.get('world_size')}, ep {extra.get('ep_size')})")
        return path

    def _prepare_out(self) -> None:
        """``--overwrite``: rank 0 removes the old run before anything is written."""
        if self.cfg.overwrite and self.rank == 0:
            removed = clear_run(self.cfg.out)
            if removed:
                self.logger.info(f"--overwrite: removed {', '.join(removed)} from {self.cfg.out}")
        if self.groups.dp_group is not None:
            dist.barrier(group=self.groups.dp_group)

    # -- the run ------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        self._prepare_out()
        if cfg.resume:
            self.resume()
        self.logger.start()
        tokens_per_step = cfg.global_batch_size * cfg.model.seq_len
        # Baseline before any update (about ln(vocab) for the untrained model).
        initial_val_loss = self.evaluate() if self.step == 0 else None
        val_loss = None
        run_t0 = time.perf_counter()
        steps_done = 0
        phase_totals: dict[str, float] = {}  # this rank's seconds per report phase group
        end = last_step(cfg)
        while self.step < end:
            self.timer.collect()
            t0 = time.perf_counter()
            try:
                result = self.train_step()
            except CollectiveError as err:
                raise CollectiveError(f"step {self.step}: {err}") from err
            dt = time.perf_counter() - t0
            phases = self.timer.collect()
            a2a = sum(phases.get(p, 0.0) + phases.get(p + ".bwd", 0.0) for p in A2A_PHASES)
            for group, seconds in phase_groups(phases, dt).items():
                phase_totals[group] = phase_totals.get(group, 0.0) + seconds
            self.step += 1
            steps_done += 1
            if not result.skipped:
                self.balancer.maybe_rebalance(self.step, self.engine.expert_state)
                self.balancer.maybe_check(self.step)
            evaluated = self.step % cfg.eval_every == 0 or self.step == end
            if evaluated:
                val_loss = self.evaluate()
            self.logger.log_step(self.step, result, self.lr, dt, tokens_per_step / dt,
                                 a2a / dt if dt > 0 else 0.0, self.grad_norm, phases,
                                 val_loss if evaluated else None)
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == end:
                self.logger.info(f"checkpoint: {self.save()}")
        elapsed = time.perf_counter() - run_t0
        if val_loss is None:
            val_loss = self.evaluate()
        per_rank = self._per_rank_phases(phase_totals, steps_done)
        sample = self.sample()
        return self.logger.finish(
            world_size=self.world, ep_size=self.groups.ep_size, ranks_per_node=self.ranks_per_node,
            dispatcher=self.dispatch, engine=self.engine.describe(), precision=self.precision.to_dict(),
            steps=self.step,
            steps_this_run=steps_done, initial_val_loss=initial_val_loss, final_val_loss=val_loss,
            tokens_per_s=(steps_done * tokens_per_step / elapsed) if steps_done and elapsed > 0 else 0.0,
            elapsed_s=elapsed, data_source=self.data.source, host_allocator=active_allocator(),
            rebalances=self.balancer.history, per_rank=per_rank, sample=sample,
        )

    def _per_rank_phases(self, totals: dict[str, float], steps: int) -> dict:
        """Collective over DP, once per run: every rank's mean step time per report phase
        group (``{"phases_s": {group: [seconds per rank]}, "steps": n}``) for the report's
        slowest-rank panel."""
        names = list(phase_groups({}, 0.0))
        mine = torch.tensor([totals.get(n, 0.0) / max(steps, 1) for n in names], dtype=torch.float64,
                            device=self.device)
        rows = [mine]
        if self.groups.dp_group is not None:
            rows = [torch.zeros_like(mine) for _ in range(self.world)]
            with comm_scope("trainer", "per_rank_phases", "forward"), guard("all_gather"):
                dist.all_gather(rows, mine, group=self.groups.dp_group)
        return {"phases_s": {n: [float(r[i]) for r in rows] for i, n in enumerate(names)}, "steps": steps}

    def sample(self) -> Optional[dict]:
        """Collective: the trained model's greedy continuation of ``sample_prompt`` (KV
        cache; every rank decodes the same text, rank 0's tokens broadcast). None without
        ``sample_tokens`` or for token data that is not byte-level (a .bin)."""
        cfg = self.cfg
        prompt = encode(cfg.sample_prompt)[: cfg.model.seq_len]
        n = min(cfg.sample_tokens, cfg.model.seq_len - len(prompt) + 1)
        if n < 1 or not prompt or (cfg.data or "").endswith(".bin") or cfg.model.vocab_size < 256:
            return None
        x = torch.tensor([prompt], dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        result = generate(self.model, x, n, sync_group=self.groups.dp_group, autocast=self.precision.autocast)
        seconds = time.perf_counter() - t0
        self.engine.train()
        return {"prompt": cfg.sample_prompt, "text": decode(result.tokens_BN[0].tolist()), "tokens": n,
                "tokens_per_s": n / seconds if seconds > 0 else None}


def run(cfg: TrainConfig, groups: ParallelGroups, device: torch.device) -> dict:
    if groups.rank == 0:
        print(f"host allocator: {active_allocator()} (host_allocator={cfg.host_allocator})", flush=True)
    torch.manual_seed(cfg.seed + groups.rank)
    np.random.seed((cfg.seed + groups.rank) % (2**32))
    random.seed(cfg.seed + groups.rank)
    return Trainer(cfg, groups, device).fit()


def default_timeout(cfg: TrainConfig) -> timedelta:
    return timedelta(seconds=cfg.collective_timeout_s)


__all__ = ["Trainer", "StepResult", "run", "lr_at", "default_timeout", "describe_dispatch"]
