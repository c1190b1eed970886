"""The DeepSpeed engine path (issue 6), run for real under torchrun at 4 ranks, EP=2 x DP=2.

* ZeRO-1 and ZeRO-2 give the plain launcher's loss and gradient-norm trajectory on the
  same seed and data (fp32, tolerance 1e-5 relative; measured difference <= 2e-7).
  Gradient clipping is active in these runs (norm ~2 > clip 1), so a wrong expert
  gradient scale changes the trajectory: with DeepSpeed's non-contiguous ZeRO-1
  reduction (expert grads averaged over EDP, 2x too large here) the norm is off by 2.5e-4
  relative at step 1 and the loss by 6e-5 at step 2, 1e-3 at step 6 (measured), which
  these tolerances catch.
* Every expert is bit-identical on its EDP replicas after every step (checksums the
  trainer all-gathers and writes to ``deepspeed_replicas.jsonl``).
* ZeRO shards: the dense fp32 master and Adam state are split 4 ways, the experts' 2 ways.
* Stop at step 4 and resume: the continued losses equal the uninterrupted run's exactly.
* Every file of a DeepSpeed checkpoint loads with ``weights_only=True`` and the engine's
  allow-list; a planted optimizer file that would run code is refused on resume.

The first DeepSpeed run on a CPU host JIT-compiles DeepSpeed's shm op (cached in
~/.cache/torch_extensions); the timeouts below leave room for that.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expert_parallel.training.deepspeed_setup import safe_torch_load
from tests.integration.launcher import REPO, TINY, TRAIN, clean_env, free_port, losses, metrics
from tests.integration.test_checkpoint_safety import Payload

pytestmark = pytest.mark.timeout(1500)

STEPS = 6
CLIP = 1.0  # gradient_clipping in launch/configs/ds_zero*.json
CONFIGS = {1: REPO / "launch" / "configs" / "ds_zero1.json", 2: REPO / "launch" / "configs" / "ds_zero2.json"}
COMMON = ("--ep-size", "2", "--max-steps", str(STEPS), "--ckpt-every", "4", "--eval-every", "3",
          "--grad-clip", str(CLIP))


def ds_env() -> dict:
    env = clean_env()
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # the same code picks CUDA/NCCL on a GPU host
    return env


def run(nproc: int, out: Path, *args: str, timeout: float = 480, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", TRAIN, *TINY, "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Plain launcher and ZeRO-1 / ZeRO-2, same seed and data, 4 ranks, EP=2."""
    out = {}
    for name, extra in (("plain", ()), ("zero1", ("--deepspeed", str(CONFIGS[1]))),
                        ("zero2", ("--deepspeed", str(CONFIGS[2])))):
        path = tmp_path_factory.mktemp(name)
        run(4, path, *COMMON, *extra)
        out[name] = path
    return out


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_zero_matches_plain_launcher(runs, stage) -> None:
    want = {r["step"]: r for r in metrics(runs["plain"])}
    got = {r["step"]: r for r in metrics(runs[stage])}
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5, abs=1e-5), (stage, step)
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), (stage, step)
        assert got[step]["lr"] == want[step]["lr"]
    # Clipping must be exercised, or the check above would not see a gradient-scale error.
    assert sum(r["grad_norm"] > CLIP for r in want.values()) >= STEPS // 2
    # The model learns (the runs are not trivially equal because nothing moves).
    assert got[STEPS]["loss"] < got[1]["loss"] - 0.05
    val_want = [r["val_loss"] for r in want.values() if "val_loss" in r]
    val_got = [r["val_loss"] for r in got.values() if "val_loss" in r]
    assert val_got == pytest.approx(val_want, rel=1e-5)


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_expert_replicas_identical_after_every_step(runs, stage) -> None:
    with open(runs[stage] / "deepspeed_replicas.jsonl") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    previous = None
    for rec in records:
        sums, edp = rec["checksums"], rec["edp_groups"]
        assert edp == [[0, 2], [1, 3]]
        for ranks in edp:
            assert len({sums[r] for r in ranks}) == 1, rec  # replicas identical
        assert sums[0] != sums[1], rec  # different experts on the two EP ranks
        assert sums != previous, rec  # the experts were updated this step
        previous = sums


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_zero_shards_dense_over_dp_and_experts_over_edp(runs, stage) -> None:
    """Per rank, the fp32 master shard (and Adam state) of each dense param group is 1/4
    of the group, of the expert group 1/2 (alignment padding aside)."""
    ckpt = runs[stage] / "checkpoints" / "step_00000006"
    module = safe_torch_load(str(ckpt / "mp_rank_00_model_states.pt"))  # weights_only=True
    shapes = module["param_shapes"]  # one dict per optimizer param group, in group order
    group_numels = [sum(torch.Size(s).numel() for s in g.values()) for g in shapes]
    is_expert = [all(".experts." in n for n in g) for g in shapes]
    assert not any(any(".experts." in n for n in g) for g, e in zip(shapes, is_expert) if not e)
    assert sorted(is_expert) == [False, False, True]  # dense decay / no-decay, experts (all matrices)
    for rank in range(4):
        sd = safe_torch_load(str(ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))["optimizer_state_dict"]
        assert sd["partition_count"] == [2 if e else 4 for e in is_expert]
        parts = [t.numel() for t in sd["single_partition_of_fp32_groups"]]
        for numel, part, expert in zip(group_numels, parts, is_expert):
            ways = 2 if expert else 4
            assert numel // ways <= part <= numel // ways + 64, (rank, numel, part, expert)
        state = sd["base_optimizer_state"]["state"]
        assert [state[i]["exp_avg"].numel() for i in range(len(parts))] == parts


