"""Rendering of ``compare_peers.py`` results: targets, markdown and the PNG (no measurement).

``python benchmarks/compare_peers.py --render RESULT.json`` re-writes the md and png from
a result JSON through :func:`render`.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks._common import write_report

TARGETS = {"speedup_vs_torchtitan_min": 1.4, "layer_over_floor_max_bf16": 1.15,
           "speedup_vs_deepspeed_min": {1.25: 1.1, 2.0: 1.7}}
PEER_REF = {"deepspeed": "ours", "torchtitan": "ours_dropless", "transformers": "ours_dropless"}

def render(path: str) -> dict:
    """Re-write ``<stem>.md`` and ``<stem>.png`` from a result JSON (no measurement)."""
    with open(path) as fh:
        report = json.load(fh)
    a = argparse.Namespace(**report["config"])
    peers = [n for n in a.peers if n not in report["missing_peers"]]
    md = _markdown(a, report, report["by_dtype"], peers)
    write_report(path, report, md, lambda plt: _plot(plt, report["by_dtype"], a.capacity_factor, a.ep))
    return report



def _targets(by_dtype: dict, peers: list[str], ds_target) -> list[dict]:
    out = []

    def add(what, dtype, row, key, bound, kind):
        value = row.get(key)
        if value is None:
            return
        met = value >= bound if kind == "min" else value <= bound
        by = value / bound - 1 if kind == "min" else bound / value - 1
        cpu = row.get(key.replace("_over_floor", "_over_floor_cpu") if "over_floor" in key else key + "_cpu")
        cpu_met = None if cpu is None else (cpu >= bound if kind == "min" else cpu <= bound)
        out.append({"target": what, "dtype": dtype, "value": value, "bound": bound, "kind": kind,
                    "met": met, "margin": by, "value_cpu_time": cpu, "met_cpu_time": cpu_met})

    for d, row in by_dtype.items():
        if "torchtitan" in peers:
            add("speedup vs torchtitan", d, row, "speedup_vs_torchtitan", TARGETS["speedup_vs_torchtitan_min"], "min")
        if "deepspeed" in peers and ds_target:
            add("speedup vs DeepSpeed", d, row, "speedup_vs_deepspeed", ds_target, "min")
        if d == "bf16":
            lead = "ours" if "ours_over_floor" in row else "ours_dropless"
            add(f"{lead} time / floor", d, row, f"{lead}_over_floor", TARGETS["layer_over_floor_max_bf16"], "max")
    return out


def _markdown(a, report: dict, by_dtype: dict, peers: list[str]) -> list[str]:
    cf = a.capacity_factor
    md = [f"# Our MoE layer vs peers vs floor (cf {cf if cf is not None else 'dropless'}, E={a.experts}, "
          f"k={a.top_k}, {a.tokens} tokens/rank, D={a.hidden}, F={a.ffn}, {a.activation}, EP={a.ep}, "
          f"{a.threads} thread/rank, fwd+bwd)", "",
          f"Machine load (1/5/15 min, {os.cpu_count()} cores) at start: "
          f"{report['hardware'].get('load_average_1_5_15')}, at end: {report.get('load_average_end')} "
          "(other jobs share the machine: wall times include waiting for a core, CPU times do not); "
          f"versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items() if v)}.", ""]
    for name, why in report["missing_peers"].items():
        md.append(f"- **{name}: missing** ({why})")
    for s in report["shims"]:
        md.append(f"- shim: {s}")
    if report["missing_peers"] or report["shims"]:
        md.append("")
    for d, row in by_dtype.items():
        t = row["times_ms"]
        c = row["cpu_ms"]
        md += [f"## {d}", "", "| row | median ms | vs ours | CPU ms (all ranks) | vs ours (CPU) | "
               "peak MiB (spread) | exchange MiB | same function |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        order = [n for n in ("ours", "ours_dropless", *peers) if n in t]
        order += [n for n in ("floor", "floor_a2a", "floor_experts", "floor_dropless", "floor_a2a_dropless",
                              "floor_experts_dropless") if n in t]
        for n in order:
            ref = PEER_REF.get(n)
            ref = ref if ref in t else "ours_dropless"
            vs = f"{t[n] / t[ref]:.2f}x" if n in peers else ""
            vs_cpu = f"{c[n] / c[ref]:.2f}x" if n in peers else ""
            mem = (f"{row['peak_mib'][n]:.1f} ({100 * row['memory_spread'][n]:.1f}%)"
                   if n in row["peak_mib"] else "")
            ex = f"{row['exchange_mib'][n]:.1f}" if n in row["exchange_mib"] else ""
            eq = row["equality"].get(n)
            same = ""
            if eq:
                same = ("bitwise" if eq["bitwise"] else f"max err {eq['max_rel_err_output']:.1e}") + \
                    ("" if eq["pass"] else " **FAILED**")
                changed = eq["tokens_routed_otherwise"]
                if changed:
                    same = (f"max err {eq['max_rel_err_output_unaffected']:.1e} where routed alike; "
                            f"{changed} of {eq['tokens']} tok routed otherwise by its bf16 router") + \
                        ("" if eq["pass"] else " **FAILED**")
                if eq["deepspeed_renormalised"]:
                    same += " (renormalised)"
            md.append(f"| {n} | {t[n]:.1f} | {vs} | {c[n]:.1f} | {vs_cpu} | {mem} | {ex} | {same} |")
        md.append("")
        for lname in ("ours", "ours_dropless"):
            if f"{lname}_over_floor" in row:
                md.append(f"- {lname}: {row[f'{lname}_over_floor']:.2f}x its floor "
                          f"({row[f'{lname}_over_floor_cpu']:.2f}x in CPU time)")
        for p in peers:
            md.append(f"- {p}: ours is **{row[f'speedup_vs_{p}']:.2f}x** faster "
                      f"({row[f'speedup_vs_{p}_cpu']:.2f}x in CPU time), "
                      f"{row[f'memory_ratio_vs_{p}']:.2f}x its peak memory; {p} itself is "
                      f"{row[f'{p}_over_floor']:.2f}x the floor ({row[f'{p}_over_floor_cpu']:.2f}x in CPU "
                      f"time), the most any layer could beat it by")
        md.append("")
        cats = ["gemm", "exchange", "index/permute", "cast/copy", "elementwise", "other ops", "python/framework"]
        md += [f"### {d}: where the time goes (ms, profiled calls)", "",
               "| row | " + " | ".join(cats) + " | wall |", "|---|" + "---:|" * (len(cats) + 1)]
        for n in [n for n in order if n in row["breakdown_ms"]]:
            b = row["breakdown_ms"][n]
            md.append(f"| {n} | " + " | ".join(f"{b.get(c, 0.0):.1f}" for c in cats) + f" | {b['wall']:.1f} |")
        md.append("")
        diffs = [p for p in peers if p in row["breakdown_ms"]]
        if diffs:
            md += [f"### {d}: the difference to each peer (peer - ours, ms of the profiled calls; "
                   "exchange includes waiting for the slower rank)", "",
                   "| peer (vs) | " + " | ".join(cats) + " | wall |", "|---|" + "---:|" * (len(cats) + 1)]
            for p in diffs:
                ref = PEER_REF[p] if PEER_REF[p] in row["breakdown_ms"] else "ours_dropless"
                b, r = row["breakdown_ms"][p], row["breakdown_ms"][ref]
                md.append(f"| {p} ({ref}) | " + " | ".join(f"{b.get(c, 0.0) - r.get(c, 0.0):+.1f}" for c in cats)
                          + f" | {b['wall'] - r['wall']:+.1f} |")
            md.append("")
    md += ["## Targets", ""]
    for tg in report["targets"]:
        sym = ">=" if tg["kind"] == "min" else "<="
        verdict = "met" if tg["met"] else f"**missed by {100 * abs(tg['margin']):.0f}%**"
        cpu = (f"; CPU time {tg['value_cpu_time']:.2f}: {'met' if tg['met_cpu_time'] else 'missed'}"
               if tg["value_cpu_time"] is not None else "")
        md.append(f"- {tg['target']} ({tg['dtype']}): {tg['value']:.2f} (target {sym} {tg['bound']}): {verdict}{cpu}")
    md += ["", "Peer notes:"]
    for n, notes in report["peer_notes"].items():
        md.append(f"- {n}: " + "; ".join(notes))
    md += ["", f"Memory: {report['memory_method']}.",
           f"Breakdown: profiler times are wall times; minimum per category over "
           f"{getattr(a, 'profile_repeats', 1)} profiled call(s) per row (indicative under load; the CPU-time "
           "ratios above are the load-robust numbers)."]
    return md


def _plot(plt, by_dtype: dict, cf, ep: int) -> None:
    fig, axes = plt.subplots(1, len(by_dtype), figsize=(6.5 * len(by_dtype), 3.8), squeeze=False)
    for ax, (d, row) in zip(axes[0], by_dtype.items()):
        t, c = row["times_ms"], {k: v / ep for k, v in row["cpu_ms"].items()}
        labels = [n for n in t if not n.startswith("floor")]
        labels += [n for n in ("floor", "floor_dropless") if n in t]
        y = range(len(labels))
        ax.barh([i + 0.2 for i in y], [t[n] for n in labels], height=0.4, color="C0",
                label="wall (slowest rank)")
        ax.barh([i - 0.2 for i in y], [c[n] for n in labels], height=0.4, color="C1",
                label="CPU per rank")
        ax.set_yticks(list(y), labels)
        ax.set_xlabel("ms per forward+backward (median)")
        ax.set_title(f"{d}, cf {cf if cf is not None else 'dropless'}")
        ax.legend(loc="lower right", fontsize=8)
