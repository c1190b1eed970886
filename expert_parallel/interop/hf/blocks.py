"""Find a model's MoE blocks by their structure and check each mapping against the
installed transformers.

A *candidate* is any module with an ``experts`` child that holds 3-D parameters (stacked
per-expert weights, the transformers 5.x layout) -- whatever its class is called. Each
candidate goes to the first :data:`MAPPINGS` entry whose :meth:`Mapping.mismatches` is
empty; a candidate no mapping claims is refused with a ``TypeError`` that names its class
and what differs from the closest mapping.

Structure does not show everything (which activation, whether a top-1 weight is
renormalised, the order of gate and up rows), so for the first block of every (class,
mapping) pair :func:`verify_block` runs the installed transformers block and the
expert-parallel :class:`MoELayer` built from the mapping's config and the same weights
on the same probe tokens (eval mode, no grad, identical input on every rank; the layer
holds only its shard, so no second copy of the experts is made) and refuses the block
with a ``TypeError`` if the outputs differ. A transformers upgrade that changes a block's
function is caught here, at replacement time, rather than in the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ...moe.layer import MoELayer
from . import deepseek_v3, gpt_oss, mixtral, qwen2_moe, qwen3_moe
from .mapping import Mapping

MAPPINGS: tuple[Mapping, ...] = (deepseek_v3.MAPPING, gpt_oss.MAPPING, qwen2_moe.MAPPING, qwen3_moe.MAPPING,
                                 mixtral.MAPPING)
"""Tried in order; the structure checks are disjoint, so the order only decides which
mismatch list a refused block is reported against (the closest one)."""

PROBE_TOKENS = 24
VERIFY_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}
"""Relative tolerance of the probe check (max abs diff / max abs HF output); other dtypes
(bf16, fp16) use :data:`VERIFY_RTOL_LOW`."""
VERIFY_RTOL_LOW = 3e-2


@dataclass(frozen=True)
class BlockMatch:
    name: str
    block: nn.Module
    mapping: Mapping


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


def is_candidate(module: nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    return isinstance(experts, nn.Module) and any(
        p.dim() == 3 for p in experts.parameters(recurse=False))


def candidates(model: nn.Module, skip: Sequence[type] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every candidate block, outermost first (a candidate's own
    submodules are not searched)."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if skip and isinstance(module, tuple(skip)):
            continue
        if any(name.startswith(f"{n}.") for n, _ in out):
            continue
        if is_candidate(module):
            out.append((name, module))
    return out


def match(name: str, block: nn.Module) -> BlockMatch:
    """The mapping that claims ``block``, or a ``TypeError`` naming what differs."""
    report = []
    for mapping in MAPPINGS:
        diffs = mapping.mismatches(block)
        if not diffs:
            return BlockMatch(name, block, mapping)
        report.append((len(diffs), mapping, diffs))
    _, closest, diffs = min(report, key=lambda r: r[0])
    raise TypeError(
        f"{name}: {type(block).__name__} ({type(block).__module__}) is an MoE block no mapping supports "
        f"(transformers {transformers_version()}); closest is {closest.name!r} ({', '.join(closest.families)}), "
        f"which differs in: {'; '.join(diffs)}")


def find_moe_blocks(model: nn.Module, block_types: Optional[Sequence[type]] = None,
                    skip: Sequence[type] = ()) -> list[BlockMatch]:
    """Every MoE block of ``model`` with its mapping (``block_types``: only blocks of those
    types; ``skip``: modules not to search, e.g. blocks already replaced). Refuses the
    whole model (``TypeError``) if any candidate is unsupported, before anything changes."""
    found = candidates(model, skip)
    if block_types:
        found = [(n, m) for n, m in found if isinstance(m, tuple(block_types))]
    return [match(n, m) for n, m in found]


def block_output(block: nn.Module, mapping: Mapping, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    if mapping.tuple_output:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"{type(block).__name__} was expected to return (hidden_states, router_scores), "
                            f"got {type(out).__name__}")
        out = out[0]
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"{type(block).__name__} was expected to return a tensor, got {type(out).__name__}")
    return out


@torch.no_grad()
def verify_block(found: BlockMatch, layer: MoELayer) -> float:
    """Run the HF block (full weights, on this rank) and ``layer`` (built from the mapping's
    own config with the block's weights, sharded over its EP group) on the same probe
    tokens on every rank; returns the relative difference, or raises ``TypeError`` above
    the dtype's tolerance. Collective over the layer's groups (the largest difference is
    agreed on all ranks, so every rank decides alike); costs no extra copy of the experts."""
    block, mapping = found.block, found.mapping
    like = layer.router.weight
    dtype = layer.experts.w1_eDF.dtype
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, PROBE_TOKENS, layer.config.hidden_size, generator=gen).to(like.device, dtype)
    modes = block.training, layer.training
    block.eval()
    layer.eval()
    try:
        want = block_output(block, mapping, x.clone()).float()
        got = layer(x).output.float()
    finally:
        block.train(modes[0])
        layer.train(modes[1])
    rel = torch.tensor([float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))],
                       dtype=torch.float64, device=like.device)
    group = layer.groups.dp_group
    if group is not None:
        dist.all_reduce(rel, op=dist.ReduceOp.MAX, group=group)
    worst = float(rel)
    tol = VERIFY_RTOL.get(dtype, VERIFY_RTOL_LOW)
    if not worst <= tol:
        raise TypeError(
            f"{found.name}: {type(block).__name__} has the structure of the {mapping.name!r} mapping but the "
            f"installed transformers {transformers_version()} computes another function: on {PROBE_TOKENS} "
            f"probe tokens our layer differs by {worst:.3g} (relative, max |diff| / max |HF|) > {tol:g}")
    return worst


def load_layer(layer: MoELayer, ours_sd: dict[str, torch.Tensor]) -> None:
    """Move ``layer`` to the HF weights' device and dtypes and load the mapped weights
    (this rank's experts only; the router's selection bias stays fp32).

    Tensors the mapping has no source for -- parameters an override adds, such as
    ``router.noise_weight`` for ``router='noisy_topk'`` -- keep the layer's own seeded
    initial values; a mapped tensor the layer has no place for (an override that removes
    part of the block, e.g. ``num_shared_experts=0`` on a block with shared experts) is a
    ``ValueError``."""
    like = ours_sd["experts.w1_eDF"]
    layer.to(device=like.device, dtype=like.dtype)
    layer.router.to(dtype=ours_sd["router.weight"].dtype)
    layer.router.expert_bias.data = layer.router.expert_bias.data.float()
    if layer.shared is not None and "shared.w1_DF" in ours_sd:
        layer.shared.to(dtype=ours_sd["shared.w1_DF"].dtype)
    own = {f"router.{k}": v for k, v in layer.router.state_dict().items()}
    if layer.shared is not None:
        own.update({f"shared.{k}": v for k, v in layer.shared.state_dict().items()})
    expert_keys = {f"experts.{n}" for n in layer.expert_param_names()}
    extra = sorted(set(ours_sd) - set(own) - expert_keys)
    if extra:
        raise ValueError(f"{layer.name}: the overrides leave no place in the layer for the HF block's {extra}")
    full = dict(ours_sd)
    for key, value in own.items():
        full.setdefault(key, value)
    for key in expert_keys - set(ours_sd):  # only the zero-initialised expert biases
        local = getattr(layer.experts, key.split(".", 1)[1])
        full[key] = local.new_zeros((layer.config.num_experts,) + tuple(local.shape[1:]))
    layer.load_global_state_dict(full)


__all__ = ["MAPPINGS", "BlockMatch", "find_moe_blocks", "verify_block", "candidates", "load_layer"]
