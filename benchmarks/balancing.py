"""Aux-loss-free balancing vs the load-balancing aux loss, on the launcher's model.

Question: does the sigmoid router with a per-expert selection bias nudged from the
observed load (no aux loss) balance experts at least as well as the Switch/GShard aux
loss? Three single-process runs of the default tiny model on the built-in corpus, same
seed and data, capacity factor 1.25:

* ``aux_loss``:       softmax top-2, aux_loss_coeff 0.01 (the launcher default)
* ``aux_free_bias``:  sigmoid top-2, aux loss 0, bias_update_rate > 0
* ``no_balancing``:   sigmoid top-2, aux loss 0, no bias updates (the control)

Reported over the second half of the steps (after the router settles): drop fraction
and max/mean routed load per expert, averaged over layers and steps; plus final val loss.

    python benchmarks/balancing.py                     # 300 steps each, ~3 minutes
    python benchmarks/balancing.py --steps 5 --out /tmp/b.json   # smoke size
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks._common import add_dtype_arg  # noqa: E402
from expert_parallel.distributed.groups import ParallelGroups  # noqa: E402
from expert_parallel.training.options import parse_args  # noqa: E402
from expert_parallel.training.trainer import run  # noqa: E402

VARIANTS = {
    "aux_loss": ["--router", "softmax_topk", "--aux-loss-coeff", "0.01"],
    "aux_free_bias": ["--router", "sigmoid_topk", "--aux-loss-coeff", "0", "--bias-update-rate", "0.003"],
    "no_balancing": ["--router", "sigmoid_topk", "--aux-loss-coeff", "0"],
}


def _measure(records: list[dict]) -> dict:
    tail = records[len(records) // 2 :]
    drops, imbalances = [], []
    for rec in tail:
        for layer in rec["layers"].values():
            drops.append(layer["drop_fraction"])
            routed = layer["routed"]
            mean = sum(routed) / len(routed)
            imbalances.append(max(routed) / mean if mean else 0.0)
    return {"drop_fraction": sum(drops) / len(drops),
            "max_over_mean_load": sum(imbalances) / len(imbalances)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    add_dtype_arg(parser)
    parser.add_argument("--out", default="benchmarks/results/balancing.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = {}
    for name, flags in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = parse_args(["--max-steps", str(args.steps), "--out", tmp, "--tensorboard", "false",
                              "--ckpt-every", "0", "--eval-every", str(args.steps), "--dtype", args.dtype,
                              *flags])
            with contextlib.redirect_stdout(io.StringIO()):
                summary = run(cfg, ParallelGroups.single(), torch.device("cpu"))
                # (the final checkpoint is written into tmp and discarded)
            with open(os.path.join(tmp, "metrics.jsonl")) as fh:
                records = [json.loads(line) for line in fh if line.strip()]
        results[name] = {**_measure(records), "final_val_loss": summary["final_val_loss"],
                         "tokens_per_s": summary["tokens_per_s"]}
        print(name, results[name], flush=True)
    aux, free = results["aux_loss"], results["aux_free_bias"]
    report = {
        "benchmark": "balancing",
        "command": " ".join([sys.executable, *sys.argv]),
        "config": {"steps": args.steps, "variants": VARIANTS, "capacity_factor": 1.25, "dtype": args.dtype},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "results": results,
        "target": "aux-loss-free drop fraction and max/mean load no worse than the aux loss",
        "target_met": free["drop_fraction"] <= aux["drop_fraction"]
        and free["max_over_mean_load"] <= aux["max_over_mean_load"],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    md = [f"# Balancing: aux loss vs aux-loss-free bias ({args.steps} steps, second half)", "",
          "| variant | drop fraction | max/mean routed load | final val loss | tokens/s |",
          "|---|---|---|---|---|"]
    for name, r in results.items():
        md.append(f"| {name} | {r['drop_fraction']:.4f} | {r['max_over_mean_load']:.3f} | "
                  f"{r['final_val_loss']:.4f} | {r['tokens_per_s']:.0f} |")
    md += ["", f"Target (aux-free no worse than aux loss): **{'met' if report['target_met'] else 'missed'}**"]
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        names = list(results)
        axes[0].bar(names, [100 * results[n]["drop_fraction"] for n in names])
        axes[0].set(title="dropped pairs (%)")
        axes[1].bar(names, [results[n]["max_over_mean_load"] for n in names])
        axes[1].set(title="max/mean routed load")
        for ax in axes:
            ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=90)
        plt.close(fig)
    except ImportError:
        pass
    return report


if __name__ == "__main__":
    main()
