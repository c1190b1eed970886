"""Every dispatch mode through the real launcher (torchrun, 4 gloo ranks, EP=4).

The same seed and global batch in each mode must give the flat all-to-all's loss and
gradient-norm trajectory (fp32): the modes move the same rows in different ways, they do
not change what is computed. ``summary.json`` must name the dispatcher that ran and the
resolved layout. Then ``--capacity-target-drop`` end to end: the multi-rank tuner moves
the capacity factor, and every rank holds the same factor (read from each rank's own
checkpoint side state, not from rank 0's log).

Runs are tiny (``launcher.TINY``, 3 steps); ``--host-allocator glibc`` skips the jemalloc
re-exec (the allocator never changes numbers: ``test_host_allocator.py``).
"""

from __future__ import annotations

import json

import pytest

from tests.integration.launcher import metrics, summary, torchrun

pytestmark = pytest.mark.timeout(900)

STEPS = 3
COMMON = ("--ep-size", "4", "--max-steps", str(STEPS), "--eval-every", "100", "--ckpt-every", "0",
          "--host-allocator", "glibc")
MODES = {
    # name: (launcher options, what describe() must say, ranks_per_node in the summary)
    "flat": ((), "all_to_all", 4),
    "overlap": (("--overlap-chunks", "2"), "overlap(2)", 4),
    "hierarchical": (("--a2a-algorithm", "hierarchical", "--ranks-per-node", "2"), "hierarchical", 2),
    "hierarchical+overlap": (("--a2a-algorithm", "hierarchical", "--ranks-per-node", "2",
                              "--overlap-chunks", "2"), "overlap(2)", 2),
    "static": (("--static-shapes", "true", "--nonfinite-policy", "count"), "padded", 4),
}
FP32_RTOL = 1e-5


@pytest.fixture(scope="module")
def mode_runs(tmp_path_factory) -> dict:
    runs = {}
    for name, (args, _, _) in MODES.items():
        out = tmp_path_factory.mktemp(name.replace("+", "_"))
        torchrun(4, out, *COMMON, *args)
        runs[name] = out
    return runs


@pytest.mark.parametrize("mode", [m for m in MODES if m != "flat"])
def test_each_mode_follows_the_flat_trajectory(mode_runs, mode) -> None:
    want = {r["step"]: r for r in metrics(mode_runs["flat"])}
    got = {r["step"]: r for r in metrics(mode_runs[mode])}
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert not got[step]["skipped"]
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=FP32_RTOL), (mode, step)
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=FP32_RTOL), (mode, step)
        assert got[step]["drop_fraction"] == want[step]["drop_fraction"], (mode, step)  # exact counts
    assert want[STEPS]["loss"] != want[1]["loss"]  # it trained, so equal trajectories mean something


@pytest.mark.parametrize("mode", list(MODES))
def test_summary_names_the_dispatcher_and_layout(mode_runs, mode) -> None:
    _, says, per_node = MODES[mode]
    s = summary(mode_runs[mode])
    assert says in s["dispatcher"], s["dispatcher"]
    assert (s["world_size"], s["ep_size"], s["ranks_per_node"]) == (4, 4, per_node)
    if mode.startswith("hierarchical"):
        # Two "nodes" of 2 ranks: the real hierarchical exchange, not its one-node fallback.
        assert "inside one node" not in s["dispatcher"], s["dispatcher"]
    with open(mode_runs[mode] / "config.json") as fh:
        assert json.load(fh)["parallel"] == {"ep_size": 4, "ranks_per_node": per_node}


def test_capacity_target_drop_tunes_the_same_factor_on_every_rank(tmp_path) -> None:
    proc = torchrun(4, tmp_path, "--ep-size", "2", "--max-steps", "4", "--eval-every", "100",
                    "--ckpt-every", "4", "--host-allocator", "glibc", "--capacity-factor", "1.0",
                    "--capacity-target-drop", "0", "--capacity-tune-every", "2")
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    factors = [json.loads((ckpt / f"extra_rank{r}.json").read_text())["capacity_factors"] for r in range(4)]
    assert all(f == factors[0] for f in factors), factors  # every rank applied the same choice
    assert set(factors[0]) == {"layers.0.ffn", "layers.1.ffn"}
    for layer, factor in factors[0].items():
        assert factor > 1.0, (layer, factor)  # 1.0 dropped tokens; target 0 needs more room
    logged = [line for line in proc.stdout.splitlines() if line.startswith("capacity factors:")]
    assert len(logged) == 2  # after steps 2 and 4
    assert logged[-1] == "capacity factors: " + ", ".join(f"{n}={f}" for n, f in factors[0].items())
    drops = [r["drop_fraction"] for r in metrics(tmp_path)]
    assert drops[0] > 0 and drops[2] < drops[0], drops  # the first tuned steps drop less
