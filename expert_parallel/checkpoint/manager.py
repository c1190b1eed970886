"""Atomic, checksummed, EP-resharding checkpoints on top of DCP.

Layout under ``OUT/checkpoints``::

    step_00000100/            a complete checkpoint (DCP files + extras + manifest)
        manifest.json         step, world/ep size, sha256 of every file
        extra_rank<r>.pt      per-rank RNG states (restored when the world size matches)
    step_00000200.partial/    a save in progress (never chosen, removed on next save)
    latest                    name of the newest complete checkpoint (informational)

Protocol: every rank writes into ``.partial``; after a barrier rank 0 hashes the files,
writes ``manifest.json`` (fsync), renames the directory (atomic on POSIX) and updates
``latest`` with an atomic replace. A kill at any moment leaves either the old set of
complete checkpoints or the old set plus the new one. On load the newest directory whose
manifest verifies is chosen; a corrupted or truncated one is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

MANIFEST = "manifest.json"


def _barrier(group: Any) -> None:
    if group is not None:
        dist.barrier(group=group)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def verify(path: str) -> tuple[bool, str]:
    """Check a checkpoint directory against its manifest. Returns (ok, reason)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return False, "no manifest (incomplete save)"
    try:
        with open(manifest_path) as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        return False, f"unreadable manifest ({err})"
    for name, digest in manifest.get("files", {}).items():
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            return False, f"missing file {name}"
        if _sha256(file_path) != digest:
            return False, f"checksum mismatch in {name}"
    return True, "ok"


def find_latest(root: str, log: Callable[[str], None] = print) -> Optional[str]:
    """Newest complete, verified checkpoint under ``root`` (or None)."""
    if not os.path.isdir(root):
        return None
    names = sorted(
        (n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".partial")),
        reverse=True,
    )
    for name in names:
        path = os.path.join(root, name)
        ok, reason = verify(path)
        if ok:
            return path
        log(f"checkpoint {path} rejected: {reason}; falling back to an older one")
    return None


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as fh:
        return json.load(fh)


def save_checkpoint(
    root: str,
    step: int,
    state: dict[str, Any],
    extra: dict[str, Any],
    meta: dict[str, Any],
    rank: int,
    group: Any,
    keep: int = 3,
    pause_before_commit_s: float = 0.0,
) -> str:
    """Collective over ``group`` (all ranks): write ``state`` with DCP atomically.

    ``pause_before_commit_s`` is a fault-injection hook for tests: every rank sleeps that
    long after writing its files and before the manifest and rename, while only the
    ``.partial`` directory exists.
    """
    final = step_dir(root, step)
    partial = final + ".partial"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        # Leftovers of saves killed mid-way are never loadable; drop them.
        for name in os.listdir(root):
            if name.startswith("step_") and name.endswith(".partial"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(partial)
    _barrier(group)
    with warnings.catch_warnings():
        # Single process (group None) is intended; DCP warns about it.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(partial, sync_files=True),
                 process_group=group)
    extra_path = os.path.join(partial, f"extra_rank{rank}.pt")
    torch.save(extra, extra_path)
    with open(extra_path, "rb") as fh:
        os.fsync(fh.fileno())
    if pause_before_commit_s > 0:
        time.sleep(pause_before_commit_s)
    _barrier(group)
    if rank == 0:
        files = sorted(n for n in os.listdir(partial) if n != MANIFEST)
        manifest = dict(meta, step=step, files={n: _sha256(os.path.join(partial, n)) for n in files})
        _fsync_write(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync_write(os.path.join(root, "latest"), os.path.basename(final) + "\n")
        complete = sorted(n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".partial"))
        for old in complete[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier(group)
    return final


def load_checkpoint(path: str, state: dict[str, Any], group: Any) -> None:
    """Collective: load ``state`` (tensors updated in place) from checkpoint ``path``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), process_group=group)


def load_extra(path: str, rank: int) -> Optional[dict]:
    extra_path = os.path.join(path, f"extra_rank{rank}.pt")
    if not os.path.isfile(extra_path):
        return None
    return torch.load(extra_path, weights_only=False)
