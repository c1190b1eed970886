"""Fault injection with real processes: nothing hangs and nothing is lost (issue 7).

* **Dead or stuck peer** (gloo ranks, group timeout ``TIMEOUT_S``; 2 ranks for the flat,
  overlapped and static-shape dispatchers, 4 ranks in two "nodes" of 2 for the
  hierarchical one): rank 1 is SIGKILLed or stalls before the forward, inside the
  dispatch or combine, or before the backward; every other rank must exit non-zero with
  a :class:`CollectiveError` naming the layer, the phase and the pass, within the
  timeout. The same through the real launcher: a SIGSTOPped
  worker makes its peer fail within ``--collective-timeout-s``.
* **Elastic restart**: ``torchrun --max-restarts=2 ... --resume``; one worker is
  SIGKILLed mid-run, the restarted group resumes from the latest checkpoint, finishes,
  and its final checkpoint equals an uninterrupted run's, bitwise.
* **SIGKILL during a save** (``--fault-save-pause-s`` holds every rank inside the save
  while only ``step_*.partial`` exists): the previous checkpoint is chosen and loads.
* **Corrupted / truncated checkpoints** are rejected by checksum and the run falls back
  to the newest intact one, ending bitwise equal to the uninterrupted run.

Every wait is bounded (subprocess timeouts, small collective timeouts), so a regression
fails here instead of hanging CI. Measured times-to-error are printed (``pytest -s``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from expert_parallel.checkpoint import manager as ckpt
from tests.integration.launcher import REPO, TINY, TRAIN, clean_env, free_port, losses, metrics, summary

TIMEOUT_S = 10.0
"""Process-group timeout of the layer-level fault tests."""
LAUNCH_TIMEOUT_S = 15
"""--collective-timeout-s of the launcher-level stall test."""
STEPS, CKPT_EVERY = 60, 10
RUN = ["--ep-size", "2", "--max-steps", str(STEPS), "--ckpt-every", str(CKPT_EVERY),
       "--keep-checkpoints", "10", "--eval-every", "30"]


# ============================================================ layer level: dead / stuck peer
VICTIM = 1
"""The rank that dies or stalls; every other rank is a survivor and must fail."""


def _fault(mode: str) -> None:
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10 * TIMEOUT_S)  # "stall": alive, but never joins the collective


@dataclass(frozen=True)
class PeerCase:
    mode: str  # "die" (SIGKILL) or "stall" (alive, never joins)
    where: str  # forward / dispatch / combine / backward of the third step
    phase: str  # the phase the survivors' CollectiveError must name
    direction: str  # and the pass
    overrides: dict = field(default_factory=dict)  # MoEConfig fields
    world: int = 2
    ranks_per_node: int = 0  # > 0: ParallelGroups with node-local and cross-node groups


def _peer_worker(rank: int, store: str, case: PeerCase, results: str) -> None:
    """Two good steps, then rank VICTIM fails at ``case.where``; every other rank records
    what it raised in ``results/rank<r>.json``."""
    import torch.distributed as dist

    from expert_parallel import MoEConfig, MoELayer, ParallelGroups

    torch.set_num_threads(1)
    timeout = timedelta(seconds=TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=case.world,
                            timeout=timeout)
    groups = ParallelGroups.build(case.world, timeout=timeout, ranks_per_node=case.ranks_per_node)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=12, num_experts=4, **case.overrides),
                     groups, name="layers.0.ffn")
    victim = rank == VICTIM
    if victim and case.where in ("dispatch", "combine"):
        # dispatch: after the count exchange, before the first row exchange; combine: after
        # the experts, before the exchange back. Both are called through the instance.
        method = "start_dispatch" if case.where == "dispatch" else "combine"
        original = getattr(layer.dispatcher, method)

        def failing(*args, **kwargs):
            if layer.forward_calls == 3:
                _fault(case.mode)
            return original(*args, **kwargs)

        setattr(layer.dispatcher, method, failing)
    for step in range(3):
        x = torch.randn(8, 8, requires_grad=True)
        if step == 2 and victim and case.where == "forward":
            _fault(case.mode)
        t0 = time.monotonic()
        try:
            out = layer(x)
            if step == 2 and victim and case.where == "backward":
                _fault(case.mode)
            if step == 2 and case.where == "backward":
                t0 = time.monotonic()
            out.output.sum().backward()
        except Exception as err:
            with open(os.path.join(results, f"rank{rank}.json"), "w") as fh:
                json.dump({"type": type(err).__name__, "message": str(err),
                           "elapsed_s": time.monotonic() - t0, "step": step,
                           "dispatcher": layer.dispatcher.describe()}, fh)
            raise  # the survivor exits non-zero


# The padded path never reads the non-finite flag on the host: MoEConfig refuses 'raise'.
STATIC = {"static_shapes": True, "capacity_factor": 1.25, "eval_capacity_factor": 1.25,
          "nonfinite_policy": "count"}
OVERLAP = {"overlap_chunks": 2}
# 4 ranks, 2 per "node": rank 1 dies in node 0; rank 0 shares its node (intra-node hop),
# rank 3 its cross-node group, rank 2 neither, so it only learns through the others.
HIER = {"overrides": {"a2a_algorithm": "hierarchical"}, "world": 4, "ranks_per_node": 2}
PEER_CASES = {
    "dead_before_forward": PeerCase("die", "forward", "count_exchange", "forward"),
    "dead_in_dispatch": PeerCase("die", "dispatch", "dispatch_a2a", "forward"),
    "dead_in_combine": PeerCase("die", "combine", "combine_a2a", "forward"),
    "dead_before_backward": PeerCase("die", "backward", "combine_a2a", "backward"),
    "stuck_before_forward": PeerCase("stall", "forward", "count_exchange", "forward"),
    "stuck_in_combine": PeerCase("stall", "combine", "combine_a2a", "forward"),
    "stuck_before_backward": PeerCase("stall", "backward", "combine_a2a", "backward"),
    # The pipelined (overlap) dispatcher's async exchanges carry the same labels.
    "overlap_dead_before_forward": PeerCase("die", "forward", "count_exchange", "forward", OVERLAP),
    "overlap_dead_before_backward": PeerCase("die", "backward", "combine_a2a", "backward", OVERLAP),
    "overlap_stuck_before_backward": PeerCase("stall", "backward", "combine_a2a", "backward", OVERLAP),
    # Static shapes: no count exchange, so the padded dispatch exchange is the first to fail.
    "static_dead_before_forward": PeerCase("die", "forward", "dispatch_a2a", "forward", STATIC),
    "static_dead_before_backward": PeerCase("die", "backward", "combine_a2a", "backward", STATIC),
    # Hierarchical: the count all-gather, the two-hop dispatch and combine (forward and
    # backward), alone and pipelined.
    "hier_dead_before_forward": PeerCase("die", "forward", "count_exchange", "forward", **HIER),
    "hier_dead_in_dispatch": PeerCase("die", "dispatch", "dispatch_a2a", "forward", **HIER),
    "hier_dead_in_combine": PeerCase("die", "combine", "combine_a2a", "forward", **HIER),
    "hier_dead_before_backward": PeerCase("die", "backward", "combine_a2a", "backward", **HIER),
    "hier_stuck_before_backward": PeerCase("stall", "backward", "combine_a2a", "backward", **HIER),
    "hier_overlap_dead_before_backward": PeerCase("die", "backward", "combine_a2a", "backward",
                                                  {**HIER["overrides"], **OVERLAP}, 4, 2),
}


@pytest.mark.parametrize("case", list(PEER_CASES))
def test_dead_or_stuck_peer_fails_fast_with_named_phase(case: str) -> None:
    import torch.multiprocessing as mp

    spec = PEER_CASES[case]
    survivors = [r for r in range(spec.world) if r != VICTIM]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_peer_worker, args=(r, f"{tmp}/store", spec, tmp), daemon=True)
                 for r in range(spec.world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + TIMEOUT_S + 90  # start-up + the bounded wait
        for r in survivors:
            procs[r].join(max(deadline - time.monotonic(), 0))
        hung = [r for r in survivors if procs[r].is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        assert not hung, f"{case}: surviving ranks {hung} hung"
        codes = {r: procs[r].exitcode for r in survivors}
        assert all(c not in (0, None) for c in codes.values()), f"{case}: survivors exited {codes}"
        got = {}
        for r in survivors:
            with open(os.path.join(tmp, f"rank{r}.json")) as fh:
                got[r] = json.load(fh)
    for r, rec in got.items():
        print(f"\n{case}: rank {r} time-to-error {rec['elapsed_s']:.2f}s: {rec['message'][:160]}")
        assert rec["type"] == "CollectiveError" and rec["step"] == 2, (r, rec)
        assert re.match(rf"MoE layer 'layers\.0\.ffn': collective '{spec.phase}' \((all_to_all|all_gather)",
                        rec["message"]), (r, rec["message"])
        assert f"failed in the {spec.direction} pass" in rec["message"], (r, rec["message"])
        if spec.overrides.get("a2a_algorithm") == "hierarchical":  # not the one-node fallback
            assert rec["dispatcher"].startswith(f"hierarchical(ranks_per_node={spec.ranks_per_node})"), rec
    # Bounded by the collective timeout, not by a wall-clock guess (this machine is loaded):
    # every survivor gives up within one timeout (a second one elapsing would be the bug);
    # a dead peer's closed connection is noticed before the timeout could fire, at least by
    # the ranks that talk to it (one that does not learns when those exit, or times out).
    times = [rec["elapsed_s"] for rec in got.values()]
    assert max(times) < 2 * TIMEOUT_S, got
    if spec.mode == "die":
        assert min(times) < TIMEOUT_S, got


# ============================================================ launcher helpers
def _start(out: Path, *args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *extra, TRAIN, *TINY, "--out", str(out), *args]
    log = open(out / "launcher.log", "a")
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"launcher did not finish within {timeout}s")


def _run(out: Path, *args: str, timeout: float = 240) -> None:
    code = _finish(_start(out, *args), timeout)
    assert code == 0, (out / "launcher.log").read_text()[-4000:]


def _workers(agent_pid: int) -> dict[int, int]:
    """{global rank: pid} of the training processes under a torchrun agent."""
    found = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        pid = int(stat.split("/")[2])
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if b"RANK" in env and b"TORCHELASTIC_RUN_ID" in env and b"train.py" in cmdline \
                and _descends(pid, agent_pid):
            found[int(env[b"RANK"])] = pid
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _last_step(out: Path) -> int:
    try:
        return max((r["step"] for r in metrics(out)), default=0)
    except (OSError, json.JSONDecodeError):
        return 0


def _tensors(path: Path, scratch: Path) -> dict:
    """Every tensor of one DCP checkpoint directory, loaded in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = scratch / f"{path.parent.parent.name}_{path.name}.pt"
    dcp_to_torch_save(str(path), str(target))
    return torch.load(target, weights_only=True)  # our own conversion: tensors and plain values


