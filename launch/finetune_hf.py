"""Fine-tune any supported Hugging Face MoE model with expert parallelism.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, and other models whose
blocks have one of their layouts (``expert_parallel/interop/hf``). The model comes from
``--model DIR`` (a ``save_pretrained`` directory), from ``--model-config FILE`` (a JSON
transformers config with its ``model_type``: random weights, no download), or from
``--family NAME`` with the ``--hidden-size/--ffn/--experts/--top-k/--layers`` sizes (a
small random model). ``replace_moe_blocks`` then keeps E / ep_size experts per rank (the
rest of the model is replicated); with no MoE option the layers compute exactly HF's
function (dropless), and every ``MoEConfig`` field is an option here to change that
(``--capacity-factor 1.25``, ``--overlap-chunks 2``, ``--router noisy_topk``, ...).

Training runs on the built-in byte corpus (Python stdlib sources) or ``--data`` (as the
launcher's). Each step prints loss, aux loss, drop %, all-to-all share and tokens/s, and
rank 0 appends the same record to ``<out>/metrics.jsonl`` with the per-block drop
fractions and collapse metrics (routing entropy, dead experts, top expert share, router
confidence) -- as ``launch/train.py`` logs them. At the end the experts are gathered back
(``gather_to_hf``), rank 0 calls ``save_pretrained(<out>/hf_model)``, reloads it with plain
``transformers`` and checks its logits on a probe batch against the expert-parallel
model's; ``<out>/finetune.json`` records everything.

Examples (repository root; needs ``pip install -e ".[hf]"``)::

    # Qwen3-MoE-architecture random model, 2 ranks, EP=2
    torchrun --nproc_per_node=2 launch/finetune_hf.py --family qwen3_moe --steps 20 --out runs/qwen3

    # DeepSeek-V3 from a JSON config, 4 ranks, EP=2 x DP=2, capacity factor 1.25
    torchrun --nproc_per_node=4 launch/finetune_hf.py --model-config my_deepseek.json --ep-size 2 \\
        --capacity-factor 1.25 --out runs/dsv3

    # a saved model on a SLURM allocation (srun starts one task per rank)
    srun --ntasks=8 python launch/finetune_hf.py --model /path/to/hf_dir --ep-size 8 --out runs/ft

    # one process (EP=1)
    python launch/finetune_hf.py --family gpt_oss --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Optional, get_type_hints

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record

from expert_parallel.config import MoEConfig, _check_float, _check_int
from expert_parallel.distributed.device import local_device
from expert_parallel.distributed.groups import ParallelGroups
from expert_parallel.distributed.launch_env import init_distributed, shutdown
from expert_parallel.interop.hf.small import MODEL_TYPES
from expert_parallel.moe.metrics import CollapseConfig, CollapseTracker
from expert_parallel.profiling.timer import A2A_PHASES, PhaseTimer
from expert_parallel.training.data import BatchSampler, load_data
from expert_parallel.training.options import convert, field_docs
from expert_parallel.training.parallel import clip_grad_norm, sync_gradients

SIZE_FIELDS = ("hidden_size", "ffn_hidden_size", "num_experts", "top_k")
"""MoEConfig fields that come from the model itself (not options)."""


@dataclass(frozen=True)
class FinetuneHFConfig:
    """Options of the HF fine-tuning launcher (each is a ``--flag``)."""

    out: str = "runs/finetune_hf"
    """Output directory (metrics.jsonl, finetune.json, hf_model/)."""
    model: str = ""
    """A save_pretrained directory to fine-tune."""
    model_config: str = ""
    """A JSON transformers config (with model_type) for a random model of that architecture."""
    family: str = "qwen3_moe"
    """Without --model / --model-config: a small random model of this family."""
    hidden_size: int = 64
    """--family model: hidden size."""
    ffn: int = 96
    """--family model: expert ffn size."""
    experts: int = 8
    """--family model: routed experts."""
    top_k: int = 2
    """--family model: experts per token."""
    layers: int = 2
    """--family model: decoder layers."""
    ep_size: int = 0
    """Expert-parallel size; 0 = all ranks (world size)."""
    steps: int = 20
    """Optimizer steps."""
    seq_len: int = 64
    """Tokens per sequence."""
    global_batch: int = 8
    """Sequences per step over all ranks (divisible by the world size)."""
    lr: float = 3e-3
    """AdamW learning rate."""
    clip: float = 1.0
    """Gradient clipping norm (each expert counted once); 0 disables it."""
    data: str = ""
    """A text file or nanoGPT uint16 .bin; empty = the built-in byte corpus."""
    seed: int = 0
    """Seed of the random model (same on every rank) and of the batches."""
    dtype: str = "float32"
    """Model dtype: float32 or bfloat16."""
    save: bool = True
    """Gather to the HF layout at the end, save_pretrained under <out>/hf_model and reload it."""

    def __post_init__(self) -> None:
        _check_int("ep_size", self.ep_size, 0)
        for name in ("hidden_size", "ffn", "experts", "top_k", "layers", "steps", "seq_len", "global_batch"):
            _check_int(name, getattr(self, name), 1)
        _check_float("lr", self.lr, 0.0, strict=True)
        _check_float("clip", self.clip, 0.0, strict=False)
        if self.family not in MODEL_TYPES:
            raise ValueError(f"family must be one of {list(MODEL_TYPES)}, got {self.family!r}")
        if self.model and self.model_config:
            raise ValueError("give --model or --model-config, not both")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune_hf.py", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs, hints = field_docs(FinetuneHFConfig), get_type_hints(FinetuneHFConfig)
    for f in dataclasses.fields(FinetuneHFConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                            type=lambda s, t=hints[f.name]: convert(s, t), help=docs.get(f.name, ""))
    moe = parser.add_argument_group("MoE overrides (MoEConfig fields; default: the HF block's own value)")
    docs, hints = field_docs(MoEConfig), get_type_hints(MoEConfig)
    for f in dataclasses.fields(MoEConfig):
        if f.name in SIZE_FIELDS:
            continue
        moe.add_argument("--" + f.name.replace("_", "-"), dest=f"moe.{f.name}", default=argparse.SUPPRESS,
                         type=lambda s, t=hints[f.name]: convert(s, t),
                         help=docs.get(f.name, "").replace("``", "").replace("%", "%%"))
    return parser


def parse_args(argv: list[str]) -> tuple[FinetuneHFConfig, dict[str, Any]]:
    ns = vars(make_parser().parse_args(argv))
    overrides = {k.split(".", 1)[1]: ns.pop(k) for k in list(ns) if k.startswith("moe.")}
    return FinetuneHFConfig(**ns), overrides


def build_model(cfg: FinetuneHFConfig, vocab_size: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from expert_parallel.interop.hf.small import randomise, small_config

    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)  # identical replicated weights on every rank
    if cfg.model:
        return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    if cfg.model_config:
        with open(cfg.model_config) as fh:
            fields = json.load(fh)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ValueError(f"{cfg.model_config}: the JSON config needs a 'model_type' (e.g. 'qwen3_moe')")
        fields.setdefault("vocab_size", vocab_size)
        hf_cfg = AutoConfig.for_model(model_type, **fields)
    else:
        hf_cfg = small_config(cfg.family, hidden_size=cfg.hidden_size, ffn=cfg.ffn, experts=cfg.experts,
                              top_k=cfg.top_k, layers=cfg.layers, vocab_size=vocab_size,
                              max_positions=max(512, cfg.seq_len))
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    randomise(model, cfg.seed)
    return model


def model_vocab(cfg: FinetuneHFConfig) -> int:
    """The vocabulary the data must fit: the given model's, else bytes (256)."""
    if cfg.model:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.model).get_text_config().vocab_size
    if cfg.model_config:
        with open(cfg.model_config) as fh:
            return int(json.load(fh).get("vocab_size", 256))
    return 256


