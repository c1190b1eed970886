"""Drop fraction against capacity factor, on the launcher's model (Switch-style table).

Question: how many (token, expert) pairs does an expert drop at a given capacity factor,
when routing is roughly uniform and when it is skewed (Zipf-like), with and without the
load-balancing aux loss -- and what does dropping cost in loss?

Method (single process, CPU): for each of 4 variants, train the launcher's default tiny
MoE transformer (``expert_parallel.training.Trainer``, built-in corpus) for ``--steps``
steps at the training capacity factor 1.25, then evaluate ``--eval-batches`` validation
batches at each capacity factor in ``--capacity-factors`` (applied as
``eval_capacity_factor`` to every MoE layer) and dropless. Reported per cell: drop
fraction (dropped pairs / routed pairs, all layers), tokens whose every choice was
dropped, max/mean routed load over experts, validation cross-entropy.

Skewed routing: a fixed Zipf-like bias ``-s * log(1 + rank_e)`` (``rank_e`` a fixed random
permutation of the experts, ``s = --zipf-s``) is added to every router's logits during
training and evaluation, i.e. expert popularity falls off as ``1 / rank^s`` before any
learning -- the situation the aux loss must fight. ``uniform`` adds nothing.

    nice -n 10 python benchmarks/drop_vs_capacity.py
    python benchmarks/drop_vs_capacity.py --steps 3 --eval-batches 1 --out /tmp/d.json  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
from typing import Iterator, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._common import REPO, add_dtype_arg, environment, write_report  # noqa: E402
from expert_parallel.distributed.groups import ParallelGroups  # noqa: E402
from expert_parallel.moe import router as router_module  # noqa: E402
from expert_parallel.moe.stats import MoEStats  # noqa: E402
from expert_parallel.training.options import parse_args  # noqa: E402
from expert_parallel.training.trainer import Trainer  # noqa: E402

VARIANTS = {
    "uniform, aux loss": ("uniform", 0.01, None),
    "uniform, no aux loss": ("uniform", 0.0, None),
    "zipf, aux loss": ("zipf", 0.01, None),
    "zipf, no aux loss": ("zipf", 0.0, None),
}
DESIGNS = {
    # Today's designs (issue 15): their own router, losses and shared experts; trained at
    # the benchmark's capacity factor like the rows above.
    "deepseek_tiny (E=64, k=6, groups, shared, sigmoid+bias), zipf": ("zipf", None, "launch/configs/deepseek_tiny.json"),
    "qwen_tiny (E=32, k=4, gated shared, global-batch loss), zipf": ("zipf", None, "launch/configs/qwen_tiny.json"),
}


class _SkewedFunctional:
    """Stands in for ``torch.nn.functional`` inside ``moe/router.py``: the gate's
    ``linear`` (weight [E, D]) gets the bias added; everything else is passed through."""

    def __init__(self, bias_E: torch.Tensor) -> None:
        self.bias_E = bias_E

    def __getattr__(self, name: str):
        return getattr(F, name)

    def linear(self, x, weight, bias=None):
        out = F.linear(x, weight, bias)
        if weight.shape[0] == self.bias_E.numel():
            out = out + self.bias_E.to(out.device, out.dtype)
        return out


@contextlib.contextmanager
def zipf_routing(num_experts: int, s: float, seed: int) -> Iterator[None]:
    """Add a fixed Zipf-like logit bias to every router's logits inside the context
    (benchmark-local patch of the name ``F`` in ``expert_parallel.moe.router``)."""
    perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    bias_E = -s * torch.log1p(perm.to(torch.float32))
    original = router_module.F
    router_module.F = _SkewedFunctional(bias_E)
    try:
        yield
    finally:
        router_module.F = original


@torch.no_grad()
def _evaluate(trainer: Trainer, cf: Optional[float], batches: int) -> dict:
    model = trainer.model
    for layer in model.moe_layers().values():
        layer.config = layer.config.replace(eval_capacity_factor=cf)
    model.eval()
    ce_sum, stats = 0.0, []
    for i in range(batches):
        x, y = trainer.val_sampler.batch(i, trainer.device)
        with trainer.engine.precision.autocast(trainer.device.type):  # as the launcher evaluates
            out = model(x)
        ce_sum += float(F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), y.reshape(-1)))
        stats += list(out.stats.values())
    total = MoEStats.accumulate(stats)
    routed = total.routed_E.to(torch.float64)
    return {"drop_fraction": total.drop_fraction,
            "tokens_all_dropped_fraction": int(total.tokens_all_dropped) / max(1, int(total.num_tokens)),
            "max_over_mean_load": float(routed.max() / routed.mean()) if float(routed.mean()) > 0 else 0.0,
            "val_loss": ce_sum / batches}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--capacity-factors", default="0.5,0.75,1.0,1.25,1.5,2.0")
    p.add_argument("--train-capacity-factor", type=float, default=1.25)
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--designs", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="also run launch/configs/deepseek_tiny.json and qwen_tiny.json (true/false)")
    add_dtype_arg(p)
    p.add_argument("--out", default="benchmarks/results/drop_vs_capacity.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfs: list[Optional[float]] = [float(v) for v in a.capacity_factors.split(",")] + [None]
    results: dict[str, dict] = {}
    variants = dict(VARIANTS, **(DESIGNS if a.designs else {}))
    for name, (routing, aux, design) in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            extra = (["--config", os.path.join(REPO, design)] if design else []) + \
                ([] if aux is None else ["--aux-loss-coeff", str(aux)])
            cfg = parse_args(extra + ["--max-steps", str(max(1, a.steps)), "--out", tmp, "--tensorboard", "false",
                                      "--ckpt-every", "0", "--seed", str(a.seed),
                                      "--capacity-factor", str(a.train_capacity_factor), "--dtype", a.dtype])
            ctx = zipf_routing(cfg.model.moe.num_experts, a.zipf_s, a.seed + 7) \
                if routing == "zipf" else contextlib.nullcontext()
            with ctx, contextlib.redirect_stdout(io.StringIO()):
                trainer = Trainer(cfg, ParallelGroups.single(), torch.device("cpu"))
                torch.manual_seed(a.seed)
                for _ in range(a.steps):
                    trainer.train_step()
                    trainer.step += 1
                cells = {("dropless" if cf is None else str(cf)): _evaluate(trainer, cf, a.eval_batches)
                         for cf in cfs}
        results[name] = cells
        print(name, {k: round(v["drop_fraction"], 4) for k, v in cells.items()}, flush=True)
    model_cfg = cfg.model
    report = {
        "benchmark": "drop_vs_capacity",
        "config": {**vars(a), "model": {"d_model": model_cfg.d_model, "n_layers": model_cfg.n_layers,
                                        "num_experts": model_cfg.moe.num_experts, "top_k": model_cfg.moe.top_k,
                                        "ffn": model_cfg.moe.ffn_hidden_size},
                   "variants": {k: {"routing": r, "aux_loss_coeff": c, "config": d}
                                for k, (r, c, d) in variants.items()}},
        **environment(),
        "results": results,
    }
    cols = list(next(iter(results.values())))
    md = [f"# Drop fraction vs capacity factor on the launcher's model ({a.steps} training steps at "
          f"cf {a.train_capacity_factor}, E={model_cfg.moe.num_experts}, k={model_cfg.moe.top_k}, "
          f"{model_cfg.n_layers} layers; evaluated on {a.eval_batches} val batches)", "",
          "Dropped (token, expert) pairs, % of routed pairs, all MoE layers:", "",
          "| routing | " + " | ".join(f"cf {c}" for c in cols) + " | max/mean load |",
          "|---|" + "---:|" * (len(cols) + 1)]
    for name, cells in results.items():
        md.append(f"| {name} | " + " | ".join(f"{100 * cells[c]['drop_fraction']:.2f}" for c in cols)
                  + f" | {cells['dropless']['max_over_mean_load']:.2f} |")
    md += ["", "Validation cross-entropy at each capacity factor:", "",
           "| routing | " + " | ".join(f"cf {c}" for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, cells in results.items():
        md.append(f"| {name} | " + " | ".join(f"{cells[c]['val_loss']:.4f}" for c in cols) + " |")

    def plot(plt) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [float(c) for c in cols if c != "dropless"]
        for name, cells in results.items():
            ax.plot(xs, [100 * cells[str(x)]["drop_fraction"] for x in xs], marker="o", label=name)
        ax.set_xlabel("capacity factor")
        ax.set_ylabel("dropped pairs (%)")
        ax.set_title("drop fraction vs capacity factor (launcher model)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    write_report(a.out, report, md, plot)
    print("\n".join(md), flush=True)
    assert all(math.isfinite(c["val_loss"]) for cells in results.values() for c in cells.values())
    return report


if __name__ == "__main__":
    main()
