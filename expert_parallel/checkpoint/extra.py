"""Per-rank side state of a checkpoint, as data: tensors + JSON, never a pickle of objects.

Each rank writes two files into the checkpoint directory::

    extra_rank<r>.pt     {name: tensor}   torch.save, read back with weights_only=True
    extra_rank<r>.json   {name: value}    step, capacity factors, RNG scalars, sizes

:func:`save_extra` splits one flat dict by value type (tensors to the ``.pt`` file,
JSON-serialisable values to the ``.json`` file) and :func:`load_extra` merges them back.
:func:`capture_rng` / :func:`restore_rng` turn the torch, numpy and Python RNG states into
such a dict and back, exactly (the Mersenne-Twister words as int64 tensors, the
scalars as JSON numbers, which round-trip floats exactly).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .safe_load import UnsafeCheckpointError, load_tensors


def extra_paths(directory: str, rank: int) -> tuple[str, str]:
    base = os.path.join(directory, f"extra_rank{rank}")
    return base + ".pt", base + ".json"


def _fsync(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def save_extra(directory: str, rank: int, extra: Mapping[str, Any]) -> None:
    """Write ``extra`` (tensors and JSON values) for ``rank`` into ``directory``, fsynced."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in extra.items() if isinstance(v, torch.Tensor)}
    info = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
    try:
        text = json.dumps(info, sort_keys=True, allow_nan=True)
    except TypeError as err:
        raise TypeError(f"checkpoint extra state must be tensors or JSON values: {err}") from None
    pt, js = extra_paths(directory, rank)
    torch.save(tensors, pt)
    with open(js, "w") as fh:
        fh.write(text)
    for path in (pt, js):
        _fsync(path)


def load_extra(directory: str, rank: int) -> Optional[dict[str, Any]]:
    """The merged extra state of ``rank`` (None when that rank wrote none).

    Raises :class:`UnsafeCheckpointError` when the tensor file is not plain tensor data
    (e.g. a pickle that would run code): it is never unpickled with ``weights_only=False``.
    """
    pt, js = extra_paths(directory, rank)
    if not os.path.isfile(pt) and not os.path.isfile(js):
        return None
    if not (os.path.isfile(pt) and os.path.isfile(js)):
        raise UnsafeCheckpointError(f"{directory}: extra state of rank {rank} is incomplete "
                                    f"(need both {os.path.basename(pt)} and {os.path.basename(js)})")
    tensors = load_tensors(pt)
    with open(js) as fh:
        try:
            info = json.load(fh)
        except json.JSONDecodeError as err:
            raise UnsafeCheckpointError(f"{js}: not valid JSON ({err})") from None
    if not isinstance(info, dict):
        raise UnsafeCheckpointError(f"{js}: expected a JSON object, got {type(info).__name__}")
    clash = set(info) & set(tensors)
    if clash:
        raise UnsafeCheckpointError(f"{directory}: keys {sorted(clash)} are in both extra files")
    return {**info, **tensors}


def capture_rng() -> dict[str, Any]:
    """The torch (CPU), numpy and Python RNG states as tensors + JSON scalars."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    return {
        "rng_torch": torch.get_rng_state(),
        "rng_numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "rng_numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "rng_python_words": torch.tensor(words, dtype=torch.int64),
        "rng_python": [int(version), gauss_next],
    }


def restore_rng(extra: Mapping[str, Any]) -> None:
    """Set the three RNGs from a :func:`capture_rng` dict."""
    torch.set_rng_state(extra["rng_torch"])
    kind, pos, has_gauss, cached = extra["rng_numpy"]
    np.random.set_state((kind, extra["rng_numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = extra["rng_python"]
    random.setstate((version, tuple(int(w) for w in extra["rng_python_words"].tolist()), gauss_next))


__all__ = ["save_extra", "load_extra", "extra_paths", "capture_rng", "restore_rng"]
