"""The launcher's command line as a new user meets it: ``--help``, a misspelt option and
a refused value, through the real entry point (``python launch/train.py`` and torchrun).

A refusal is one line, printed once however many ranks there are (only the first rank
prints; every rank exits 2 before any rendezvous), with no Python traceback of ours.
torchrun's own failure report follows it; that is torchrun's, not the launcher's.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from expert_parallel.training.options import options
from tests.integration.launcher import REPO, TRAIN, clean_env, torchrun

pytestmark = pytest.mark.timeout(300)


def python_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *args], cwd=REPO, env=clean_env(), capture_output=True,
                          text=True, timeout=120)


def _no_traceback_of_ours(text: str) -> None:
    frames = [line for line in text.splitlines() if line.strip().startswith("File ")]
    assert not [f for f in frames if "launch/train.py" in f or "expert_parallel" in f], text[-3000:]


def test_help_lists_every_option_grouped() -> None:
    proc = python_train("--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = " ".join(proc.stdout.split())
    for title in ("model (ModelConfig)", "moe (MoEConfig)", "parallel (ParallelConfig)",
                  "capacity tuner (CapacityTunerConfig)", "training (TrainConfig)"):
        assert title in text
    for opt in options():
        assert f"--{opt.names[0]} " in text, opt.names
    assert "--a2a-algorithm FLAT|HIERARCHICAL|ALLGATHER|AUTO flat: one all-to-all over the EP group" in text
    assert "--ep-size VALUE Expert-parallel size" in text and "[value, default: auto]" in text


def test_misspelt_option_is_one_line_with_the_closest_name() -> None:
    proc = python_train("--capcity-factor", "1.5")
    assert proc.returncode == 2
    assert proc.stderr == "train.py: error: unknown option --capcity-factor; did you mean --capacity-factor?\n"
    assert proc.stdout == ""


def test_misspelt_option_under_torchrun_prints_once(tmp_path) -> None:
    proc = torchrun(2, tmp_path / "out", "--capcity-factor", "1.5", check=False, timeout=120)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert text.count("unknown option --capcity-factor; did you mean --capacity-factor?") == 1, text
    assert "exitcode  : 2" in text  # every worker exited with argparse's status
    _no_traceback_of_ours(text)
    assert not (tmp_path / "out").exists()


def test_validation_error_is_printed_once_on_four_ranks(tmp_path) -> None:
    proc = torchrun(4, tmp_path / "out", "--top-k", "9", check=False, timeout=120)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert text.count("top_k must be <= num_experts (4), got 9") == 1, text
    assert text.count("train.py: error:") == 1
    _no_traceback_of_ours(text)
    assert not (tmp_path / "out").exists()  # refused before anything was written
