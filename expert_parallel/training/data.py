"""Token data for the launcher: a built-in offline corpus and user files.

Built-in default (no download): byte-level tokens (vocab 256) of the Python standard
library's own ``.py`` files, which exist wherever Python is. Files are read in sorted
order; every 20th file goes to validation, the rest to training, so the split is
deterministic for a given Python installation.

``--data PATH``: a text file (byte-level tokens, vocab 256) or a nanoGPT-style ``.bin``
of little-endian uint16 tokens (last 10% used for validation).

Batches are *stateless*: the global batch of step ``s`` is drawn from a generator seeded
by ``(seed, s)``; each rank takes its contiguous slice. The data position is therefore
just the step, which the checkpoint stores, and resuming reproduces the same batches.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

BUILTIN_MAX_BYTES = 12 * 1024 * 1024
VAL_EVERY_NTH_FILE = 20


@dataclass(frozen=True)
class TokenData:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not (skip & set(p.relative_to(root).parts))]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_builtin_corpus() -> TokenData:
    train_parts, val_parts, total = [], [], 0
    for i, path in enumerate(_stdlib_files()):
        try:
            blob = path.read_bytes()
        except OSError:
            continue
        (val_parts if i % VAL_EVERY_NTH_FILE == 0 else train_parts).append(blob)
        total += len(blob)
        if total >= BUILTIN_MAX_BYTES:
            break
    if not train_parts or not val_parts:
        raise ValueError("built-in corpus: no Python standard library sources were found")
    train = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
    val = np.frombuffer(b"".join(val_parts), dtype=np.uint8)
    return TokenData(train=train, val=val, vocab_size=256, source="python-stdlib")


def load_token_file(path: str, vocab_size: int) -> TokenData:
    """Load ``--data PATH``; raises ValueError naming the file for bad input."""
    if not os.path.exists(path):
        raise ValueError(f"data: file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"data: {path!r} is a directory, expected a text or .bin file")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"data: file {path!r} is empty")
    if path.endswith(".bin"):
        if size % 2:
            raise ValueError(
                f"data: {path!r} has {size} bytes, not a whole number of uint16 tokens "
                "(expected a nanoGPT-style .bin)"
            )
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        top = int(tokens.max())
        if top >= vocab_size:
            raise ValueError(
                f"data: {path!r} holds token id {top} >= vocab_size={vocab_size}"
            )
        vocab = vocab_size
    else:
        tokens = np.fromfile(path, dtype=np.uint8)
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 for byte-level text, got {vocab_size}")
        vocab = vocab_size
    split = int(len(tokens) * 0.9)
    return TokenData(train=tokens[:split], val=tokens[split:], vocab_size=vocab, source=path)


def load_data(path: Optional[str], vocab_size: int, seq_len: int) -> TokenData:
    data = load_builtin_corpus() if path is None else load_token_file(path, vocab_size)
    for split in ("train", "val"):
        n = len(getattr(data, split))
        if n < seq_len + 2:
            raise ValueError(
                f"data: the {split} split of {data.source!r} has {n} tokens, fewer than "
                f"seq_len + 2 = {seq_len + 2}"
            )
    return data


class BatchSampler:
    """Stateless global batches; rank ``r`` of ``W`` takes rows [r*b, (r+1)*b)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, rank: int,
                 world_size: int, seed: int, stream: int = 0) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"global_batch_size={global_batch} must be divisible by the world size {world_size}"
            )
        self.tokens, self.seq_len, self.global_batch = tokens, seq_len, global_batch
        self.rank, self.world_size, self.seed, self.stream = rank, world_size, seed, stream
        self.local_batch = global_batch // world_size

    def batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch)
        mine = starts[self.rank * self.local_batch : (self.rank + 1) * self.local_batch]
        rows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in mine])
        rows_t = torch.from_numpy(rows).to(device)
        return rows_t[:, :-1], rows_t[:, 1:]
