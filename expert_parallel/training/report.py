"""Rank-0 reporting for the launcher: progress lines, metrics.jsonl, TensorBoard,
``summary.json`` and a PNG report (loss curves, drop rate per layer, tokens-per-expert
heatmap, routing entropy and dead experts over steps; below them where each step's time
went, stacked by phase, and each rank's mean step by phase with the slowest rank named;
the model's sample text as the title). Other ranks construct a silent logger. All
plotting lives here (matplotlib is imported only when a report is drawn).

Nothing is written before :meth:`RunLogger.start` (the trainer calls it once the run
directory and the resume checks have passed, so a refused run leaves no trace).
``metrics.jsonl`` is opened in append mode and flushed every step, so a crash loses at
most the line being written, and a resumed run continues the same file.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional

from ..moe.metrics import CollapseConfig, CollapseTracker
from .config import TrainConfig

STEP_PHASES = (("router", ("router",)), ("permute", ("permute",)), ("count exchange", ("count_exchange",)),
               ("dispatch", ("dispatch_a2a",)), ("experts", ("experts", "shared_expert")),
               ("combine", ("combine_a2a",)), ("unpermute", ("unpermute",)))
"""The report's phase groups: (label, timer phases summed forward + backward, over every MoE
layer). The rest of the step (attention, dense layers, loss, optimizer, gradient sync,
routing stats) is ``rest of step``."""
EXCHANGE_GROUPS = ("count exchange", "dispatch", "combine")
"""Groups that are communication: a rank's time outside them is its own work ("busy")."""


def _color(label: str) -> str:
    """One colour per phase group in both panels (rest of step grey)."""
    labels = [lab for lab, _ in STEP_PHASES]
    return "0.6" if label not in labels else f"C{labels.index(label)}"


def phase_groups(phases: dict, step_time_s: float) -> dict[str, float]:
    """Seconds per :data:`STEP_PHASES` group of one step's timer phases (``PhaseTimer.collect``:
    ``name`` forward, ``name.bwd`` backward), plus ``rest of step``."""
    out = {label: sum(phases.get(n, 0.0) + phases.get(n + ".bwd", 0.0) for n in names)
           for label, names in STEP_PHASES}
    out["rest of step"] = max(0.0, step_time_s - sum(out.values()))
    return out


