"""Training engines: what differs between the plain path and DeepSpeed, behind one interface.

The loop (``trainer.py``) owns everything the paths share: the batch, the loss, the
one all-reduce of loss scalars and routing stats, the non-finite check, capacity tuning,
the router bias update, the LR schedule, the side state of checkpoints (step, capacity
factors, RNG states) and the choice of checkpoint on resume. An :class:`Engine` owns
only the model's optimisation and its checkpoint format:

==================  ===========================================  ==========================
method              :class:`PlainEngine`                         ``DeepSpeedEngine``
==================  ===========================================  ==========================
``forward``         model under ``cfg.dtype``'s autocast          ``deepspeed`` engine call
``backward``        ``loss.backward()`` + dense-DP / expert-EDP  ``engine.backward`` (ZeRO
                    gradient all-reduce (``parallel.py``)        reduces inside)
``step``            global-norm clip, AdamW, zero_grad           ``engine.step`` (clips)
``save`` / ``load`` DCP, per-global-expert keys (reshards EP)    DeepSpeed checkpoint
==================  ===========================================  ==========================

Each engine builds its own optimizer, once. ``factory.make_engine`` picks one.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..checkpoint import manager as ckpt
from ..checkpoint.state import model_state, optimizer_state
from ..distributed.collectives import comm_scope, guard
from ..distributed.device import Precision, resolve_precision
from ..distributed.groups import ParallelGroups
from ..models.transformer import ModelOutput, MoETransformer
from .config import TrainConfig
from .parallel import clip_grad_norm, sync_gradients

Log = Callable[[str], None]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (the plain path's optimizer)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )


class Engine(abc.ABC):
    """One way of optimising the model and checkpointing it (see the module docstring)."""

    kind: str = "engine"

    def __init__(self, cfg: TrainConfig, model: MoETransformer, groups: ParallelGroups,
                 device: torch.device) -> None:
        self.cfg, self.model, self.groups, self.device = cfg, model, groups, device
        self.rank = groups.rank
        self.precision: Precision = resolve_precision("fp32", device)
        """What ``forward`` computes in (logged per step and in summary.json)."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> ModelOutput:
        """The model's output for tokens ``x`` (train or eval mode as set)."""

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss``, reduced over the ranks that share each parameter."""

    @abc.abstractmethod
    def skip_step(self) -> None:
        """Drop this step's gradients without updating (``nonfinite_policy='count'``)."""

    @abc.abstractmethod
    def step(self, lr: float, step: int) -> tuple[float, float]:
        """Apply the gradients of step ``step`` at learning rate ``lr`` (unless the engine
        schedules its own). Returns ``(global gradient norm, learning rate used)``."""

    @abc.abstractmethod
    def save(self, root: str, step: int, extra: Mapping[str, Any], meta: Mapping[str, Any],
             log: Log) -> str:
        """Collective: write a checkpoint of ``step`` under ``root`` with this rank's side
        state ``extra`` (tensors + JSON values); keep ``cfg.keep_checkpoints``. Returns its path."""

    @abc.abstractmethod
    def find_checkpoint(self, root: str, log: Log) -> Optional[str]:
        """The checkpoint a resume should load (called on one rank; no collective)."""

    @abc.abstractmethod
    def inspect(self, path: str) -> int:
        """Check that this rank's files of ``path`` load without running code (raises
        ``UnsafeCheckpointError``); returns the checkpoint's step. No collective."""

    @abc.abstractmethod
    def load(self, path: str) -> None:
        """Collective: load model (and optimizer) state from checkpoint ``path``."""

    def expert_state(self, layer: Any) -> list[torch.Tensor]:
        """Per-slot optimizer state of an MoE layer's experts (stacked ``[slots, ...]``),
        moved along when the layer's placement changes; none by default."""
        return []

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def describe(self) -> str:
        return self.kind


class PlainEngine(Engine):
    """AdamW on every rank, gradients synchronised by ``parallel.py``, DCP checkpoints."""

    kind = "plain"

    def __init__(self, cfg: TrainConfig, model: MoETransformer, groups: ParallelGroups,
                 device: torch.device, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        super().__init__(cfg, model, groups, device)
        self.optimizer = optimizer if optimizer is not None else build_optimizer(model, cfg)
        self.precision = resolve_precision(cfg.dtype, device)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        with self.precision.autocast(self.device.type):
            return self.model(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        # Label the dense collectives too, so a dead peer is a named error here as well.
        with comm_scope("trainer", "grad_sync", "backward"), guard("all_reduce"):
            sync_gradients(self.model, self.groups)

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, lr: float, step: int) -> tuple[float, float]:
        with comm_scope("trainer", "grad_norm", "backward"), guard("all_reduce"):
            norm = clip_grad_norm(self.model, self.groups, self.cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, lr

    def expert_state(self, layer: Any) -> list[torch.Tensor]:
        """The AdamW moments of ``layer``'s expert parameters (created if not yet)."""
        out = []
        for p in layer.experts.parameters():
            state = self.optimizer.state.get(p)
            if state:  # before the first step there is nothing to move
                out += [state["exp_avg"], state["exp_avg_sq"]]
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """Model + AdamW tensors keyed per global expert (``checkpoint/state.py``)."""
        return {**model_state(self.model), **optimizer_state(self.model, self.optimizer)}

    def save(self, root: str, step: int, extra: Mapping[str, Any], meta: Mapping[str, Any],
             log: Log) -> str:
        return ckpt.save_checkpoint(root, step, self.state(), extra, meta, self.rank, self.groups.dp_group,
                                    self.cfg.keep_checkpoints, pause_before_commit_s=self.cfg.fault_save_pause_s,
                                    log=log)

    def find_checkpoint(self, root: str, log: Log) -> Optional[str]:
        return ckpt.find_latest(root, log=log)

    def inspect(self, path: str) -> int:
        return ckpt.inspect_checkpoint(path, rank=self.rank)

    def load(self, path: str) -> None:
        ckpt.load_checkpoint(path, self.state(), self.groups.dp_group)


__all__ = ["Engine", "PlainEngine", "build_optimizer"]
