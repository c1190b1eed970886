"""Autoregressive generation with the KV cache: the prompt once, then one position per token.

Legend: B batch, P prompt length, N new tokens, V vocabulary.

:func:`generate` runs the prompt through the model once (prefill, filling a
:class:`~.transformer.KVCache`), then feeds back each sampled token alone, so a decode
step costs one position per sequence however long the context is. Sampling: greedy at
``temperature=0``, else softmax of ``logits / temperature`` over the ``top_k`` largest
(all when None), drawn from a generator seeded by ``seed``: the same seed gives the same
text.

Collective: the MoE layers exchange tokens on every forward, so every rank of the model's
EP group calls :func:`generate` with prompts of the same shape, for the same number of
tokens. Each rank may decode its own sequences (its batch rows); when every rank holds
the *same* prompts (``launch/generate.py``), pass ``sync_group`` and the first rank's
choice of each token is broadcast, so all ranks continue one text even if their logits
differ in the last bit.

Byte-level text (vocab 256, the launcher's built-in corpus): :func:`encode` /
:func:`decode`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .transformer import KVCache, MoETransformer


class PromptTooLongError(ValueError):
    """The prompt (with the tokens to generate) does not fit the model's context."""


@dataclass(frozen=True)
class GenerationResult:
    tokens_BN: torch.Tensor
    """The generated tokens (the prompt not included), ``[B, N]`` int64 on the host."""
    token_latency_s: list[float]
    """Seconds per generated token: entry 0 is the prefill plus the first token (time to
    first token), entry i > 0 one decode step (forward of one position + sampling)."""
    prompt_tokens: int


def encode(text: str) -> list[int]:
    """Byte-level tokens of ``text`` (UTF-8)."""
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    """Text of byte-level tokens (invalid UTF-8 shown as U+FFFD)."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def check_context(prompt_len: int, max_new_tokens: int, seq_len: int) -> None:
    """Raise :class:`PromptTooLongError` unless the prompt and the new tokens fit: the
    prompt and all but the last new token pass through the cache (``P + N - 1 <= seq_len``)."""
    if prompt_len < 1:
        raise PromptTooLongError("the prompt is empty: generation needs at least one token to continue")
    if prompt_len > seq_len:
        raise PromptTooLongError(f"the prompt has {prompt_len} tokens, longer than the model's context "
                                 f"seq_len={seq_len}")
    if prompt_len + max_new_tokens - 1 > seq_len:
        raise PromptTooLongError(
            f"the prompt has {prompt_len} tokens: with --max-new-tokens {max_new_tokens} the sequence "
            f"would reach {prompt_len + max_new_tokens - 1} positions, more than the model's context "
            f"seq_len={seq_len}; at most {seq_len - prompt_len + 1} new tokens fit")


def sample(logits_BV: torch.Tensor, temperature: float, top_k: Optional[int],
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token per row: argmax at ``temperature=0``, else a draw from the tempered
    softmax over the ``top_k`` largest logits."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    probs = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate(model: MoETransformer, prompt_BP: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_k: Optional[int] = None, seed: int = 0,
             sync_group: Any = None, autocast: Any = None) -> GenerationResult:
    """Continue every row of ``prompt_BP`` by ``max_new_tokens`` tokens (collective over
    the model's EP group; see the module docstring). ``autocast``: a context-manager
    factory to run the forwards under (e.g. ``Precision.autocast``), None for none.
    The model is put in eval mode and left there."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k!r}")
    cfg = model.cfg
    b, p = prompt_BP.shape
    check_context(p, max_new_tokens, cfg.seq_len)
    model.eval()
    device = prompt_BP.device
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache.empty(cfg, b, device, model.tok_emb.weight.dtype)
    src = None if sync_group is None else dist.get_global_rank(sync_group, 0)
    out, latency = [], []
    tokens = prompt_BP
    for i in range(max_new_tokens):
        t0 = _now(device)
        if autocast is not None:
            with autocast(device.type):
                logits = model(tokens, cache=cache).logits
        else:
            logits = model(tokens, cache=cache).logits
        nxt_B = sample(logits[:, -1], temperature, top_k, generator)
        if sync_group is not None:
            dist.broadcast(nxt_B, src=src, group=sync_group)
        out.append(nxt_B)
        tokens = nxt_B.unsqueeze(1)
        latency.append(_now(device) - t0)
    return GenerationResult(tokens_BN=torch.stack(out, 1).cpu(), token_latency_s=latency, prompt_tokens=p)


__all__ = ["GenerationResult", "PromptTooLongError", "generate", "sample", "encode", "decode",
           "check_context"]
