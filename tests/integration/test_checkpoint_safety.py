"""No code runs from a checkpoint.

A checkpoint directory is input from the file system, and its sha256 manifest lives in
the same directory, so whoever plants a file can update the manifest too. These tests
plant pickles whose unpickling would run code (it would create a marker file; the last
test shows that it does under ``weights_only=False``), rewrite the manifest so the hash
check passes, and require that loading refuses them with ``UnsafeCheckpointError`` and
the marker never appears:

* the loop's side state (``extra_rank<r>.pt``), planted for rank 1 only: every rank
  refuses together (no rank waits for a peer that gave up);
* torch.distributed.checkpoint's ``.metadata``, which torch 2.13 reads with plain
  ``pickle.load``; also its bytes items (read with ``weights_only=False``) and storage
  paths outside the checkpoint.

DeepSpeed's own files are covered in ``test_deepspeed.py``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_md

from expert_parallel.checkpoint import manager as ckpt
from expert_parallel.checkpoint.extra import capture_rng, load_extra, restore_rng, save_extra
from expert_parallel.checkpoint.safe_load import UnsafeCheckpointError, read_dcp_metadata
from tests.integration.launcher import losses, torchrun

pytestmark = pytest.mark.timeout(600)

RUN = ("--ep-size", "2", "--eval-every", "100", "--ckpt-every", "2", "--host-allocator", "glibc")


class Payload:
    """Unpickling this runs ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def plant_extra(path: Path, marker: Path) -> None:
    """Replace a side-state file with tensors plus the payload."""
    torch.save({"rng_torch": torch.get_rng_state(), "evil": Payload(marker)}, path)


def plant_metadata(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def rehash(checkpoint: Path) -> None:
    """Update the manifest so the checksums pass: only the pickle is the problem."""
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["files"] = {n: hashlib.sha256((checkpoint / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.verify(str(checkpoint)) == (True, "ok")


# ----------------------------------------------------------------------- in-process


def test_side_state_round_trips_as_tensors_and_json(tmp_path) -> None:
    extra = {"step": 7, "capacity_factors": {"layers.0.ffn": 1.5, "layers.1.ffn": None}, **capture_rng()}
    save_extra(str(tmp_path), 3, extra)
    assert json.loads((tmp_path / "extra_rank3.json").read_text())["step"] == 7
    assert set(torch.load(tmp_path / "extra_rank3.pt", weights_only=True)) == \
        {"rng_torch", "rng_numpy_keys", "rng_python_words"}
    draws = (torch.rand(3), random.random(), np.random.rand())
    loaded = load_extra(str(tmp_path), 3)
    restore_rng(loaded)  # exactly where capture_rng left the three generators
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], draws[0]) and again[1:] == draws[1:]
    assert loaded["capacity_factors"] == extra["capacity_factors"]
    with pytest.raises(TypeError, match="tensors or JSON values"):
        save_extra(str(tmp_path), 0, {"bad": object()})


def test_planted_side_state_is_refused_without_running(tmp_path) -> None:
    marker = tmp_path / "marker"
    save_extra(str(tmp_path), 0, {"step": 1})
    plant_extra(tmp_path / "extra_rank0.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"extra_rank0.pt: refusing to load: it is not plain tensor data"):
        load_extra(str(tmp_path), 0)
    assert not marker.exists()


def test_dcp_metadata_is_read_with_an_allow_list(tmp_path) -> None:
    good = tmp_path / "good"
    dcp.save({"w": torch.arange(4.0), "b": torch.zeros(2, dtype=torch.bfloat16)},
             storage_writer=dcp.FileSystemWriter(str(good)))
    assert set(read_dcp_metadata(str(good)).state_dict_metadata) == {"w", "b"}
    marker = tmp_path / "marker"
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    plant_metadata(evil / ".metadata", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"references builtins.exec"):
        read_dcp_metadata(str(evil))
    with pytest.raises(UnsafeCheckpointError):  # the reader ckpt.load_checkpoint uses
        ckpt.load_checkpoint(str(evil), {"w": torch.zeros(4)}, None)
    assert not marker.exists()


def test_dcp_bytes_items_and_escaping_paths_are_refused(tmp_path) -> None:
    good = tmp_path / "good"
    dcp.save({"w": torch.arange(4.0)}, storage_writer=dcp.FileSystemWriter(str(good)))
    md = pickle.loads((good / ".metadata").read_bytes())
    md.state_dict_metadata["w"] = dcp_md.BytesStorageMetadata()  # DCP would torch.load it unrestricted
    (good / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeCheckpointError, match=r"entry 'w' is BytesStorageMetadata"):
        read_dcp_metadata(str(good))
    dcp.save({"w": torch.arange(4.0)}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "esc")))
    md = pickle.loads((tmp_path / "esc" / ".metadata").read_bytes())
    for info in md.storage_data.values():
        info.relative_path = "../../elsewhere.distcp"
    (tmp_path / "esc" / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeCheckpointError, match="leaves the checkpoint directory"):
        read_dcp_metadata(str(tmp_path / "esc"))


# ----------------------------------------------------------------------- launcher


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    torchrun(2, out, *RUN, "--max-steps", "2")
    return out


def _resume_refused(out: Path, marker: Path, what: str) -> None:
    proc = torchrun(2, out, *RUN, "--max-steps", "4", "--resume", check=False, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    lines = [line for line in text.splitlines() if "train.py: error: UnsafeCheckpointError:" in line]
    assert len(lines) == 1 and what in lines[0], text[-3000:]  # once, from the first rank
    assert "CollectiveError" not in text  # every rank refused together: nobody waited for a peer
    assert not marker.exists()
    assert sorted(losses(out)) == [1, 2]  # nothing trained past the checkpoint


def test_resume_refuses_planted_side_state_of_one_rank(trained, tmp_path) -> None:
    out, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(trained, out)
    checkpoint = out / "checkpoints" / "step_00000002"
    plant_extra(checkpoint / "extra_rank1.pt", marker)  # rank 1's only: rank 0's is clean
    rehash(checkpoint)
    _resume_refused(out, marker, "extra_rank1.pt: refusing to load")


def test_resume_refuses_planted_dcp_metadata(trained, tmp_path) -> None:
    out, marker = tmp_path / "run", tmp_path / "marker"
    shutil.copytree(trained, out)
    checkpoint = out / "checkpoints" / "step_00000002"
    plant_metadata(checkpoint / ".metadata", marker)
    rehash(checkpoint)
    _resume_refused(out, marker, "references builtins.exec")


def test_the_payload_does_run_when_unpickled_unrestricted(tmp_path) -> None:
    """Proof that the tests above plant a working payload (what weights_only=False did)."""
    marker = tmp_path / "marker"
    plant_extra(tmp_path / "extra.pt", marker)
    torch.load(tmp_path / "extra.pt", weights_only=False)
    assert marker.read_text() == "code ran"