def plot_phases(records: list[dict], ax: Any) -> None:
    """Stacked time per step by phase group (this rank's timer, rank 0)."""
    rows = [r for r in records if "phases_s" in r and "step_time_s" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    groups = [phase_groups(r["phases_s"], r["step_time_s"]) for r in rows]
    labels = list(groups[0])
    ax.stackplot(steps, *[[1e3 * g[k] for g in groups] for k in labels], labels=labels,
                 colors=[_color(k) for k in labels], step="mid")
    ax.set(title="step time by phase (rank 0, all MoE layers, fwd + bwd)", xlabel="step", ylabel="ms")
    ax.legend(fontsize=7, loc="upper left", ncol=4)


def plot_ranks(per_rank: Optional[dict], ax: Any) -> None:
    """Each rank's mean step time by phase group (``per_rank``: ``{"phases_s": {group:
    [seconds per rank]}, "steps": n}``), the slowest rank (most busy time) named."""
    if not per_rank or not per_rank.get("phases_s"):
        ax.set_axis_off()
        return
    groups = per_rank["phases_s"]
    ranks = list(range(len(next(iter(groups.values())))))
    bottom = [0.0] * len(ranks)
    for label, values in groups.items():
        ms = [1e3 * v for v in values]
        ax.bar([str(r) for r in ranks], ms, bottom=bottom, label=label, color=_color(label))
        bottom = [b + v for b, v in zip(bottom, ms)]
    busy = [sum(v[r] for k, v in groups.items() if k not in EXCHANGE_GROUPS) for r in ranks]
    slow = max(ranks, key=lambda r: busy[r])
    mean = sum(busy) / len(busy)
    ax.set(title=f"mean step per rank: slowest rank {slow} (own work {1e3 * busy[slow]:.1f} ms vs mean "
                 f"{1e3 * mean:.1f} ms)", xlabel="rank", ylabel="ms")
    ax.legend(fontsize=7)


def plot_collapse(records: list[dict], ax_entropy: Any, ax_dead: Any) -> None:
    """Draw normalised routing entropy and dead experts per layer over steps on two
    matplotlib axes, from ``metrics.jsonl`` records carrying ``record["collapse"]``
    (as written when the launcher logs ``CollapseTracker.summary()``)."""
    rows = [r for r in records if "collapse" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    for layer in rows[-1]["collapse"]:
        ent = [r["collapse"].get(layer, {}).get("routing_entropy_norm", float("nan")) for r in rows]
        dead = [r["collapse"].get(layer, {}).get("dead_experts", float("nan")) for r in rows]
        ax_entropy.plot(steps, ent, label=layer)
        ax_dead.plot(steps, dead, label=layer)
    ax_entropy.set(title="routing entropy / ln E", xlabel="step", ylim=(0, 1.05))
    ax_dead.set(title="dead experts (window)", xlabel="step", ylabel="experts")
    ax_entropy.legend(fontsize=7)
    ax_dead.legend(fontsize=7)


class RunLogger:
    def __init__(self, cfg: TrainConfig, active: bool, context: str = "") -> None:
        self.cfg, self.active = cfg, active
        self.context = context
        """Appended to every step line (dispatcher, EP size, ranks per node)."""
        # Running totals for summary.json (constant memory over any number of steps;
        # the per-step records live in metrics.jsonl, which the PNG report reads back).
        self.steps_logged = 0
        self.last_loss: Optional[float] = None
        self.a2a_share_sum = 0.0
        self.drop_sum: dict[str, float] = {}
        self.kept_sum: dict[str, list[int]] = {}
        self.tb = None
        self.collapse = CollapseTracker(CollapseConfig(window=100))
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        self.metrics: Any = None

    def start(self) -> None:
        """Open the run's files (rank 0): metrics.jsonl (append), config.json, TensorBoard."""
        cfg = self.cfg
        if not self.active or self.metrics is not None:
            return
        os.makedirs(cfg.out, exist_ok=True)
        self.metrics = open(self.metrics_path, "a")
        with open(os.path.join(cfg.out, "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=1)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self.info("tensorboard is not installed; skipping TensorBoard logs")
            else:
                self.tb = SummaryWriter(os.path.join(cfg.out, "tb"))

    def info(self, message: str) -> None:
        if self.active:
            print(message, flush=True)

    def log_step(self, step: int, result: Any, lr: float, step_time: float, tokens_per_s: float,
                 a2a_share: float, grad_norm: float, phases: dict, val_loss: Optional[float]) -> None:
        if not self.active:
            return
        layers = {}
        routed = kept = 0
        for name, s in result.stats.items():
            d = s.to_dict()
            layers[name] = {"drop_fraction": d["drop_fraction"], "kept": d["kept"],
                            "routed": d["routed"], "load_imbalance": d["load_imbalance"],
                            "experts_per_token_mean": d["experts_per_token_mean"]}
            routed += sum(d["routed"])
            kept += sum(d["kept"])
        drop = 1.0 - kept / routed if routed else 0.0
        self.collapse.update(result.stats)  # entropy, dead experts, top share, confidence
        record = {
            "step": step, "loss": result.loss, "aux_loss": result.aux_loss, "lr": lr,
            "grad_norm": grad_norm, "step_time_s": step_time, "tokens_per_s": tokens_per_s,
            "a2a_share": a2a_share, "drop_fraction": drop, "skipped": result.skipped,
            "phases_s": phases, "layers": layers, "collapse": self.collapse.summary(),
        }
        if val_loss is not None:
            record["val_loss"] = val_loss
        self.steps_logged += 1
        self.last_loss = result.loss
        self.a2a_share_sum += a2a_share
        for name, layer in layers.items():
            self.drop_sum[name] = self.drop_sum.get(name, 0.0) + layer["drop_fraction"]
            prev = self.kept_sum.get(name)
            self.kept_sum[name] = [a + b for a, b in zip(prev, layer["kept"])] if prev else list(layer["kept"])
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "a2a_share", "drop_fraction"):
                self.tb.add_scalar(f"train/{key}", record[key], step)
            for name, layer in layers.items():
                self.tb.add_scalar(f"drop_fraction/{name}", layer["drop_fraction"], step)
            for key, value in self.collapse.scalars().items():
                self.tb.add_scalar(key, value, step)
            if val_loss is not None:
                self.tb.add_scalar("val/loss", val_loss, step)
        val = f" val {val_loss:.4f}" if val_loss is not None else ""
        print(f"step {step:5d} | loss {result.loss:.4f}{val} | aux {result.aux_loss:.4f} | "
              f"drop {100 * drop:5.2f}% | a2a {100 * a2a_share:4.1f}% | "
              f"{tokens_per_s:8.0f} tok/s | lr {lr:.2e}" + (f" | {self.context}" if self.context else "")
              + (" | SKIPPED" if result.skipped else ""), flush=True)

    def finish(self, **summary_fields: Any) -> dict:
        if not self.active:
            return {}
        self.start()  # a run with no step left (stop_after reached) still gets its files
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        n = max(self.steps_logged, 1)
        summary = {
            "final_train_loss": self.last_loss,
            "drop_fraction_per_layer": {name: total / n for name, total in self.drop_sum.items()},
            "tokens_per_expert": self.kept_sum,
            "mean_a2a_share": self.a2a_share_sum / n,
            "collapse": self.collapse.summary(),
            **summary_fields,
        }
        sample = summary.get("sample") or {}
        summary["report_png"] = self.plot(summary.get("per_rank"),
                                          (sample.get("prompt", "") + sample.get("text", "")) or None)
        path = os.path.join(self.cfg.out, "summary.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=1)
        os.replace(tmp, path)
        if sample:
            print(f"sample:  {sample.get('prompt', '') + sample.get('text', '')!r}", flush=True)
        print(f"metrics: {self.metrics_path}", flush=True)
        print(f"summary: {path}", flush=True)
        if summary["report_png"]:
            print(f"report:  {summary['report_png']}", flush=True)
        return summary

    def plot(self, per_rank: Optional[dict] = None, sample: Optional[str] = None) -> Optional[str]:
        """Loss curves, drop rate per layer, tokens-per-expert heatmap (first MoE layer),
        routing collapse; time by phase per step and per rank (``per_rank``, see
        :func:`plot_ranks`); ``sample`` (prompt + generated text) as the title."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import numpy as np
        except ImportError:
            print("matplotlib is not installed; no PNG report", file=sys.stderr)
            return None
        records = _read_all(self.metrics_path)
        if not records:
            return None
        steps = [r["step"] for r in records]
        fig = plt.figure(figsize=(26, 9.5))
        layout = fig.add_gridspec(2, 5)
        axes = [fig.add_subplot(layout[0, i]) for i in range(5)]
        axes[0].plot(steps, [r["loss"] for r in records], label="train")
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            axes[0].plot(*zip(*val), "o-", label="val")
        axes[0].set(title="loss", xlabel="step", ylabel="cross-entropy (nats/byte)")
        axes[0].legend()
        for name in records[-1]["layers"]:
            axes[1].plot(steps, [100 * r["layers"].get(name, {}).get("drop_fraction", 0) for r in records],
                         label=name)
        axes[1].set(title="dropped (token, expert) pairs", xlabel="step", ylabel="%")
        axes[1].legend(fontsize=7)
        first = next(iter(records[-1]["layers"]), None)
        if first is not None:
            grid = np.array([r["layers"][first]["kept"] for r in records if first in r["layers"]]).T
            im = axes[2].imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                                extent=(steps[0], steps[-1], grid.shape[0] - 0.5, -0.5))
            axes[2].set(title=f"tokens per expert ({first})", xlabel="step", ylabel="expert")
            fig.colorbar(im, ax=axes[2])
        plot_collapse(records, axes[3], axes[4])  # routing entropy, dead experts per layer
        plot_phases(records, fig.add_subplot(layout[1, :3]))
        plot_ranks(per_rank, fig.add_subplot(layout[1, 3:]))
        if sample:
            fig.suptitle(f"sample: {sample!r}"[:200], fontsize=10, family="monospace")
        fig.tight_layout()
        path = os.path.join(self.cfg.out, "report.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def _read_all(path: str) -> list[dict]:
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
    return out
