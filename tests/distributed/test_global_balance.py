"""``aux_loss_scope='global_batch'``: at DP=4 the mean of the ranks' losses and gradients
equals ONE process computing the loss over the 4 concatenated batches; with activation
checkpointing (the recompute must not count the load twice, nor issue another
collective) and with gradient accumulation over micro-batches (``start_global_batch``).

Four gloo ranks, EP=2 x expert-DP 2 (the load is summed over all 4 ranks: the data-
parallel group). The loss is the aux loss alone (coefficient 1), so the router gradient
is exactly the balancing loss's.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.distributed.collectives import CALL_COUNTS
from tests.harness import run_ranks

D, E, MICRO = 8, 8, 2
TOKENS = [(2, 3), (1, 5), (3, 2), (2, 2)]  # (sequences, length) per rank: unequal shares


def config() -> MoEConfig:
    return MoEConfig(hidden_size=D, ffn_hidden_size=8, num_experts=E, top_k=2, aux_loss_coeff=1.0,
                     aux_loss_scope="global_batch")


def micro_batch(rank: int, m: int) -> torch.Tensor:
    b, s = TOKENS[rank]
    return torch.randn(b * s, D, generator=torch.Generator().manual_seed(100 * m + rank))


def run(layer: MoELayer, xs: list[torch.Tensor], ckpt: bool) -> tuple[list[float], torch.Tensor]:
    """Micro-batches of one step: forward + backward each, grads accumulate."""
    layer.start_global_batch()
    layer.zero_grad(set_to_none=True)
    losses = []
    for x in xs:
        x = x.clone().requires_grad_(True)
        aux = checkpoint(lambda t: layer(t).aux_loss, x, use_reentrant=False) if ckpt else layer(x).aux_loss
        aux.backward()
        losses.append(float(aux.detach()))
    return losses, layer.router.weight.grad.clone()


def _worker(rank: int, world: int) -> dict:
    groups = ParallelGroups.build(2)
    out = {}
    for micro in (1, MICRO):
        for ckpt in (False, True):
            layer = MoELayer(config(), groups, seed=4)
            before = CALL_COUNTS["all_reduce_load"]
            losses, grad = run(layer, [micro_batch(rank, m) for m in range(micro)], ckpt)
            out[(micro, ckpt)] = {"losses": losses, "grad": grad,
                                  "load_all_reduces": CALL_COUNTS["all_reduce_load"] - before}
    return out


@pytest.fixture(scope="module")
def distributed() -> list[dict]:
    return run_ranks(_worker, 4, timeout=240)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "activation_checkpointing"])
@pytest.mark.parametrize("micro", [1, MICRO], ids=["one_micro_batch", "grad_accumulation"])
def test_global_batch_loss_equals_one_process_over_the_concatenated_batch(distributed, micro, ckpt) -> None:
    ref_layer = MoELayer(config(), None, seed=4)
    concat = [torch.cat([micro_batch(r, m) for r in range(4)]) for m in range(micro)]
    ref_losses, ref_grad = run(ref_layer, concat, ckpt=False)
    got = [d[(micro, ckpt)] for d in distributed]
    for m in range(micro):
        mean = sum(g["losses"][m] for g in got) / 4
        assert abs(mean - ref_losses[m]) <= 1e-5 * max(1.0, abs(ref_losses[m])), (m, mean, ref_losses[m])
    # The trainer averages gradients over the W ranks.
    torch.testing.assert_close(sum(g["grad"] for g in got) / 4, ref_grad, atol=1e-6, rtol=1e-5)
    # One load all-reduce per micro-batch forward: the recompute reused the saved load.
    assert all(g["load_all_reduces"] == micro for g in got)


def test_global_differs_from_micro_batch_loss(distributed) -> None:
    """Not vacuous: the ranks' own (micro-batch) losses would differ from the global one."""
    local = []
    for r in range(4):
        layer = MoELayer(config().replace(aux_loss_scope="micro_batch"), None, seed=4)
        local.append(float(layer(micro_batch(r, 0)).aux_loss.detach()))
    glob = [d[(1, False)]["losses"][0] for d in distributed]
    assert max(abs(a - b) for a, b in zip(local, glob)) > 1e-3
