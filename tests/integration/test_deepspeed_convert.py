"""DeepSpeed <-> DCP checkpoint conversion (``expert_parallel.training.deepspeed_convert``),
run for real under torchrun at 4 ranks.

Both directions are checked by what matters: a run continued from the converted
checkpoint gives the same losses as an uninterrupted plain run (fp32, 1e-5), across a
change of EP size (DCP reshards the experts by their global keys).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.launcher import REPO, TINY, losses
from tests.integration.test_deepspeed import COMMON, CONFIGS, ds_env, run
from tests.integration.launcher import free_port

pytestmark = pytest.mark.timeout(1500)


def convert(direction: str, src: Path, dst: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=4", f"--master_port={free_port()}",
           "-m", "expert_parallel.training.deepspeed_convert", direction, "--src", str(src), "--dst", str(dst),
           *TINY, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ds_env(), capture_output=True, text=True, timeout=480)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def _with_ep(args: tuple[str, ...], ep: int) -> list[str]:
    out = list(args)
    out[out.index("--ep-size") + 1] = str(ep)
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("plain")
    run(4, out, *COMMON)  # EP=2, uninterrupted
    return losses(out)


def test_deepspeed_to_dcp_then_plain_resume_at_other_ep(tmp_path, plain) -> None:
    ds = tmp_path / "ds"
    run(4, ds, *COMMON, "--stop-after", "4", "--deepspeed", str(CONFIGS[2]))
    dst = tmp_path / "dcp"
    convert("to-dcp", ds, dst, *COMMON, "--deepspeed", str(CONFIGS[2]))
    assert (dst / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    run(4, dst, *_with_ep(COMMON, 4), "--resume")  # the plain launcher, experts resharded 2 -> 4
    got = losses(dst)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(plain[step], rel=1e-5, abs=1e-5), step


def test_dcp_to_deepspeed_then_deepspeed_resume_at_other_ep(tmp_path, plain) -> None:
    src = tmp_path / "plain4"
    run(4, src, *_with_ep(COMMON, 4), "--stop-after", "4")  # plain, EP=4
    dst = tmp_path / "ds"
    convert("from-dcp", src, dst, *COMMON, "--deepspeed", str(CONFIGS[1]))  # DeepSpeed, EP=2
    assert (dst / "checkpoints" / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    run(4, dst, *COMMON, "--resume", "--deepspeed", str(CONFIGS[1]))
    got = losses(dst)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(plain[step], rel=1e-5, abs=1e-5), step


def test_deepspeed_resume_refuses_a_dcp_checkpoint(tmp_path) -> None:
    out = tmp_path / "run"
    run(4, out, *COMMON, "--stop-after", "2")  # plain DCP checkpoint at step 2
    proc = run(4, out, *COMMON, "--resume", "--deepspeed", str(CONFIGS[2]), check=False)
    assert proc.returncode != 0
    assert "is in the project's DCP format, not DeepSpeed's" in proc.stdout + proc.stderr
