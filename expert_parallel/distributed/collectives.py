"""Autograd-aware collectives used by the dispatcher.

Every function here names its group, its split semantics and whether it forces a
device-to-host synchronisation. A module-level call counter lets tests check that a
disabled profiler adds no collective.

Failures: a collective that fails or times out (a dead peer resets the connection, a
stuck peer lets the group's timeout expire) raises :class:`CollectiveError` naming the
MoE layer, the phase (``count_exchange`` / ``dispatch_a2a`` / ``combine_a2a``) and the
pass (forward / backward). Callers label their collectives with :func:`comm_scope`; the
row all-to-all remembers its label for the backward exchange, which autograd runs long
after the forward's scope has closed.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from contextvars import ContextVar
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

#: Number of collectives issued by this module, per kind (tests read it).
CALL_COUNTS: Counter = Counter()

# (where, phase, pass) of the collectives being issued; "" = not labelled.
_SCOPE: ContextVar[tuple[str, str, str]] = ContextVar("moe_comm_scope", default=("", "", ""))


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names layer, phase and pass."""


@contextlib.contextmanager
def comm_scope(where: Optional[str] = None, phase: Optional[str] = None,
               direction: Optional[str] = None) -> Iterator[None]:
    """Label the collectives issued inside for error messages: ``where`` (e.g.
    ``"MoE layer 'layers.0.ffn'"``), ``phase`` and ``direction`` (forward / backward).
    Unset parts are inherited from the enclosing scope. No communication."""
    old = _SCOPE.get()
    token = _SCOPE.set((old[0] if where is None else where, old[1] if phase is None else phase,
                        old[2] if direction is None else direction))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def current_scope() -> tuple[str, str, str]:
    """The (where, phase, pass) label in force; an autograd Function saves it in forward
    and restores it with :func:`comm_scope` around collectives it issues in backward."""
    return _SCOPE.get()


@contextlib.contextmanager
def guard(kind: str) -> Iterator[None]:
    """Re-raise a backend error (gloo/NCCL ``RuntimeError``, ``DistBackendError``) of the
    collective ``kind`` as a :class:`CollectiveError` carrying the current scope."""
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as err:
        where, phase, direction = _SCOPE.get()
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        detail = re.sub(r"^\[[^\]]*\]\s*", "", detail)  # drop gloo's "[source.cc:123]" prefix
        raise CollectiveError(
            f"{where or 'MoE runtime'}: collective {phase or kind!r} ({kind}) failed in the "
            f"{direction or 'forward'} pass: {detail}. A peer rank probably died or is stuck "
            "(check its log); the wait is bounded by the process-group timeout "
            "(ParallelGroups.build(timeout=...), --collective-timeout-s)."
        ) from err


def all_to_all_counts(counts_RX: torch.Tensor, group: Any) -> torch.Tensor:
    """Exchange equal-sized count blocks over ``group``.

    ``counts_RX`` is an integer tensor whose row ``r`` goes to EP rank ``r``; the result
    holds, in row ``r``, what rank ``r`` sent to us. Equal splits, no host sync.
    """
    CALL_COUNTS["all_to_all_counts"] += 1
    out_RX = torch.empty_like(counts_RX)
    with guard("all_to_all_counts"):
        dist.all_to_all_single(out_RX, counts_RX.contiguous(), group=group)
    return out_RX


