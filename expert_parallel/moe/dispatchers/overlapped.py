"""Communication/computation overlap: pipeline token chunks through any staged exchange.

Legend: T tokens, n chunks.

The local tokens are cut into n contiguous chunks. The inner dispatcher (flat
all-to-all or hierarchical) runs ONE count exchange for all chunks (one host sync);
then every chunk's dispatch exchange is *started* asynchronously, the experts compute
chunk c while later chunks are in flight, and each chunk's combine exchange is started
as soon as its experts finish and only waited for at the end::

    start D0  start D1  wait D0  experts(0)  start C0  wait D1  experts(1)  start C1 ...
    wait C0  combine(0)  wait C1  combine(1)

With the hierarchical exchange, the slow inter-node hop is what flies; its node-local
hop runs synchronously. The backward overlaps the same way without extra code: each
wait node starts the reverse exchange in its backward and the matching start node waits
for it, and autograd runs ready nodes latest-created first, so chunk c's expert
backward runs while chunk c-1's gradients are in flight. A token's pairs all live in
one chunk, so results equal the unchunked path (up to nothing: same rows, same sums).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..capacity import CapacityPlan
from ..router import Routing
from .base import Dispatcher, DispatchMetadata, ExpertFn, InnerTimer, Staged
from .staged import pipelined_run


class OverlappedDispatcher(Dispatcher):
    """``inner``'s exchange, with ``run`` pipelined over ``num_chunks`` (>= 2) chunks.
    ``dispatch`` / ``combine`` are the inner ones (one batch, nothing to overlap with)."""

    def __init__(self, inner: Staged, num_chunks: int) -> None:
        if num_chunks < 2:
            raise ValueError(f"overlap_chunks must be >= 2 to pipeline, got {num_chunks}")
        self.inner, self.num_chunks = inner, num_chunks

    timer = InnerTimer("inner")

    def describe(self) -> str:
        return f"{self.inner.describe()}+overlap({self.num_chunks})"

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan):
        return self.inner.dispatch(x_TD, routing, plan)

    def combine(self, y_ND: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        return self.inner.combine(y_ND, meta)

    def run(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan,
            experts: ExpertFn, concurrent: Optional[Callable[[bool], Any]] = None) -> torch.Tensor:
        return pipelined_run(self.inner, x_TD, routing, plan, experts, self.num_chunks, concurrent)


__all__ = ["OverlappedDispatcher"]
