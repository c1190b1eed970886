"""Fine-tune a small Hugging Face Mixtral-architecture model with expert parallelism.

The model is built from a ``MixtralConfig`` (random weights, no download; pass
``--init-from DIR`` to start from a ``save_pretrained`` directory instead), made
expert-parallel with ``replace_moe_blocks`` (each rank keeps E / ep_size experts; the
rest of the model is replicated), trained on the built-in byte corpus (Python stdlib
sources), then gathered back to the HF layout with ``gather_to_hf`` and saved by rank 0
with ``save_pretrained``. ``<out>/finetune.json`` records the losses, the collapse
metrics per MoE block and the check that the saved HF model reproduces the
expert-parallel model's logits.

Examples (from the repository root; needs ``pip install transformers``)::

    # 2 ranks, experts sharded 2 ways, 30 steps
    torchrun --nproc_per_node=2 launch/finetune_mixtral.py --steps 30 --out runs/mixtral

    # 4 ranks: EP=2 x data-parallel 2, capacity factor 1.25 (drops allowed)
    torchrun --nproc_per_node=4 launch/finetune_mixtral.py --ep-size 2 --capacity-factor 1.25

    # one process (EP=1)
    python launch/finetune_mixtral.py --steps 5

Every other supported family (Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS) and
any MoEConfig override: ``launch/finetune_hf.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record

from expert_parallel.config import _check_float, _check_int
from expert_parallel.distributed.device import local_device
from expert_parallel.distributed.groups import ParallelGroups
from expert_parallel.distributed.launch_env import init_distributed, shutdown
from expert_parallel.moe.metrics import CollapseConfig, CollapseTracker
from expert_parallel.training.data import BatchSampler, load_builtin_corpus
from expert_parallel.training.parallel import clip_grad_norm, sync_gradients


@dataclass(frozen=True)
class FinetuneConfig:
    """Options of the Mixtral fine-tuning example (each is a ``--flag``)."""

    out: str = "runs/finetune_mixtral"
    """Output directory (finetune.json, hf_model/)."""
    ep_size: int = 0
    """Expert-parallel size; 0 = all ranks (world size)."""
    steps: int = 30
    """Optimizer steps."""
    seq_len: int = 64
    """Tokens (bytes) per sequence."""
    global_batch: int = 8
    """Sequences per step over all ranks (divisible by the world size)."""
    lr: float = 3e-3
    """AdamW learning rate."""
    hidden_size: int = 64
    """Mixtral hidden size (ignored with --init-from)."""
    intermediate_size: int = 96
    """Expert ffn size (ignored with --init-from)."""
    layers: int = 2
    """Decoder layers (ignored with --init-from)."""
    experts: int = 8
    """num_local_experts (ignored with --init-from)."""
    top_k: int = 2
    """num_experts_per_tok (ignored with --init-from)."""
    capacity_factor: Optional[float] = None
    """None = dropless (exactly the HF computation); a float caps each expert."""
    aux_loss_coeff: float = 0.01
    """Load-balancing loss coefficient of the expert-parallel blocks."""
    seed: int = 0
    """Seed of the model init (same on every rank) and of the batches."""
    init_from: str = ""
    """A save_pretrained directory to start from instead of a random model."""
    save: bool = True
    """Gather to the HF layout at the end and save it under <out>/hf_model (rank 0)."""

    def __post_init__(self) -> None:
        for name in ("ep_size",):
            _check_int(name, getattr(self, name), 0)
        for name in ("steps", "seq_len", "global_batch", "hidden_size", "intermediate_size",
                     "layers", "experts", "top_k"):
            _check_int(name, getattr(self, name), 1)
        _check_float("lr", self.lr, 0.0, strict=True)
        _check_float("aux_loss_coeff", self.aux_loss_coeff, 0.0, strict=False)
        if self.capacity_factor is not None:
            _check_float("capacity_factor", self.capacity_factor, 0.0, strict=True)


def parse_args(argv: list[str]) -> FinetuneConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif f.name == "capacity_factor":
            parser.add_argument(flag, type=lambda s: None if s.lower() == "none" else float(s),
                                default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            parser.add_argument(flag, type=kind, default=f.default)
    return FinetuneConfig(**vars(parser.parse_args(argv)))


def build_model(cfg: FinetuneConfig, vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(cfg.seed)  # identical replicated weights on every rank
    if cfg.init_from:
        return MixtralForCausalLM.from_pretrained(cfg.init_from, torch_dtype=torch.float32)
    hf_cfg = MixtralConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=cfg.experts, num_experts_per_tok=cfg.top_k,
        max_position_embeddings=max(128, cfg.seq_len), tie_word_embeddings=False)
    return MixtralForCausalLM(hf_cfg)


def mean_over_ranks(value: torch.Tensor, groups: ParallelGroups) -> float:
    value = value.detach().float().reshape(1).clone()
    if groups.dp_group is not None:
        dist.all_reduce(value, group=groups.dp_group)
    return float(value) / groups.world_size


def train(cfg: FinetuneConfig, groups: ParallelGroups, device: torch.device) -> dict:
    from expert_parallel.interop.hf_mixtral import (
        gather_to_hf, moe_aux_loss, moe_stats, replace_moe_blocks)

    data = load_builtin_corpus()
    model = build_model(cfg, data.vocab_size).to(device)
    vocab = model.config.vocab_size
    names = replace_moe_blocks(model, groups, seed=cfg.seed, capacity_factor=cfg.capacity_factor,
                               aux_loss_coeff=cfg.aux_loss_coeff)
    sampler = BatchSampler(data.train, cfg.seq_len, cfg.global_batch, groups.rank,
                           groups.world_size, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    tracker = CollapseTracker(CollapseConfig(window=10))
    history = []
    model.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        x, y = sampler.batch(step, device)
        logits = model(input_ids=x).logits  # our own CE: HF's labels= would shift again
        ce = F.cross_entropy(logits.reshape(-1, vocab).float(), y.reshape(-1))
        aux = moe_aux_loss(model)
        opt.zero_grad(set_to_none=False)
        (ce + aux).backward()
        sync_gradients(model, groups)
        grad_norm = clip_grad_norm(model, groups, 1.0)
        opt.step()
        stats = {n: s.reduce(groups.dp_group) for n, s in moe_stats(model).items()}
        tracker.update(stats)
        rec = {"step": step, "loss": mean_over_ranks(ce, groups), "aux_loss": mean_over_ranks(aux, groups),
               "grad_norm": grad_norm, "step_time_s": time.perf_counter() - t0,
               "drop_fraction": {n: s.drop_fraction for n, s in stats.items()}}
        history.append(rec)
        if groups.rank == 0:
            print(f"step {step:4d} | loss {rec['loss']:.4f} | aux {rec['aux_loss']:.4f} | "
                  f"{rec['step_time_s']:.2f}s", flush=True)

    # Same probe batch on every rank: logits of the EP model, then of the gathered HF model.
    model.eval()
    probe = torch.from_numpy(data.val[: 2 * cfg.seq_len].astype("int64")).view(2, cfg.seq_len).to(device)
    with torch.no_grad():
        ep_logits = model(input_ids=probe).logits
    collapse = tracker.summary()
    gather_to_hf(model, groups)
    with torch.no_grad():
        hf_logits = model(input_ids=probe).logits
    result = {
        "config": asdict(cfg), "world_size": groups.world_size, "ep_size": groups.ep_size,
        "replaced_blocks": names, "history": history, "collapse": collapse,
        "final_loss": history[-1]["loss"], "first_loss": history[0]["loss"],
        "gathered_vs_ep_logits_max_abs_diff": (ep_logits - hf_logits).abs().max().item(),
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "transformers": __import__("transformers").__version__},
    }
    if groups.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.save:
            hf_dir = os.path.join(cfg.out, "hf_model")
            model.save_pretrained(hf_dir)
            torch.save(probe.cpu(), os.path.join(cfg.out, "probe_ids.pt"))
            torch.save(hf_logits.cpu(), os.path.join(cfg.out, "probe_logits.pt"))
            result["hf_model"] = hf_dir
        tmp = os.path.join(cfg.out, "finetune.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, os.path.join(cfg.out, "finetune.json"))
        print(f"loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}; "
              f"wrote {os.path.join(cfg.out, 'finetune.json')}", flush=True)
    return result


@record
def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)  # bad options fail before rendezvous
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        info = init_distributed(timeout=timedelta(minutes=5))
        world = info.world_size
        ep = cfg.ep_size or world
        groups = ParallelGroups.build(ep, timeout=timedelta(minutes=5))
        train(cfg, groups, local_device(info.local_rank))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
