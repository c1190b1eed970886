"""The gpu_check report: JSON as measured, markdown for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def overall_status(results: dict[str, dict]) -> str:
    """``pass`` when every check passed or was legitimately not run (multi-GPU on one
    GPU, which the report states); else ``fail``."""
    return "pass" if all(r["status"] in ("pass", "not run") for r in results.values()) else "fail"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _check_details(name: str, res: dict) -> list[str]:
    lines: list[str] = []
    if name == "correctness":
        bad = [c for c in res.get("cases", []) if c["status"] != "pass"]
        lines.append(f"fp32 tolerance {res.get('fp32_tol')}, bf16 tolerance {res.get('bf16_tol')} "
                     "(relative L2 error vs the CPU fp64 reference, per tensor); TF32 off.")
        lines += ["", "| router | mode | backend | fp32 max rel err | bf16 max rel err | status |",
                  "|---|---|---|---:|---:|---|"]
        for c in res.get("cases", []):
            fp32 = _fmt(max(c["fp32_err"].values())) if "fp32_err" in c else c.get("fp32", "-")
            if isinstance(fp32, str) and fp32.startswith("refused"):
                fp32 = "refused (by design)"
            bf16 = _fmt(max(c["bf16_err"].values())) if "bf16_err" in c else "-"
            lines.append(f"| {c['router']} | {c['mode']} | {c['backend']} | {fp32} | {bf16} | {c['status']} |")
        lines += ["", "grouped_mm refusal probes: " + "; ".join(
            f"{p['case']}: {p['status']}" for p in res.get("grouped_mm_probes", []))]
        for c in bad:
            lines.append(f"- FAIL {c['router']}/{c['mode']}/{c['backend']}: {c.get('notes')}")
    elif name in ("host_syncs", "cuda_graphs"):
        lines.append(f"Method: {res.get('method')}.")
        for c in res.get("cases", []):
            key = ", ".join(f"{k}={c[k]}" for k in ("ep", "rank", "router", "mode", "precision", "backend",
                                                     "dispatcher") if k in c)
            if name == "host_syncs":
                key += f"; marked syncs {c['marked_syncs']} (expected {c['expected']})"
                extra = sorted(set(c["stray"]))  # the same line once
            else:
                extra = c.get("detail") or c.get("max_rel_err")
            lines.append(f"- {c['status']}: {key}" + (f" -- {extra}" if c["status"] != "pass" else ""))
    elif name == "multi_gpu":
        for part in res.get("golden", []) + res.get("launcher", []):
            lines.append("- " + ", ".join(f"{k}: {_fmt(v)}" for k, v in part.items() if k not in ("log_tail",
                                                                                             "failures")))
    elif name in ("profiler", "speed"):
        breakdown = res if name == "profiler" else res.get("layer_breakdown", {})
        if "phases_ms" in breakdown:
            lines += ["| phase | forward ms | backward ms |", "|---|---:|---:|"]
            for p, v in breakdown["phases_ms"].items():
                lines.append(f"| {p} | {v['forward_ms']:.3f} | {v['backward_ms']:.3f} |")
            lines.append(f"\nLayer {breakdown['layer_ms']:.3f} ms (median), phase sum / measured "
                         f"{breakdown['phase_sum_over_measured']:.3f}, {breakdown.get('timing')}, dispatcher "
                         f"{breakdown.get('dispatcher')}, experts {breakdown.get('expert_backend')}.")
        if name == "speed":
            for part in ("expert_gemms", "compare_deepspeed_ep1"):
                if part in res:
                    shown = {k: v for k, v in res[part].items() if k != "traceback"}
                    lines.append(f"- {part}: " + json.dumps(shown, default=_fmt))
    if res.get("status") == "error":
        lines += ["", "```", (res.get("traceback") or res.get("log_tail") or "")[-2000:], "```"]
    return lines


def markdown(report: dict) -> str:
    v, hw = report["versions"], report["hardware"]
    gpus = ", ".join(f"{g['name']} (sm{g['capability'].replace('.', '')}, {g['memory_gib']} GiB)"
                     for g in hw.get("gpus", [])) or "none"
    lines = [f"# GPU acceptance check{' (DRY RUN on CPU: not a GPU result)' if report['dry_run'] else ''}", "",
             f"Overall: **{report['status']}** in {report['wall_s']:.0f} s, {report['date_utc']}.", "",
             f"GPUs: {gpus}; driver {hw.get('driver')}; torch {v['torch']}, CUDA {v['cuda']}, NCCL {v['nccl']}, "
             f"DeepSpeed {v['deepspeed']}, Python {v['python']}.", "",
             f"Command: `{report['command']}`", "",
             "| check | status | summary |", "|---|---|---|"]
    for res in report["checks"].values():
        lines.append(f"| {res['title']} | {res['status']} | {res['summary']} |")
    for name, res in report["checks"].items():
        lines += ["", f"## {res['title']}", "", f"**{res['status']}** ({res.get('wall_s')} s): {res['summary']}", ""]
        lines += _check_details(name, res)
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(report))


__all__ = ["markdown", "overall_status", "write_report"]
