"""Consensus checks: make every rank agree on a config before the first real collective.

A mismatched config across ranks (different ``top_k``, hidden size, EP size ...) turns
into an all-to-all with mismatched splits, which hangs or corrupts silently. Here each
rank contributes a small dict; one ``all_gather_object`` compares them and, on a
mismatch, *every* rank raises the same ``ValueError`` naming the context, the differing
field(s) and which ranks hold which value.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional

import torch.distributed as dist

from .collectives import CALL_COUNTS


def _digest(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def describe_mismatch(context: str, payloads: list[Mapping[str, Any]], ranks: list[int]) -> Optional[str]:
    """The error message for differing payloads, or None when all agree."""
    digests = [_digest(p) for p in payloads]
    if len(set(digests)) == 1:
        return None
    keys = sorted(set().union(*(p.keys() for p in payloads)))
    lines = []
    for key in keys:
        values: dict[str, list[int]] = {}
        for rank, payload in zip(ranks, payloads):
            values.setdefault(json.dumps(payload.get(key, "<missing>"), default=str), []).append(rank)
        if len(values) > 1:
            parts = "; ".join(f"{v} on ranks {r}" for v, r in values.items())
            lines.append(f"field {key!r}: {parts}")
    return f"{context}: ranks disagree on the configuration: " + " | ".join(lines)


def check_consensus(context: str, payload: Mapping[str, Any], group: Any,
                    ranks: Optional[list[int]] = None) -> None:
    """Collective over ``group``: raise ValueError on every rank if payloads differ.

    ``ranks`` are the global ranks of ``group`` (for the message). ``group=None`` (single
    process) checks nothing.
    """
    if group is None:
        return
    CALL_COUNTS["consensus"] += 1
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, dict(payload), group=group)
    message = describe_mismatch(context, gathered, ranks or list(range(len(gathered))))
    if message is not None:
        raise ValueError(message)
