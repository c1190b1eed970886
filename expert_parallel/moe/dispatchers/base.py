"""The dispatcher interface: what ``MoELayer`` calls, and what every sibling returns.

Legend: T tokens, D model dim, S kept pairs this rank sends, N rows this rank's experts
receive, e local experts.

A dispatcher moves the kept (token, expert) pairs of a :class:`~..capacity.CapacityPlan`
to the ranks that hold their experts and brings the expert outputs home::

    run(x_TD, routing, plan, experts) = combine(experts(*dispatch(x_TD, routing, plan)))

``dispatch`` returns the rows for this rank's experts in local-expert-major order plus a
frozen metadata object that ``combine`` consumes; nothing is kept on ``self`` between
the two, so the layer is re-entrant and safe under activation checkpointing.
``MoELayer.forward`` makes exactly one call, :meth:`Dispatcher.run`. Siblings that
pipeline (``overlapped.py``) override ``run``; the others inherit the default.

Siblings (``moe/dispatchers/``): ``local`` (EP=1), ``all_to_all`` (flat),
``hierarchical`` (two hops, per-node de-duplication), ``padded`` (static shapes),
``overlapped`` (chunks pipelined over the flat or hierarchical exchange).
``factory.make_dispatcher`` picks one from the validated ``MoEConfig``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from ...profiling.timer import NULL_TIMER
from ..capacity import CapacityPlan
from ..router import Routing

ExpertFn = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]
"""``experts(x_ND, counts_local) -> y_ND``: the local experts on expert-major rows."""


class NonFiniteRouterError(FloatingPointError):
    """Router logits held NaN/Inf on at least one rank of the EP group."""


@dataclass(frozen=True)
class DispatchMetadata:
    """Everything ``combine`` needs to undo ``dispatch``; immutable."""

    num_tokens: int
    """Tokens of the dispatched batch (a chunk's tokens under the pipelined run)."""
    token_S: torch.Tensor
    """Source token (batch-local) of each kept pair, in expert-sorted order."""
    weight_S: torch.Tensor
    """Combine weight of each kept pair (fp32, carries the router gradient)."""
    input_splits: tuple[int, ...]
    """Rows this rank sends to each EP rank."""
    output_splits: tuple[int, ...]
    """Rows this rank receives from each EP rank."""
    counts_local: tuple[int, ...]
    """Rows per local expert, expert-major (what the experts consume)."""
    unregroup_N: Optional[torch.Tensor]
    """Expert-major -> arrival-order row indices (None when there is nothing to undo)."""
    nonfinite_ranks: tuple[int, ...]
    """EP ranks (group-local) whose router logits held NaN/Inf this forward."""
    out_dtype: torch.dtype
    route: Any = None
    """Extra facts a sibling needs to undo its exchange (the hierarchical one keeps its
    frozen ``NodeRoute`` here, the padded one its slot table); None for the flat one."""


class Dispatcher(abc.ABC):
    """The interface every dispatcher implements (a small ABC, not a hierarchy)."""

    timer: Any = NULL_TIMER

    @abc.abstractmethod
    def describe(self) -> str:
        """Short name of the data path, for logs and ``summary.json``."""

    @abc.abstractmethod
    def dispatch(self, x_TD: torch.Tensor, routing: Routing,
                 plan: CapacityPlan) -> tuple[torch.Tensor, DispatchMetadata]:
        """Send the kept pairs to their experts; rows come back local-expert-major."""

    @abc.abstractmethod
    def combine(self, y_ND: torch.Tensor, meta: DispatchMetadata) -> torch.Tensor:
        """Bring expert outputs home; weighted fp32 sum per token, ``out_TD``."""

    def run(self, x_TD: torch.Tensor, routing: Routing, plan: CapacityPlan,
            experts: ExpertFn, concurrent: Optional[Callable[[bool], Any]] = None) -> torch.Tensor:
        """dispatch -> experts -> combine. Returns ``out_TD`` (dtype of ``x_TD``).

        ``concurrent`` (e.g. the shared expert) is called once, while the dispatch
        exchange is in flight where the sibling can issue it asynchronously (flat,
        hierarchical, overlapped), else between dispatch and experts; its argument says
        whether this schedule places backward-time marks (``profiling/timer.py``), so
        the concurrent work places its own alike."""
        x_ND, meta = self.dispatch(x_TD, routing, plan)
        if concurrent is not None:
            concurrent(True)
        # Backward-time marks (identity; only with an enabled timer): profiling/timer.py.
        x_ND = self.timer.mark(x_ND, "experts")
        with self.timer.phase("experts"):
            y_ND = experts(x_ND, meta.counts_local)
        y_ND = self.timer.mark(y_ND, "combine_a2a")
        return self.combine(y_ND, meta)


class InnerTimer:
    """Descriptor for wrapper dispatchers: their ``timer`` is the wrapped one's (so
    ``MoELayer.set_timer`` reaches the dispatcher doing the work)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        return NULL_TIMER if obj is None else getattr(obj, self.attr).timer

    def __set__(self, obj: Any, value: Any) -> None:
        getattr(obj, self.attr).timer = value


class Staged(Protocol):
    """The stages of an exchanging dispatcher, for schedules that interleave several
    batches (``overlapped.py``): one count exchange for all chunks, then each chunk's
    row exchanges issued and completed separately. ``in_flight`` starts an exchange
    asynchronously; the matching ``finish_*`` waits for it. ``marks`` places the
    backward-time marks (``profiling/timer.py``; default: when not in flight)."""

    timer: Any

    def describe(self) -> str: ...

    def route(self, routing: Routing, plan: CapacityPlan, num_chunks: int) -> list: ...

    def start_dispatch(self, x_TD: torch.Tensor, chunk: Any, in_flight: bool,
                       marks: Optional[bool] = None) -> Any: ...

    def finish_dispatch(self, pending: Any) -> tuple[torch.Tensor, DispatchMetadata]: ...

    def start_combine(self, y_ND: torch.Tensor, meta: DispatchMetadata, in_flight: bool,
                      marks: Optional[bool] = None) -> Any: ...

    def finish_combine(self, pending: Any) -> torch.Tensor: ...


__all__ = ["Dispatcher", "DispatchMetadata", "ExpertFn", "InnerTimer", "NonFiniteRouterError", "Staged"]
