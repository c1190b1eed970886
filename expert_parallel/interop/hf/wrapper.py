"""Swap a transformers model's MoE blocks for expert-parallel ones, and back.

``replace_moe_blocks(model, groups)`` finds the blocks by structure (``blocks.py``),
maps each with its family mapping, checks the mapping against the installed
transformers block on probe tokens, and puts an :class:`HFMoEBlock` in its place: a thin
module around an :class:`~expert_parallel.moe.layer.MoELayer` holding only this rank's
``E / ep_size`` experts, whose ``forward`` returns what the HF block returned (a tensor,
or GPT-OSS's ``(hidden_states, router_scores)`` pair with ``None`` scores). Everything
else (attention, norms, embeddings, dense MLP layers, lm_head) stays and is replicated.

The original block is kept, emptied onto the ``meta`` device (no memory), so that
``gather_to_hf`` can put the same module back -- class, config and hooks included --
filled with the gathered weights; ``hf_state_dict`` returns the full HF state dict
without changing the model. Both are collectives over each block's EP group.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ...config import MoEConfig
from ...distributed.groups import ParallelGroups
from ...moe.layer import MoELayer
from ...moe.stats import MoEStats
from .blocks import BlockMatch, find_moe_blocks, load_layer, verify_block
from .mapping import Mapping, unused_must_be_zero


class HFMoEBlock(nn.Module):
    """Drop-in replacement of a transformers MoE block.

    ``forward`` returns what the HF block returned; the aux loss and routing stats of the
    last call are kept in ``last_aux_loss`` / ``last_stats`` because the HF decoder layer
    has no channel for them (read them with :func:`moe_aux_loss` / :func:`moe_stats`
    right after the model's forward). ``moe`` is the expert-parallel layer; ``mapping``
    the family mapping; the emptied original block is ``hf_block`` (not a submodule, so
    its meta tensors are not the model's parameters).
    """

    def __init__(self, moe: MoELayer, mapping: Mapping, hf_block: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.mapping = mapping
        self.__dict__["hf_block"] = hf_block  # plain attribute: not registered
        self.hf_class = type(hf_block)
        self.hf_buffers: dict[str, torch.Tensor] = {}
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.last_stats: Optional[MoEStats] = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.moe(hidden_states)
        self.last_aux_loss, self.last_stats = out.aux_loss, out.stats
        if self.mapping.tuple_output:
            return out.output, None
        return out.output

    def extra_repr(self) -> str:
        return f"mapping={self.mapping.name}, hf_class={self.hf_class.__name__}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _hf_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    # Multimodal wrappers keep the language model's fields in a sub-config.
    return getattr(config, "text_config", None) or config


def mapped_config(found: BlockMatch, hf_config: Any) -> MoEConfig:
    """The :class:`MoEConfig` that computes the block's HF function (no overrides)."""
    return MoEConfig(**found.mapping.config_fields(found.block, hf_config, found.name))


@torch.no_grad()
def replace_moe_blocks(
    model: nn.Module,
    groups: Optional[ParallelGroups] = None,
    *,
    block_types: Optional[Sequence[type]] = None,
    seed: int = 0,
    verify: bool = True,
    **moe_overrides: Any,
) -> list[str]:
    """Replace every MoE block of ``model`` by an expert-parallel one; returns their names.

    Every rank of the EP group must call this on the same model (same weights: build it
    from the same seed or load the same checkpoint); each keeps only its shard of the
    experts. ``groups=None`` means one process (EP=1). ``moe_overrides`` change
    :class:`MoEConfig` fields, e.g. ``capacity_factor=1.25`` to train with drops,
    ``overlap_chunks=2``, ``router='noisy_topk'``; without them the layer computes exactly
    the HF block's function (dropless). ``block_types`` restricts the search to those
    classes. ``verify`` checks the first block of every class against the installed
    transformers forward on probe tokens (``TypeError`` if it differs; collective, no extra
    copy of the experts). Blocks the
    mappings do not support are refused with a ``TypeError`` before anything changes.
    """
    if groups is not None and not isinstance(groups, ParallelGroups):
        raise TypeError(f"groups must be a ParallelGroups or None, got {type(groups).__name__}")
    found = find_moe_blocks(model, block_types, skip=(HFMoEBlock,))
    if not found:
        what = f" of type {[t.__name__ for t in block_types]}" if block_types else ""
        raise ValueError(f"model has no MoE block{what} to replace (an MoE block is a module with an "
                         "'experts' child holding 3-D expert weights, transformers 5.x)")
    hf_config = _hf_config(model)
    ep_size = groups.ep_size if groups is not None else 1
    plans = []
    for f in found:  # every check before the first change
        base = mapped_config(f, hf_config)
        if base.num_experts % ep_size:
            raise ValueError(f"{f.name}: the block's {base.num_experts} experts must be divisible by "
                             f"ep_size={ep_size}")
        plans.append((f, base, base.replace(**moe_overrides) if moe_overrides else base))
    verified: set[tuple[type, str]] = set()
    for f, base, cfg in plans:
        sd = f.mapping.to_ours(dict(f.block.state_dict()))
        key = (type(f.block), f.mapping.name)
        layer = None
        if verify and key not in verified:
            # The mapping's own function is what is checked, so the probe layer has no overrides.
            layer = MoELayer(base, groups, seed=seed, name=f.name)
            load_layer(layer, sd)
            verify_block(f, layer)
            verified.add(key)
            if cfg != base:
                layer = None
        if layer is None:
            layer = MoELayer(cfg, groups, seed=seed, name=f.name)
            load_layer(layer, sd)
        layer.train(f.block.training)
        wrapper = HFMoEBlock(layer, f.mapping, f.block)
        wrapper.train(f.block.training)
        del sd
        # The original's storage is freed; gather_to_hf refills it. Buffers outside the
        # state dict (non-persistent) are kept aside, since to_empty cannot restore them.
        persistent = set(f.block.state_dict())
        wrapper.hf_buffers = {n: b.clone() for n, b in f.block.named_buffers() if n not in persistent}
        f.block.to("meta")
        _set_submodule(model, f.name, wrapper)
    return [f.name for f, _, _ in plans]


def ep_blocks(model: nn.Module) -> list[tuple[str, HFMoEBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, HFMoEBlock)]


def moe_families(model: nn.Module) -> dict[str, str]:
    """``{block name: mapping name}`` of the replaced blocks."""
    return {n: b.mapping.name for n, b in ep_blocks(model)}


@torch.no_grad()
def _hf_block_tensors(block: HFMoEBlock, name: str) -> dict[str, torch.Tensor]:
    """Full HF tensors of one block, in the HF dtypes (all-gather over its EP group)."""
    sd = block.moe.global_state_dict()
    hf = block.mapping.to_hf(sd)
    # Our tensors with no HF counterpart (added by overrides) must still be at zero.
    mapped = set(block.mapping.to_ours(hf))
    for key in sorted(set(sd) - mapped):
        unused_must_be_zero(sd, key, name)
    dtypes = {k: v.dtype for k, v in block.hf_block.state_dict().items()}
    return {k: v.to(dtypes.get(k, v.dtype)).contiguous() for k, v in hf.items()}


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the original HF layout (full experts on every rank),
    without modifying the model. Collective over each block's EP group: call on all ranks."""
    blocks = dict(ep_blocks(model))
    out = {k: v for k, v in model.state_dict().items()
           if not any(k.startswith(f"{b}.") for b in blocks)}
    for name, block in blocks.items():
        for key, value in _hf_block_tensors(block, name).items():
            out[f"{name}.{key}"] = value
    return out


@torch.no_grad()
def gather_to_hf(model: nn.Module, groups: Optional[ParallelGroups] = None) -> nn.Module:
    """Put the original HF blocks back, filled with the full gathered weights, in place of
    every :class:`HFMoEBlock` (in place; returns ``model``). Collective: all ranks."""
    blocks = ep_blocks(model)
    if not blocks:
        raise ValueError("model has no expert-parallel HFMoEBlock to gather")
    for name, block in blocks:
        if groups is not None and block.moe.groups.ep_size != groups.ep_size:
            raise ValueError(f"{name}: the block was sharded with ep_size={block.moe.groups.ep_size}, "
                             f"got groups.ep_size={groups.ep_size}")
    for name, block in blocks:
        tensors = _hf_block_tensors(block, name)
        hf_block = block.hf_block
        hf_block.to_empty(device=block.moe.router.weight.device)
        missing, unexpected = hf_block.load_state_dict(tensors, strict=False)
        for buf_name, value in block.hf_buffers.items():
            hf_block.get_buffer(buf_name).copy_(value)
        if missing or unexpected:
            raise ValueError(f"{name}: the mapping produced keys {sorted(tensors)} for "
                             f"{type(hf_block).__name__}: missing {missing}, unexpected {unexpected}")
        hf_block.train(block.training)
        _set_submodule(model, name, hf_block)
    return model


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the aux losses of the last forward over all expert-parallel blocks."""
    losses = [b.last_aux_loss for _, b in ep_blocks(model) if b.last_aux_loss is not None]
    if not losses:
        raise ValueError("no expert-parallel block has run a forward yet")
    return torch.stack([loss.float() for loss in losses]).sum()


def moe_stats(model: nn.Module) -> dict[str, MoEStats]:
    """``{block name: MoEStats}`` of the last forward (this rank's tokens)."""
    return {n: b.last_stats for n, b in ep_blocks(model) if b.last_stats is not None}


__all__ = ["HFMoEBlock", "replace_moe_blocks", "gather_to_hf", "hf_state_dict", "moe_aux_loss", "moe_stats",
           "moe_families", "mapped_config"]
