"""``benchmarks/_common.py``'s record-and-replay of collectives (the peak-memory method).

Real gloo ranks run a program with every kind of collective the peers use (c10d
``all_to_all_single`` sync and async, functional ``all_to_all_single``, ``all_reduce``,
``all_gather``) once recording, then replaying without peers: the replayed pass must
compute exactly what the real one did, consume the whole tape, and refuse a program
that issues a different collective. The peak of our layer's forward + backward measured
this way is identical over repeats.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from benchmarks._common import ReplayCollectives, replayed_peak_bytes
from tests.harness import run_ranks


def _program(rank: int) -> list[torch.Tensor]:
    x = torch.arange(8.0).view(4, 2) + 10 * rank
    send = [1, 3] if rank == 0 else [2, 2]   # uneven splits, as the layers' row exchanges
    recv = [1, 2] if rank == 0 else [3, 2]
    out = torch.empty(sum(recv), 2)
    dist.all_to_all_single(out, x, recv, send)
    out2 = torch.empty(4, 2)
    dist.all_to_all_single(out2, x, [2, 2], [2, 2], async_op=True).wait()
    y = funcol.all_to_all_single(x, [2, 2], [2, 2], dist.group.WORLD) * 1.0
    t = torch.ones(2) * (rank + 1)
    dist.all_reduce(t)
    parts = [torch.empty(2) for _ in range(2)]
    dist.all_gather(parts, t * rank)
    return [out.clone(), out2.clone(), y, t.clone(), *[p.clone() for p in parts]]


def _worker(rank: int, world: int) -> dict:
    from expert_parallel import MoEConfig, MoELayer, ParallelGroups

    recorder = ReplayCollectives()
    with recorder:
        real = _program(rank)
    replay = ReplayCollectives(recorder.tape)
    with replay:
        again = _program(rank)
    # A pass that issues another collective than the recorded one is refused.
    wrong = ReplayCollectives(recorder.tape)
    refused = ""
    try:
        with wrong:
            dist.all_reduce(torch.ones(1))
    except RuntimeError as err:
        refused = str(err)
    layer = MoELayer(MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2,
                               capacity_factor=1.25), ParallelGroups.build(2), seed=0)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(rank))

    def step() -> None:
        xx = x.clone().requires_grad_(True)
        out = layer(xx)
        (out.output.square().mean() + out.aux_loss).backward()

    step()
    mem = replayed_peak_bytes(step, repeats=3)
    return {"equal": [torch.equal(a, b) for a, b in zip(real, again)], "consumed": (replay.pos, len(recorder.tape)),
            "refused": refused, "mem": mem}


def test_replay_computes_what_the_real_run_did() -> None:
    for rank, res in enumerate(run_ranks(_worker, 2)):
        assert all(res["equal"]) and len(res["equal"]) == 6, (rank, res["equal"])
        assert res["consumed"][0] == res["consumed"][1] == 5, res["consumed"]
        assert "expected c10d::alltoall_base_, got c10d::allreduce_" in res["refused"], res["refused"]
        mem = res["mem"]
        assert len(mem["peak_bytes"]) == 3 and len(set(mem["peak_bytes"])) == 1 and mem["spread"] == 0.0, mem
        assert mem["peak_bytes"][0] > 0
        # The layer's exchanges were counted: counts + rows (forward and backward).
        assert mem["exchange_bytes"]["c10d::alltoall_base_"] > 0 and mem["largest_exchange_buffer"] > 0
