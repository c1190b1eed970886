"""A small decoder-only MoE transformer: the model the launcher trains.

Legend: B batch, S sequence, D model dim, V vocabulary, H heads.

Token + learned position embeddings, pre-norm blocks of causal self-attention (torch's
``scaled_dot_product_attention``) and a feed-forward block that is an expert-parallel
:class:`~expert_parallel.MoELayer` (every layer or every ``moe_every``-th layer) or a dense
GELU MLP (``moe_every=0``: all of them, a dense model). Dense parameters are replicated
(data-parallel); expert parameters are the local shard of each MoE layer. Initial weights
depend only on the seed, never on the EP size, so one seed gives one model at every EP size.

Decoding: ``model(tokens, cache=KVCache.empty(...))`` appends the new tokens' keys and
values to the cache and attends over everything cached so far, so a prompt is run once
and each new token costs one position (``models/generation.py`` drives it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MoEConfig, _check_int
from ..distributed.groups import ParallelGroups
from ..moe.layer import MoELayer
from ..moe.stats import MoEStats


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the MoE transformer (the MoE layers' own settings are in ``moe``)."""

    vocab_size: int = 256
    """Vocabulary size V (256 for byte-level text)."""
    seq_len: int = 128
    """Maximum sequence length (size of the position table)."""
    d_model: int = 128
    """Model width D; must equal ``moe.hidden_size``."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; must divide d_model."""
    moe_every: int = 1
    """1: every block's FFN is an MoE layer; 2: every other block (the rest dense); 0: no
    MoE layer at all, a dense model (every FFN a GELU MLP of ``dense_ffn_hidden``: the
    baseline ``benchmarks/moe_vs_dense.py`` sets beside the MoE models)."""
    dense_ffn_hidden: int = 512
    """Hidden size of the dense FFN blocks (when moe_every > 1, or 0)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save activation memory."""
    moe: MoEConfig = field(
        default_factory=lambda: MoEConfig(
            hidden_size=128, ffn_hidden_size=256, num_experts=8, top_k=2, capacity_factor=1.25,
            eval_capacity_factor=2.0, z_loss_coeff=0.001,
        )
    )
    """Configuration shared by every MoE layer (``hidden_size`` must equal ``d_model``)."""

    def __post_init__(self) -> None:
        for name, minimum in (("vocab_size", 2), ("seq_len", 1), ("d_model", 1), ("n_layers", 1),
                              ("n_heads", 1), ("moe_every", 0), ("dense_ffn_hidden", 1)):
            _check_int(name, getattr(self, name), minimum)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.moe.hidden_size != self.d_model:
            raise ValueError(
                f"moe.hidden_size={self.moe.hidden_size} must equal d_model={self.d_model}"
            )

    def is_moe_layer(self, index: int) -> bool:
        if self.moe_every == 0:  # a dense model
            return False
        return index % self.moe_every == self.moe_every - 1


@dataclass(frozen=True)
class ModelOutput:
    logits: torch.Tensor
    aux_loss: torch.Tensor
    """Sum of the MoE layers' aux losses (coefficients applied)."""
    stats: dict[str, MoEStats]
    """Per MoE layer name, this rank's routing stats."""


def _seeded_init(module: nn.Module, seed: int, tag: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed * 7919 + tag)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            with torch.no_grad():
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))


class KVCache:
    """Keys and values of every attention layer for ``batch`` sequences being decoded.

    ``k[i]``, ``v[i]``: layer i's ``[B, H, seq_len, D/H]`` buffers, valid up to ``length``.
    A forward with a cache writes its positions ``[length, length + S)`` in every layer,
    then advances ``length`` by S (:meth:`MoETransformer.forward`)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        self.k, self.v, self.length = k, v, 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> "KVCache":
        shape = (batch, cfg.n_heads, cfg.seq_len, cfg.d_model // cfg.n_heads)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)])

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            start = cache.length
            cache.k[layer][:, :, start : start + s] = k.to(cache.k[layer].dtype)
            cache.v[layer][:, :, start : start + s] = v.to(cache.v[layer].dtype)
            k, v = cache.k[layer][:, :, : start + s], cache.v[layer][:, :, : start + s]
            # New query i sits at position start + i and sees keys 0 .. start + i.
            mask = None if s == 1 else torch.ones(s, start + s, dtype=torch.bool, device=q.device).tril(start)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))


class DenseFFN(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.dense_ffn_hidden, bias=False)
        self.out = nn.Linear(cfg.dense_ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x_BSD)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, groups: ParallelGroups, seed: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.is_moe = cfg.is_moe_layer(index)
        self.name = f"layers.{index}"
        if self.is_moe:
            # Distinct experts per layer, still independent of ep_size.
            self.ffn: nn.Module = MoELayer(cfg.moe, groups, seed=seed * 1000 + index,
                                           name=f"layers.{index}.ffn")
        else:
            self.ffn = DenseFFN(cfg)
        _seeded_init(self.attn, seed, 10 * index + 1, cfg.moe.init_std)
        if not self.is_moe:
            _seeded_init(self.ffn, seed, 10 * index + 2, cfg.moe.init_std)

    def forward(self, x_BSD: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0):
        x_BSD = x_BSD + self.attn(self.ln1(x_BSD), cache, layer)
        h = self.ln2(x_BSD)
        if self.is_moe:
            out = self.ffn(h)
            return x_BSD + out.output, out.aux_loss, out.stats
        return x_BSD + self.ffn(h), None, None


class MoETransformer(nn.Module):
    """Decoder-only language model whose FFN blocks are expert-parallel MoE layers."""

    def __init__(self, cfg: ModelConfig, groups: Optional[ParallelGroups] = None, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.groups = groups if groups is not None else ParallelGroups.single()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        _seeded_init(self.tok_emb, seed, 0, cfg.moe.init_std)
        _seeded_init(self.pos_emb, seed, 0 + 5, cfg.moe.init_std)
        self.layers = nn.ModuleList(Block(cfg, i, self.groups, seed) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        _seeded_init(self.head, seed, 99_999, cfg.moe.init_std)

    def moe_layers(self) -> dict[str, MoELayer]:
        return {b.ffn.name: b.ffn for b in self.layers if b.is_moe}

    def forward(self, tokens_BS: torch.Tensor, cache: Optional[KVCache] = None) -> ModelOutput:
        """Logits for ``tokens_BS``; with a ``cache`` they continue the cached sequences
        (positions ``cache.length ...``) and the cache advances by S."""
        b, s = tokens_BS.shape
        start = 0 if cache is None else cache.length
        if start + s > self.cfg.seq_len:
            raise ValueError(f"sequence length {start + s} exceeds seq_len={self.cfg.seq_len}")
        pos = torch.arange(start, start + s, device=tokens_BS.device)
        x_BSD = self.tok_emb(tokens_BS) + self.pos_emb(pos)
        aux = torch.zeros((), device=x_BSD.device, dtype=torch.float32)
        stats: dict[str, MoEStats] = {}
        for i, block in enumerate(self.layers):
            if self.cfg.activation_checkpointing and self.training and cache is None:
                x_BSD, a, st = checkpoint(block, x_BSD, use_reentrant=False)
            else:
                x_BSD, a, st = block(x_BSD, cache, i)
            if a is not None:
                aux = aux + a
                stats[block.ffn.name] = st
        if cache is not None:
            cache.length += s
        logits = self.head(self.ln_f(x_BSD))
        return ModelOutput(logits=logits, aux_loss=aux, stats=stats)