def _all_to_all_rows(
    x_SD: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group: Any
) -> torch.Tensor:
    CALL_COUNTS["all_to_all_single"] += 1
    out_ND = x_SD.new_empty((sum(output_splits),) + tuple(x_SD.shape[1:]))
    with guard("all_to_all_single"):
        dist.all_to_all_single(
            out_ND, x_SD.contiguous(), list(output_splits), list(input_splits), group=group
        )
    return out_ND


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD, output_splits, input_splits, group):  # type: ignore[override]
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        ctx.scope = _SCOPE.get()  # the backward runs outside the caller's comm_scope
        return _all_to_all_rows(x_SD, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_ND):  # type: ignore[override]
        # The reverse exchange: what we received from rank r goes back to rank r.
        with comm_scope(ctx.scope[0], ctx.scope[1], "backward"):
            grad_SD = _AllToAllRows.apply(grad_ND, ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_SD, None, None, None


def all_to_all_rows(
    x_SD: torch.Tensor,
    output_splits: Sequence[int],
    input_splits: Sequence[int],
    group: Optional[Any],
) -> torch.Tensor:
    """Variable-size all-to-all of rows over ``group``, differentiable.

    ``input_splits[r]`` consecutive rows of ``x_SD`` go to EP rank ``r``;
    ``output_splits[r]`` rows arrive from rank ``r`` and are stacked rank-major. Splits
    are host ints (computing them is the dispatcher's one host sync). The backward is
    the same exchange with the splits swapped. ``group=None`` means a single process
    and returns ``x_SD`` unchanged.
    """
    if group is None:
        return x_SD
    return _AllToAllRows.apply(x_SD, tuple(output_splits), tuple(input_splits), group)


# -- asynchronous pair: start now, wait later (overlap.py, hierarchical.py) --------------
class _Ticket:
    """Work handles and buffers shared by a start/wait pair (forward and backward)."""

    __slots__ = ("work", "bwd_work", "bwd_out", "keep")


class _StartAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD, output_splits, input_splits, group, ticket):  # type: ignore[override]
        CALL_COUNTS["all_to_all_single_async"] += 1
        out_ND = x_SD.new_empty((sum(output_splits),) + tuple(x_SD.shape[1:]))
        x_SD = x_SD.contiguous()
        ticket.keep = x_SD  # the send buffer must outlive the async op
        with guard("all_to_all_single_async"):
            ticket.work = dist.all_to_all_single(out_ND, x_SD, list(output_splits),
                                                 list(input_splits), group=group, async_op=True)
        ctx.ticket = ticket
        ctx.scope = _SCOPE.get()  # the backward runs outside the caller's comm_scope
        return out_ND

    @staticmethod
    def backward(ctx, _grad_ND):  # type: ignore[override]
        ticket = ctx.ticket
        with comm_scope(ctx.scope[0], ctx.scope[1], "backward"), guard("all_to_all_single_async"):
            ticket.bwd_work.wait()
        return ticket.bwd_out, None, None, None, None


class _WaitAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_ND, output_splits, input_splits, group, ticket):  # type: ignore[override]
        with guard("all_to_all_single_async"):
            ticket.work.wait()
        ticket.keep = None
        ctx.splits, ctx.group, ctx.ticket = (output_splits, input_splits), group, ticket
        ctx.scope = _SCOPE.get()
        return out_ND.view_as(out_ND)

    @staticmethod
    def backward(ctx, grad_ND):  # type: ignore[override]
        output_splits, input_splits = ctx.splits
        ticket = ctx.ticket
        grad_ND = grad_ND.contiguous()
        CALL_COUNTS["all_to_all_single_async"] += 1
        ticket.bwd_out = grad_ND.new_empty((sum(input_splits),) + tuple(grad_ND.shape[1:]))
        ticket.keep = grad_ND
        with comm_scope(ctx.scope[0], ctx.scope[1], "backward"), guard("all_to_all_single_async"):
            ticket.bwd_work = dist.all_to_all_single(ticket.bwd_out, grad_ND, list(input_splits),
                                                     list(output_splits), group=ctx.group, async_op=True)
        return grad_ND, None, None, None, None


def start_all_to_all(x_SD, output_splits, input_splits, group) -> tuple[torch.Tensor, _Ticket]:
    """Begin a differentiable variable-split all-to-all over ``group``; finish it with
    :func:`wait_all_to_all`. Splits are host ints; no host sync here."""
    ticket = _Ticket()
    out = _StartAllToAll.apply(x_SD, tuple(output_splits), tuple(input_splits), group, ticket)
    return out, ticket


def wait_all_to_all(out_ND, output_splits, input_splits, group, ticket) -> torch.Tensor:
    return _WaitAllToAll.apply(out_ND, tuple(output_splits), tuple(input_splits), group, ticket)


def all_gather_rows(x: torch.Tensor, group: Optional[Any]) -> list[torch.Tensor]:
    """All-gather equal-shaped tensors over ``group`` (not differentiable)."""
    if group is None:
        return [x]
    CALL_COUNTS["all_gather"] += 1
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    with guard("all_gather"):
        dist.all_gather(parts, x.contiguous(), group=group)
    return parts