def test_stop_and_resume_equals_uninterrupted(runs, tmp_path) -> None:
    full = runs["zero2"]
    part = tmp_path / "resumed"
    run(4, part, *COMMON, "--stop-after", "4", "--deepspeed", str(CONFIGS[2]))
    assert max(losses(part)) == 4
    assert (part / "checkpoints" / "step_00000004" / "zero_pp_rank_3_mp_rank_00_optim_states.pt").is_file()
    run(4, part, *COMMON, "--resume", "--deepspeed", str(CONFIGS[2]))
    assert losses(part) == losses(full)  # exact float equality, steps 1..6
    with open(part / "deepspeed_replicas.jsonl") as fh:
        resumed = [json.loads(line) for line in fh if line.strip()]
    with open(full / "deepspeed_replicas.jsonl") as fh:
        uninterrupted = [json.loads(line) for line in fh if line.strip()]
    assert resumed == uninterrupted  # bit-identical experts after every step


def test_bad_deepspeed_config_fails_on_every_rank_before_training(tmp_path) -> None:
    bad = tmp_path / "zero3.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    proc = run(2, tmp_path / "out", "--ep-size", "2", "--max-steps", "2", "--deepspeed", str(bad),
               timeout=240, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "zero_optimization.stage=3 is not supported" in text
    assert not (tmp_path / "out" / "metrics.jsonl").exists() or not metrics(tmp_path / "out")


@pytest.mark.parametrize("ep", [1, 4])
def test_zero2_at_other_ep_sizes_matches_plain(runs, tmp_path, ep) -> None:
    """EP=1 (experts replicated on all 4 ranks, one EDP group of 4) and EP=4 (no expert
    replicas, EDP groups of 1): same trajectory as the plain EP=2 run."""
    args = list(COMMON)
    args[args.index("--ep-size") + 1] = str(ep)
    run(4, tmp_path, *args, "--ckpt-every", "0", "--deepspeed", str(CONFIGS[2]))
    want, got = losses(runs["plain"]), losses(tmp_path)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), (ep, step)


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_every_deepspeed_file_loads_without_unpickling_code(runs, stage) -> None:
    files = sorted((runs[stage] / "checkpoints" / "step_00000006").glob("*.pt"))
    assert {f.name for f in files} >= {"mp_rank_00_model_states.pt", "zero_pp_rank_3_mp_rank_00_optim_states.pt",
                                       "extra_rank0.pt"}
    for f in files:
        safe_torch_load(str(f))  # raises UnsafeCheckpointError for anything but plain data


def test_resume_refuses_a_planted_optimizer_file(runs, tmp_path) -> None:
    out, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(runs["zero2"], out)
    target = out / "checkpoints" / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = safe_torch_load(str(target))
    state["evil"] = Payload(marker)
    torch.save(state, target)
    proc = run(4, out, *COMMON, "--max-steps", "8", "--resume", "--deepspeed", str(CONFIGS[2]),
               check=False, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    lines = [line for line in text.splitlines() if "train.py: error: UnsafeCheckpointError:" in line]
    assert len(lines) == 1 and "zero_pp_rank_1_mp_rank_00_optim_states.pt: refusing to load" in lines[0], text[-3000:]
    assert not marker.exists() and "CollectiveError" not in text
