"""Our MoE layer against DeepSpeed-MoE and against the floors, same processes, same run.

Question: on the issue's target config, how much faster / leaner than DeepSpeed's
``deepspeed.moe.layer.MoE`` is our layer (forward + backward), and how close is it to
the floor, i.e. to the cost of only moving the bytes and only running the experts?

This is ``compare_peers.py`` with DeepSpeed as the only peer and DeepSpeed's usual
expert, a bias-free GELU MLP (``--activation gelu``), kept so that its figures compare
with earlier rounds; every option of ``compare_peers.py`` applies (``--dtype`` defaults
to ``both``: fp32 and bf16 autocast in one run). See that script for the rows, the
function-equality check before timing, the timing and the memory method (collectives
replayed, so peaks repeat exactly; spread reported).

    DS_ACCELERATOR=cpu nice -n 10 python benchmarks/compare_deepspeed.py           # target config
    python benchmarks/compare_deepspeed.py --capacity-factor 2.0 --out benchmarks/results/compare_deepspeed_cf2.json
    python benchmarks/compare_deepspeed.py --tokens 128 --hidden 32 --ffn 64 --iters 2 --out /tmp/c.json  # smoke

Keys: ``speedup_vs_deepspeed`` (DeepSpeed time / ours), ``memory_ratio_vs_deepspeed``
(our peak / DeepSpeed's), ``efficiency_vs_floor`` (floor time / ours), in the primary
precision (bf16 when it ran); per precision under ``by_dtype``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any deepspeed import (also in children)

from benchmarks import compare_peers  # noqa: E402

DEFAULTS = {"peers": "deepspeed", "activation": "gelu", "out": "benchmarks/results/compare_deepspeed.json"}


def main(argv: list[str] | None = None) -> dict:
    return compare_peers.main(argv, defaults=DEFAULTS, benchmark="compare_deepspeed")


if __name__ == "__main__":
    main()
