"""Greedy generation with the experts sharded over EP=2 and EP=4 equals EP=1, token for token.

Each rank decodes its own two prompts (different on every rank, so the exchanges carry
different tokens each step) through the KV cache; the parent decodes the same prompts
with the EP=1 model of the same seed. Dropless, fp32. Dispatch modes: the flat all-to-all,
the all-gather dispatcher (decode-size batches) at a cap below the prefill's token count,
so the prefill falls back to the flat exchange and the decode steps gather, and auto (the
prefill flat; the first decode step gathers padded to 16 rows, the prefill's 12 rounded
up to a power of two, the next ones to 2)."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig, ParallelGroups
from expert_parallel.models.generation import generate
from expert_parallel.models.transformer import ModelConfig, MoETransformer
from tests.harness import run_ranks

NEW_TOKENS = 8


def _cfg(overrides: dict) -> ModelConfig:
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=24, num_experts=4, top_k=2, capacity_factor=1.0,
                    eval_capacity_factor=None, **overrides)
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, moe=moe)


def _prompts(rank: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank: int, world: int, overrides: dict) -> tuple:
    model = MoETransformer(_cfg(overrides), ParallelGroups.build(world), seed=5)
    tokens = generate(model, _prompts(rank), NEW_TOKENS).tokens_BN
    # The all-gather path records the largest per-rank count it last saw (2 sequences).
    gathered = [getattr(getattr(l.dispatcher, "gathering", l.dispatcher), "seen_max_tokens", None)
                for l in model.moe_layers().values()]
    return tokens, gathered


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mode", ["flat", "allgather", "auto"])
def test_greedy_generation_at_ep_n_equals_ep_1(world: int, mode: str) -> None:
    overrides = {"flat": {}, "allgather": {"a2a_algorithm": "allgather", "allgather_max_tokens": 4},
                 "auto": {"a2a_algorithm": "auto", "allgather_max_tokens": 32}}[mode]
    got = run_ranks(_worker, world, overrides)
    reference = MoETransformer(_cfg({}), seed=5)
    for rank, (tokens, gathered) in enumerate(got):
        assert gathered == ([None, None] if mode == "flat" else [2, 2]), gathered
        expected = generate(reference, _prompts(rank), NEW_TOKENS).tokens_BN
        assert tokens.shape == (2, NEW_TOKENS)
        assert torch.equal(tokens, expected), (rank, tokens, expected)
