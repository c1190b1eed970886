"""``launch/generate.py`` end to end: a launcher checkpoint written at EP=2 generates the
same greedy text at EP=1, 2 and 4 (experts resharded on load), writes its JSON, and
refuses a bad checkpoint path or a prompt longer than the context with a named error.
The launcher run itself reports a sample of the trained model. Reads files, never stdout
(except the one-line refusals, which are the interface)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.launcher import REPO, clean_env, free_port, summary, torchrun

GENERATE = str(REPO / "launch" / "generate.py")
NEW = 10


def _generate(nproc: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable] + ([] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                                      f"--master_port={free_port()}"]) + [GENERATE, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "run"
    torchrun(2, out, "--max-steps", "3", "--eval-every", "3", "--sample-tokens", "6")
    return out


def test_launcher_report_shows_a_sample(run_dir: Path) -> None:
    s = summary(run_dir)
    assert s["sample"]["prompt"] == "def " and s["sample"]["tokens"] == 6
    assert len(s["sample"]["text"].encode("utf-8", errors="replace")) >= 1
    per_rank = s["per_rank"]["phases_s"]
    assert set(per_rank) >= {"router", "dispatch", "experts", "combine", "rest of step"}
    assert all(len(v) == 2 for v in per_rank.values()) and sum(per_rank["experts"]) > 0
    assert (run_dir / "report.png").exists()


def test_greedy_text_is_the_same_at_every_ep_size(run_dir: Path, tmp_path: Path) -> None:
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    results = {}
    for nproc, source in ((1, run_dir), (2, ckpt), (4, run_dir)):
        out = tmp_path / f"ep{nproc}.json"
        _generate(nproc, "--checkpoint", str(source), "--prompt", "import ", "--max-new-tokens", str(NEW),
                  "--out", str(out))
        results[nproc] = json.loads(out.read_text())
    for nproc, r in results.items():
        assert r["ep_size"] == nproc and r["world_size"] == nproc and r["step"] == 3
        assert len(r["tokens"]) == NEW and len(r["token_latency_s"]) == NEW
        assert all(t > 0 for t in r["token_latency_s"])
        assert r["trained_at"] == {"world_size": 2, "ep_size": 2}
    assert results[1]["tokens"] == results[2]["tokens"] == results[4]["tokens"]
    assert results[1]["text"] == results[4]["text"]


def test_bad_checkpoint_path_is_a_named_error(run_dir: Path, tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):  # missing; a directory that holds no run
        proc = _generate(1, "--checkpoint", str(path), check=False)
        assert proc.returncode == 2
        assert "CheckpointNotFoundError" in proc.stderr and str(path) in proc.stderr


def test_prompt_longer_than_the_context_is_a_named_error(run_dir: Path) -> None:
    proc = _generate(1, "--checkpoint", str(run_dir), "--prompt", "x" * 40, check=False)  # seq_len 32
    assert proc.returncode == 2
    assert "PromptTooLongError" in proc.stderr and "seq_len=32" in proc.stderr
    proc = _generate(2, "--checkpoint", str(run_dir), "--prompt", "x" * 40, check=False)
    assert proc.returncode != 0  # torchrun reports the ranks' status 2 as its own failure
    assert "PromptTooLongError" in proc.stderr and "seq_len=32" in proc.stderr
    assert proc.stderr.count("PromptTooLongError") == 1  # printed once, by the first rank