def _assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), f"{what}: {key} differs"


def _ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run: EP=2 on 2 ranks, checkpoints every 10 steps, all kept."""
    out = tmp_path_factory.mktemp("reference")
    _run(out, *RUN)
    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    return out


# ============================================================ launcher: stuck worker
def test_launcher_stuck_worker_fails_within_collective_timeout(tmp_path: Path) -> None:
    out = tmp_path / "stall"
    proc = _start(out, "--ep-size", "2", "--max-steps", "100000", "--ckpt-every", "0",
                  "--eval-every", "100000", "--collective-timeout-s", str(LAUNCH_TIMEOUT_S),
                  extra=("--log-dir", str(tmp_path / "logs")))
    try:
        _wait_for(lambda: _last_step(out) >= 3, 120, "three training steps")
        workers = _wait_for(lambda: (w := _workers(proc.pid)) and len(w) == 2 and w, 10, "workers")
        os.kill(workers[1], signal.SIGSTOP)  # alive but silent: only a timeout can notice
        t0 = time.monotonic()
        _wait_for(lambda: not os.path.exists(f"/proc/{workers[0]}") or
                  open(f"/proc/{workers[0]}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
                  LAUNCH_TIMEOUT_S + 30, "rank 0 to exit", poll=0.1)
        elapsed = time.monotonic() - t0
    finally:
        for pid in _workers(proc.pid).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    code = _finish(proc, 60)
    assert code != 0
    errors = glob.glob(str(tmp_path / "logs" / "**" / "error.json"), recursive=True)
    messages = [json.load(open(p))["message"] for p in errors]
    text = json.dumps(messages)
    print(f"\nlauncher stall: rank 0 exited {elapsed:.1f}s after SIGSTOP of rank 1: {text[:300]}")
    assert "CollectiveError" in text and "Timed out" in text, text
    assert "step " in text and "collective '" in text, text
    # One timeout period, not a wall-clock guess (this machine may be loaded).
    assert elapsed < 2 * LAUNCH_TIMEOUT_S, elapsed


# ============================================================ elastic restart
def test_elastic_restart_after_sigkill_is_bitwise_identical(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "elastic"
    # torchrun reuses one store across restart rounds; launch_env prefixes it per round
    # (without that, a restarted rank could read a dead peer's stale address).
    proc = _start(out, *RUN, "--resume", extra=("--max-restarts=2",))
    try:
        first = _wait_for(lambda: (w := _workers(proc.pid)) and len(w) == 2 and w, 120, "workers")
        killed_at = _wait_for(lambda: (s := _last_step(out)) > 2 * CKPT_EVERY + 2 and s, 120,
                              "step 23")
        assert killed_at < STEPS, "the run finished before the kill; make it longer"
        os.kill(first[1], signal.SIGKILL)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert _finish(proc, 240) == 0, (out / "launcher.log").read_text()[-4000:]
    records = metrics(out)
    steps = [r["step"] for r in records]
    print(f"\nelastic: killed rank 1 at step {killed_at}; steps re-run after restart: "
          f"{sorted({s for s in steps if steps.count(s) > 1})}")
    # The restart redid the steps after the last checkpoint before the kill, from it.
    redone = {s for s in steps if steps.count(s) > 1}
    assert redone and min(redone) % CKPT_EVERY == 1 and min(redone) <= killed_at + 1, redone
    assert summary(out)["steps"] == STEPS and summary(out)["steps_this_run"] < STEPS
    assert losses(out) == losses(reference)  # last record per step; exact float equality
    _assert_bitwise(_tensors(_ckpt(out, STEPS), tmp_path), _tensors(_ckpt(reference, STEPS), tmp_path),
                    "final checkpoint after elastic restart")


# ============================================================ SIGKILL during a save
def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "killsave"
    partial = Path(str(_ckpt(out, 2 * CKPT_EVERY)) + ".partial")
    proc = _start(out, *RUN, "--fault-save-pause-s", "3")
    try:
        _wait_for(lambda: _ckpt(out, CKPT_EVERY).is_dir(), 120, "the first checkpoint")
        # Every rank sleeps inside the second save while only the .partial dir exists.
        _wait_for(lambda: partial.is_dir() and len(list(partial.glob("extra_rank*.pt"))) == 2,
                  120, "the second save in progress")
        workers = _workers(proc.pid)
        os.kill(workers[0], signal.SIGKILL)  # rank 0 is the one that commits
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert _finish(proc, 120) != 0
    assert partial.is_dir() and not _ckpt(out, 2 * CKPT_EVERY).exists()
    rejected: list[str] = []
    chosen = ckpt.find_latest(str(out / "checkpoints"), log=rejected.append)
    assert chosen == str(_ckpt(out, CKPT_EVERY)) and not rejected, (chosen, rejected)
    _assert_bitwise(_tensors(Path(chosen), tmp_path), _tensors(_ckpt(reference, CKPT_EVERY), tmp_path),
                    "previous checkpoint")
    # Resuming from it finishes exactly as if nothing had happened.
    _run(out, *RUN, "--resume")
    assert not partial.exists()  # the stale partial was cleaned by the next save
    assert summary(out)["steps_this_run"] == STEPS - CKPT_EVERY
    _assert_bitwise(_tensors(_ckpt(out, STEPS), tmp_path), _tensors(_ckpt(reference, STEPS), tmp_path),
                    "final checkpoint after resuming")


# ============================================================ corrupted checkpoints
def test_corrupted_checkpoints_are_rejected_and_older_one_used(tmp_path: Path, reference: Path) -> None:
    out = tmp_path / "corrupt"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    newest, second = _ckpt(out, STEPS), _ckpt(out, STEPS - CKPT_EVERY)
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    blob = bytearray((second / "extra_rank1.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped bit pattern in the middle
    (second / "extra_rank1.pt").write_bytes(bytes(blob))
    assert ckpt.verify(str(newest)) == (False, f"checksum mismatch in {shard.name}")
    assert ckpt.verify(str(second)) == (False, "checksum mismatch in extra_rank1.pt")
    _run(out, *RUN, "--resume")
    log = (out / "launcher.log").read_text()
    assert f"checkpoint {newest} rejected: checksum mismatch in {shard.name}" in log
    assert f"checkpoint {second} rejected: checksum mismatch in extra_rank1.pt" in log
    assert summary(out)["steps_this_run"] == 2 * CKPT_EVERY  # resumed from step 40
    assert sorted(losses(out)) == list(range(STEPS - 2 * CKPT_EVERY + 1, STEPS + 1))
    _assert_bitwise(_tensors(_ckpt(out, STEPS), tmp_path), _tensors(_ckpt(reference, STEPS), tmp_path),
                    "final checkpoint after falling back")


def test_manager_rejects_incomplete_and_damaged_checkpoints(tmp_path: Path) -> None:
    """In-process: the checks find_latest relies on, one damage at a time."""
    root = tmp_path / "checkpoints"
    state = {"w": torch.arange(6.0)}
    for step in (1, 2, 3):
        ckpt.save_checkpoint(str(root), step, {"w": state["w"] * step}, {"step": step}, {}, 0, None)
    assert ckpt.find_latest(str(root)) == str(_ckpt(tmp_path, 3))
    (_ckpt(tmp_path, 3) / ckpt.MANIFEST).unlink()
    (_ckpt(tmp_path, 2) / "extra_rank0.pt").unlink()
    os.makedirs(str(_ckpt(tmp_path, 4)) + ".partial")
    log: list[str] = []
    assert ckpt.find_latest(str(root), log=log.append) == str(_ckpt(tmp_path, 1))
    assert log == [
        f"checkpoint {_ckpt(tmp_path, 3)} rejected: no manifest (incomplete save); falling back to an older one",
        f"checkpoint {_ckpt(tmp_path, 2)} rejected: missing file extra_rank0.pt; falling back to an older one",
    ]
    loaded = {"w": torch.zeros(6)}
    ckpt.load_checkpoint(str(_ckpt(tmp_path, 1)), loaded, None)
    assert torch.equal(loaded["w"], torch.arange(6.0))
