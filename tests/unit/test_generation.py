"""KV-cache decoding (models/transformer.py KVCache, models/generation.py), single process.

The cached decode must compute what a full recompute of the sequence computes: the
logits of every position, fed in any chunking (prefill, then one token at a time, then a
chunk), and greedy generation must pick each full-recompute argmax. The dense model
(``moe_every=0``) and the MoE model (dropless) alike."""

from __future__ import annotations

import pytest
import torch

from expert_parallel import MoEConfig
from expert_parallel.models.generation import PromptTooLongError, decode, encode, generate
from expert_parallel.models.transformer import KVCache, ModelConfig, MoETransformer
from expert_parallel.training.options import parse_args


def _model(moe_every: int, seq_len: int = 24) -> MoETransformer:
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=24, num_experts=4, top_k=2, capacity_factor=None,
                    eval_capacity_factor=None)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=seq_len, moe_every=moe_every,
                      dense_ffn_hidden=48, moe=moe)
    return MoETransformer(cfg, seed=3).eval()


def _tokens(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("moe_every", [0, 1, 2])
def test_kv_cache_decode_equals_full_recompute(moe_every: int) -> None:
    model = _model(moe_every)
    tok = _tokens(3, 20)
    with torch.no_grad():
        full = model(tok).logits
        cache = KVCache.empty(model.cfg, 3)
        parts = [model(tok[:, :7], cache=cache).logits]             # prefill
        parts += [model(tok[:, i:i + 1], cache=cache).logits for i in range(7, 12)]  # one at a time
        parts.append(model(tok[:, 12:], cache=cache).logits)        # a chunk after cached tokens
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)


def test_dense_model_has_no_moe_layer() -> None:
    model = _model(0)
    assert model.moe_layers() == {}
    assert all(not b.is_moe for b in model.layers)
    assert parse_args(["--moe-every", "0"]).model.moe_every == 0
    with pytest.raises(ValueError, match="moe_every"):
        ModelConfig(moe_every=-1)


@pytest.mark.parametrize("moe_every", [0, 1])
def test_greedy_generation_picks_the_full_recompute_argmax(moe_every: int) -> None:
    model = _model(moe_every)
    prompt = _tokens(2, 5, seed=1)
    result = generate(model, prompt, 10)
    assert result.tokens_BN.shape == (2, 10) and len(result.token_latency_s) == 10
    assert all(t > 0 for t in result.token_latency_s)
    seq = torch.cat([prompt, result.tokens_BN], 1)
    with torch.no_grad():
        expected = model(seq[:, :-1]).logits.argmax(-1)[:, 4:]  # position p predicts token p + 1
    assert torch.equal(expected, result.tokens_BN)


def test_sampling_is_reproducible_and_top1_is_greedy() -> None:
    model = _model(1)
    prompt = _tokens(1, 4, seed=2)
    a = generate(model, prompt, 12, temperature=1.0, top_k=20, seed=7).tokens_BN
    b = generate(model, prompt, 12, temperature=1.0, top_k=20, seed=7).tokens_BN
    c = generate(model, prompt, 12, temperature=1.0, top_k=20, seed=8).tokens_BN
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, prompt, 12).tokens_BN
    assert torch.equal(generate(model, prompt, 12, temperature=0.7, top_k=1, seed=3).tokens_BN, greedy)


def test_prompt_longer_than_the_context_is_a_named_error() -> None:
    model = _model(1, seq_len=16)
    with pytest.raises(PromptTooLongError, match="longer than the model's context seq_len=16"):
        generate(model, _tokens(1, 17), 1)
    with pytest.raises(PromptTooLongError, match="at most 7 new tokens fit"):
        generate(model, _tokens(1, 10), 8)
    assert generate(model, _tokens(1, 10), 7).tokens_BN.shape == (1, 7)  # exactly fills the context


def test_byte_level_text_round_trip() -> None:
    assert decode(encode("def f(x): return 'é'")) == "def f(x): return 'é'"
