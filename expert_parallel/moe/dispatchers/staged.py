"""Staged dispatchers and the schedule that interleaves their stages.

An exchanging dispatcher (flat, hierarchical) splits its work into stages: ``route``
(sort pairs, the one count exchange, for n chunks at once), ``start_dispatch`` /
``finish_dispatch`` and ``start_combine`` / ``finish_combine`` (each exchange issued,
then completed; ``in_flight`` issues it asynchronously). :class:`StagedDispatcher`
builds the interface (``dispatch`` / ``combine`` / ``run``) from them once, and
:func:`pipelined_run` is the schedule that overlaps them: with chunks (the overlapped
dispatcher) and with concurrent work such as the shared expert.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..capacity import CapacityPlan
from ..router import Routing
from .base import Dispatcher, DispatchMetadata, ExpertFn, Staged


class StagedDispatcher(Dispatcher):
    """A dispatcher whose exchange runs in stages (``route`` / ``start_*`` / ``finish_*``,
    the :class:`Staged` protocol): ``dispatch`` / ``combine`` are the stages back to
    back, and ``run`` issues the dispatch exchange in flight when there is concurrent
    work (the shared expert) to overlap it with (``overlapped.pipelined_run``)."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan):
        (chunk,) = self.route(routing, plan)  # type: ignore[attr-defined]
        return self.finish_dispatch(self.start_dispatch(x_TD, chunk))  # type: ignore[attr-defined]

    def combine(self, y_ND: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        return self.finish_combine(self.start_combine(y_ND, meta))  # type: ignore[attr-defined]

    def run(self, x_TD, routing, plan, experts, concurrent=None):
        if concurrent is None:  # synchronous, with the backward-time marks
            return super().run(x_TD, routing, plan, experts)
        return pipelined_run(self, x_TD, routing, plan, experts, 1, concurrent)


def pipelined_run(inner: Staged, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan,
                  experts: ExpertFn, num_chunks: int,
                  concurrent: Optional[Callable[[bool], Any]] = None) -> torch.Tensor:
    """The schedule drawn in ``overlapped.py`` over ``inner``'s stages; ``concurrent`` runs
    once every dispatch exchange is in flight (``num_chunks=1``: plain dispatch, with
    only the concurrent work overlapping it)."""
    timer = inner.timer
    chunks = inner.route(routing, plan, num_chunks)
    # Backward-time marks only with one chunk: several chunks' backwards interleave.
    marks = len(chunks) == 1
    dispatches = [inner.start_dispatch(x_TD, chunk, in_flight=True, marks=marks) for chunk in chunks]
    if concurrent is not None:
        concurrent(marks)
    combines = []
    for pending in dispatches:
        x_ND, meta = inner.finish_dispatch(pending)
        x_ND = timer.mark(x_ND, "experts") if marks else x_ND
        with timer.phase("experts"):
            y_ND = experts(x_ND, meta.counts_local)
        y_ND = timer.mark(y_ND, "combine_a2a") if marks else y_ND
        combines.append(inner.start_combine(y_ND, meta, in_flight=num_chunks > 1, marks=marks))
    outs = [inner.finish_combine(pending) for pending in combines]
    # Chunks are contiguous and in order, so their outputs stack into out_TD.
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


__all__ = ["StagedDispatcher", "pipelined_run"]