def mean_over_ranks(value: float, groups: ParallelGroups, device: torch.device) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if groups.dp_group is not None:
        dist.all_reduce(t, group=groups.dp_group)
    return float(t) / groups.world_size


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def train(cfg: FinetuneHFConfig, overrides: dict[str, Any], groups: ParallelGroups, device: torch.device) -> dict:
    from expert_parallel.interop.hf import (gather_to_hf, moe_aux_loss, moe_families, moe_stats,
                                            replace_moe_blocks)
    from expert_parallel.interop.hf.wrapper import ep_blocks

    data = load_data(cfg.data or None, model_vocab(cfg), cfg.seq_len)
    model = build_model(cfg, data.vocab_size).to(device)
    vocab = model.config.get_text_config().vocab_size
    if vocab < data.vocab_size:
        raise ValueError(f"the model's vocab_size={vocab} is smaller than the data's {data.vocab_size} tokens")
    names = replace_moe_blocks(model, groups, seed=cfg.seed, **overrides)
    timer = PhaseTimer(device)
    for _, block in ep_blocks(model):
        block.moe.set_timer(timer)
    sampler = BatchSampler(data.train, cfg.seq_len, cfg.global_batch, groups.rank, groups.world_size, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    tracker = CollapseTracker(CollapseConfig(window=max(1, min(100, cfg.steps))))
    tokens_per_step = cfg.global_batch * cfg.seq_len
    metrics = None
    if groups.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "w")
        print(f"finetune_hf: {type(model).__name__}, blocks {moe_families(model)}, world {groups.world_size}, "
              f"EP={groups.ep_size}, overrides {overrides or 'none (HF function, dropless)'}", flush=True)
    history = []
    model.train()
    for step in range(cfg.steps):
        timer.collect()
        t0 = time.perf_counter()
        x, y = sampler.batch(step, device)
        logits = model(input_ids=x).logits  # our own CE: HF's labels= would shift again
        ce = F.cross_entropy(logits.reshape(-1, vocab).float(), y.reshape(-1))
        aux = moe_aux_loss(model)
        opt.zero_grad(set_to_none=False)
        (ce + aux).backward()
        sync_gradients(model, groups)
        grad_norm = clip_grad_norm(model, groups, cfg.clip)
        opt.step()
        dt = time.perf_counter() - t0
        phases = timer.collect()
        a2a = sum(phases.get(p, 0.0) + phases.get(p + ".bwd", 0.0) for p in A2A_PHASES)
        stats = {n: s.reduce(groups.dp_group) for n, s in moe_stats(model).items()}
        tracker.update(stats)
        layers = {}
        routed = kept = 0
        for n, s in stats.items():
            d = s.to_dict()
            layers[n] = {"drop_fraction": d["drop_fraction"], "kept": d["kept"], "routed": d["routed"],
                         "load_imbalance": d["load_imbalance"]}
            routed, kept = routed + sum(d["routed"]), kept + sum(d["kept"])
        rec = {"step": step + 1, "loss": mean_over_ranks(float(ce.detach()), groups, device),
               "aux_loss": mean_over_ranks(float(aux.detach()), groups, device), "grad_norm": grad_norm,
               "step_time_s": dt, "tokens_per_s": tokens_per_step / dt, "a2a_share": a2a / dt if dt > 0 else 0.0,
               "drop_fraction": 1.0 - kept / routed if routed else 0.0, "layers": layers,
               "collapse": tracker.summary()}
        history.append(rec)
        if metrics is not None:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            print(f"step {rec['step']:5d} | loss {rec['loss']:.4f} | aux {rec['aux_loss']:.4f} | "
                  f"drop {100 * rec['drop_fraction']:5.2f}% | a2a {100 * rec['a2a_share']:4.1f}% | "
                  f"{rec['tokens_per_s']:8.0f} tok/s", flush=True)
    if metrics is not None:
        metrics.close()

    # The same probe batch on every rank: the EP model's logits, the gathered HF model's,
    # and (rank 0) those of the saved model reloaded in plain transformers.
    model.eval()
    probe = torch.from_numpy(data.val[: 2 * cfg.seq_len].astype("int64")).view(2, cfg.seq_len).to(device)
    with torch.no_grad():
        ep_logits = model(input_ids=probe).logits
    result = {
        "config": asdict(cfg), "moe_overrides": overrides, "world_size": groups.world_size,
        "ep_size": groups.ep_size, "model_class": type(model).__name__, "replaced_blocks": names,
        "mappings": moe_families(model), "history": history, "collapse": tracker.summary(),
        "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
        "drop_fraction_per_layer": {n: sum(h["layers"][n]["drop_fraction"] for h in history) / len(history)
                                    for n in names},
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "transformers": __import__("transformers").__version__},
    }
    if cfg.save:
        gather_to_hf(model, groups)
        with torch.no_grad():
            hf_logits = model(input_ids=probe).logits
        result["gathered_vs_ep_logits_rel"] = _rel(hf_logits, ep_logits)
        if groups.rank == 0:
            from transformers import AutoModelForCausalLM

            hf_dir = os.path.join(cfg.out, "hf_model")
            model.save_pretrained(hf_dir)
            reloaded = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, cfg.dtype)).to(device).eval()
            with torch.no_grad():
                re_logits = reloaded(input_ids=probe).logits
            torch.save(probe.cpu(), os.path.join(cfg.out, "probe_ids.pt"))
            torch.save(ep_logits.cpu(), os.path.join(cfg.out, "probe_logits.pt"))
            result.update(hf_model=hf_dir, reloaded_class=type(reloaded).__name__,
                          reloaded_vs_ep_logits_rel=_rel(re_logits, ep_logits))
    if groups.rank == 0:
        tmp = os.path.join(cfg.out, "finetune.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, os.path.join(cfg.out, "finetune.json"))
        print(f"loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}; "
              f"wrote {os.path.join(cfg.out, 'finetune.json')}", flush=True)
    return result


@record
def main(argv: Optional[list[str]] = None) -> int:
    cfg, overrides = parse_args(sys.argv[1:] if argv is None else argv)  # bad options fail before rendezvous
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        info = init_distributed(timeout=timedelta(minutes=5))
        groups = ParallelGroups.build(cfg.ep_size or info.world_size, timeout=timedelta(minutes=5))
        train(cfg, overrides, groups, local_device(info.local_rank))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
