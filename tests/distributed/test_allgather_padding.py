"""The all-gather exchange pads to the rows it needs, not to its cap.

On 2 gloo ranks, ``allgather`` and ``auto`` (cap 16) run a sequence of forwards whose
per-rank token counts shrink, grow within the cap, and exceed it. Per forward: the
output and input gradient equal the EP=1 reference on each rank's batch (fp32,
<= 1e-5), and the gather ran at the padded size the module docstring promises (the
previous forward's largest count rounded up to a power of two; a second gather when some
rank outgrew it; the flat exchange above the cap).
"""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from tests.harness import run_ranks

D, F, E, CAP = 8, 12, 4, 16
# tokens per rank, per forward: (rank 0, rank 1)
SEQUENCE = [(3, 2), (1, 1), (5, 2), (9, 16), (20, 4), (2, 2)]
# allgather: pad per forward (None = flat fallback): the cap first; then the previous
# largest rounded up to a power of two, or (after a second gather) the new largest's.
EXPECTED_PADS = {"allgather": [16, 4, 8, 16, None, 16],
                 # auto: flat without a history (the first forward) or after a forward
                 # above the cap; as allgather otherwise.
                 "auto": [None, 4, 8, 16, None, None]}


def _config(mode: str) -> MoEConfig:
    return MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=2,
                     a2a_algorithm=mode, allgather_max_tokens=CAP)


def _batch(rank: int, i: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(31 * i + rank)
    return torch.randn(SEQUENCE[i][rank], D, generator=gen)


def _forward(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = layer(x).output
    out.square().sum().backward()
    return out.detach(), x.grad


def _worker(rank: int, world: int, mode: str) -> list:
    layer = MoELayer(_config(mode), ParallelGroups.build(world), seed=3)
    gathering = getattr(layer.dispatcher, "gathering", layer.dispatcher)
    got = []
    for i in range(len(SEQUENCE)):
        out, grad = _forward(layer, _batch(rank, i))
        got.append({"out": out, "grad": grad, "pad": gathering.last_pad})
    return got


@pytest.mark.parametrize("mode", ["allgather", "auto"])
def test_padding_follows_the_batch_and_results_equal_ep1(mode: str) -> None:
    results = run_ranks(_worker, 2, mode, timeout=300)
    reference = MoELayer(_config("flat"), seed=3)
    for rank, per_forward in enumerate(results):
        assert [r["pad"] for r in per_forward] == EXPECTED_PADS[mode], (rank, per_forward)
        for i, r in enumerate(per_forward):
            out, grad = _forward(reference, _batch(rank, i))
            assert torch.allclose(r["out"], out, atol=1e-5), (mode, rank, i)
            assert torch.allclose(r["grad"], grad, atol=1e-5), (mode, rank, i)
