"""Atomic, checksummed, EP-resharding checkpoints on top of DCP.

Layout under ``OUT/checkpoints``::

    step_00000100/            a complete checkpoint (DCP files + extras + manifest)
        manifest.json         step, world/ep size, sha256 of every file
        extra_rank<r>.pt      per-rank tensors (RNG states), read with weights_only=True
        extra_rank<r>.json    per-rank JSON (step, capacity factors, RNG scalars)
    step_00000200.partial/    a save in progress (never chosen, removed on next save)
    latest                    name of the newest complete checkpoint (informational)

Protocol: every rank writes into ``.partial``; after a barrier rank 0 hashes the files,
writes ``manifest.json`` (fsync), renames the directory (atomic on POSIX) and updates
``latest`` with an atomic replace. A kill at any moment leaves either the old set of
complete checkpoints or the old set plus the new one, and ``latest`` always names a
directory that exists. On load the newest directory whose manifest verifies is chosen;
a corrupted or truncated one is reported and skipped.

Retention (:func:`prune`) keeps the checkpoint just written and the ``keep - 1`` newest
older ones. Checkpoints with a *higher* step than the one just written belong to a line
of training that was abandoned (a resume fell back past them because they failed
verification), so they are removed too: they must never be chosen over the new one.

Nothing here unpickles objects: side state is tensors + JSON (``extra.py``) and DCP's
own metadata is read through ``safe_load.SafeFileSystemReader``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from typing import Any, Callable, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .extra import load_extra, save_extra
from .safe_load import SafeFileSystemReader, UnsafeCheckpointError, read_dcp_metadata

MANIFEST = "manifest.json"
LATEST = "latest"
STEP_PREFIX = "step_"


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
    return os.path.join(root, f"{STEP_PREFIX}{step:08d}")


def step_of(name: str) -> Optional[int]:
    """The step in a checkpoint directory name ``step_<N>`` (None for anything else)."""
    base = os.path.basename(name.rstrip("/"))
    digits = base[len(STEP_PREFIX):]
    if not base.startswith(STEP_PREFIX) or not digits.isdigit():
        return None
    return int(digits)


def complete_checkpoints(root: str) -> list[str]:
    """Names of the complete (not ``.partial``) checkpoint directories, oldest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if step_of(n) is not None
             and os.path.isdir(os.path.join(root, n))]
    return sorted(names, key=step_of)


def write_latest(root: str, name: Optional[str]) -> None:
    """Point ``latest`` at checkpoint ``name`` (or remove it when None), atomically."""
    path = os.path.join(root, LATEST)
    if name is None:
        if os.path.exists(path):
            os.remove(path)
        return
    _fsync_write(path, name + "\n")


def prune(root: str, keep: int, just_written: str, log: Callable[[str], None] = print) -> list[str]:
    """Retention after writing checkpoint ``just_written`` (a name under ``root``):
    keep it and the ``keep - 1`` newest checkpoints with a lower step; remove the rest,
    including any with a higher step (see the module docstring). Returns the removed names."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep!r}")
    current = step_of(just_written)
    if current is None or not os.path.isdir(os.path.join(root, just_written)):
        raise ValueError(f"prune: {just_written!r} is not a checkpoint under {root}")
    names = complete_checkpoints(root)
    older = [n for n in names if step_of(n) < current]
    newer = [n for n in names if step_of(n) > current]
    remove = older[: max(0, len(older) - (keep - 1))] + newer
    for name in newer:
        log(f"removing checkpoint {os.path.join(root, name)}: newer than the one just written "
            f"({just_written}), from an abandoned run")
    for name in remove:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return remove


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
    for name in reversed(complete_checkpoints(root)):
        path = os.path.join(root, name)
        ok, reason = verify(path)
        if ok:
            return path
        log(f"checkpoint {path} rejected: {reason}; falling back to an older one")
    return None


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as fh:
        return json.load(fh)


def inspect_checkpoint(path: str, rank: int = 0) -> int:
    """Check that what ``rank`` will read of checkpoint ``path`` loads without running
    code: DCP's metadata through the allow-list, the extra state of ``rank`` (and of rank
    0, its fallback) with ``weights_only=True``. Returns the checkpoint's step.

    No collective: the caller gathers the outcome so that a planted file is refused on
    every rank alike (:class:`UnsafeCheckpointError`), before the collective load."""
    read_dcp_metadata(path)
    for r in sorted({rank, 0}):
        load_extra(path, r)
    step = read_manifest(path).get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UnsafeCheckpointError(f"{path}: manifest step {step!r} is not a step number")
    return step


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
    log: Callable[[str], None] = print,
) -> str:
    """Collective over ``group`` (all ranks): write ``state`` with DCP atomically.

    ``extra`` is this rank's side state (tensors and JSON values, ``extra.py``); ``meta``
    goes into the manifest (rank 0's).

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
            if name.startswith(STEP_PREFIX) and name.endswith(".partial"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(partial)
    _barrier(group)
    with warnings.catch_warnings():
        # Single process (group None) is intended; DCP warns about it.
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(partial, sync_files=True),
                 process_group=group)
    save_extra(partial, rank, extra)
    if pause_before_commit_s > 0:
        time.sleep(pause_before_commit_s)
    _barrier(group)
    if rank == 0:
        files = sorted(n for n in os.listdir(partial) if n != MANIFEST)
        manifest = dict(meta, step=step, files={n: _sha256(os.path.join(partial, n)) for n in files})
        _fsync_write(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1))
        name = os.path.basename(final)
        if os.path.exists(final):
            # Re-saving a step: move ``latest`` off it first, so it never names a
            # directory that is gone, even if we are killed between the two renames.
            others = [n for n in complete_checkpoints(root) if n != name]
            write_latest(root, others[-1] if others else None)
            shutil.rmtree(final)
        os.rename(partial, final)
        write_latest(root, name)
        prune(root, keep, name, log=log)
    _barrier(group)
    return final


def load_checkpoint(path: str, state: dict[str, Any], group: Any) -> None:
    """Collective: load ``state`` (tensors updated in place) from checkpoint ``path``.

    The metadata is checked first (:class:`UnsafeCheckpointError`): inside ``dcp.load`` a
    refusal would surface as DCP's generic "metadata is None" assertion."""
    read_dcp_metadata(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, storage_reader=SafeFileSystemReader(path), process_group=group)


__all__ = ["MANIFEST", "LATEST", "step_dir", "step_of", "complete_checkpoints", "verify",
           "find_latest", "read_manifest", "inspect_checkpoint", "save_checkpoint",
           "load_checkpoint", "load_extra", "prune", "write_latest"]
