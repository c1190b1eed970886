"""Make a Hugging Face Mixtral-style model expert-parallel, and back.

Legend: E experts, D model dim, F expert ffn dim, e local experts (E / ep_size).

``replace_moe_blocks(model, groups)`` swaps every ``MixtralSparseMoeBlock`` of a
``transformers`` model for an :class:`HFMoEBlock`: a thin module holding an expert-parallel
:class:`~expert_parallel.moe.layer.MoELayer` with only this rank's ``e`` experts, whose
``forward(hidden_states)`` returns a tensor of the same shape, as the HF decoder layer
expects (``hidden_states = self.mlp(hidden_states)`` in transformers 5.x). Everything else
in the model (attention, norms, embeddings, lm_head) stays as it is and is replicated.
``gather_to_hf(model)`` all-gathers the experts over the EP group and puts original HF
blocks back, e.g. for ``save_pretrained``; ``hf_state_dict(model)`` returns the full HF
state dict without modifying the model.

Weight mapping (transformers 5.x layout, checked against the installed version's forward,
``gate, up = linear(x, gate_up_proj[e]).chunk(2)``; ``act(gate) * up``; ``linear(., down_proj[e])``)::

    gate.weight                [E, D]       -> router.weight        [E, D]
    experts.gate_up_proj[:, :F] [E, F, D]   -> experts.w1_eDF^T     (gate half, under silu)
    experts.gate_up_proj[:, F:] [E, F, D]   -> experts.w3_eDF^T     (up half)
    experts.down_proj          [E, D, F]    -> experts.w2_eFD^T

Our SwiGLU expert computes ``(silu(x W1) * x W3) W2``, the same function. Mixtral routing
is softmax over E, top-k, renormalised over the k: ``router='softmax_topk'`` with
``normalize_topk=True``; dropless (``capacity_factor=None``) by default, so the EP model
computes the same logits as the original (fp32 max abs diff measured ~1e-7).

Differences to know: the HF block multiplies the *whole* hidden state by its jitter
noise in training, ours jitters only the router input (``router_jitter``); and the HF
top-1 case renormalises a single weight to 1, ours keeps the raw probability, so
``num_experts_per_tok = 1`` is refused. The MoE aux loss is not added by the HF loss
(``output_router_logits`` finds no HF router); add :func:`moe_aux_loss` yourself.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..config import MoEConfig
from ..distributed.groups import ParallelGroups
from ..moe.layer import MoELayer
from ..moe.stats import MoEStats


def _default_block_types() -> tuple[type, ...]:
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as err:  # transformers is the optional 'hf' extra
        raise ImportError(
            "expert_parallel.interop.hf_mixtral needs transformers: pip install 'expert_parallel[hf]'"
        ) from err
    return (MixtralSparseMoeBlock,)


class HFMoEBlock(nn.Module):
    """Drop-in replacement of a Mixtral-style sparse MoE block.

    ``forward`` returns only the tensor (what the HF decoder layer consumes); the aux loss
    and routing stats of the last call are kept in ``last_aux_loss`` / ``last_stats``
    because the HF decoder layer has no channel for them (read them with
    :func:`moe_aux_loss` / :func:`moe_stats` right after the model's forward).
    """

    def __init__(self, moe: MoELayer, hf_class: type, hf_config: Any, hf_dtype: torch.dtype) -> None:
        super().__init__()
        self.moe = moe
        # Plain attributes (not submodules): what gather_to_hf needs to rebuild the block.
        self.hf_class, self.hf_config, self.hf_dtype = hf_class, hf_config, hf_dtype
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.last_stats: Optional[MoEStats] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.moe(hidden_states)
        self.last_aux_loss, self.last_stats = out.aux_loss, out.stats
        return out.output


def _block_weights(block: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    try:
        gate_ED = block.gate.weight
        gate_up_E2FD = block.experts.gate_up_proj
        down_EDF = block.experts.down_proj
    except AttributeError as err:
        raise ValueError(
            f"{name}: expected a Mixtral-style block with gate.weight, experts.gate_up_proj and "
            f"experts.down_proj (transformers 5.x layout), got {type(block).__name__}: {err}"
        ) from None
    num_experts, hidden = gate_ED.shape
    if gate_up_E2FD.dim() != 3 or gate_up_E2FD.shape[0] != num_experts or gate_up_E2FD.shape[2] != hidden \
            or gate_up_E2FD.shape[1] % 2:
        raise ValueError(f"{name}: experts.gate_up_proj has shape {tuple(gate_up_E2FD.shape)}, "
                         f"expected [E={num_experts}, 2F, D={hidden}]")
    ffn = gate_up_E2FD.shape[1] // 2
    if tuple(down_EDF.shape) != (num_experts, hidden, ffn):
        raise ValueError(f"{name}: experts.down_proj has shape {tuple(down_EDF.shape)}, "
                         f"expected {(num_experts, hidden, ffn)}")
    return gate_ED, gate_up_E2FD, down_EDF


def _find_blocks(model: nn.Module, block_types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, block_types)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def replace_moe_blocks(
    model: nn.Module,
    groups: Optional[ParallelGroups] = None,
    *,
    block_types: Optional[Sequence[type]] = None,
    seed: int = 0,
    **config_overrides: Any,
) -> list[str]:
    """Replace every Mixtral-style MoE block of ``model`` by an expert-parallel one.

    Every rank of the EP group must call this on the same model (same weights: build it
    from the same seed or load the same checkpoint); each keeps only its shard of the
    experts. ``groups=None`` means a single process (EP=1). ``config_overrides`` change
    :class:`MoEConfig` fields (e.g. ``capacity_factor=1.25``, ``aux_loss_coeff=0.0``);
    the defaults reproduce the HF block exactly. Returns the replaced module names.
    """
    if groups is not None and not isinstance(groups, ParallelGroups):
        raise TypeError(f"groups must be a ParallelGroups or None, got {type(groups).__name__}")
    types = tuple(block_types) if block_types else _default_block_types()
    hf_config = getattr(model, "config", None)
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.hidden_act must be 'silu' for the SwiGLU experts, got {act!r}")
    blocks = _find_blocks(model, types)
    if not blocks:
        raise ValueError(f"model has no MoE block of type {[t.__name__ for t in types]} to replace")
    ep_size = groups.ep_size if groups is not None else 1
    replaced = []
    for name, block in blocks:
        gate_ED, gate_up_E2FD, down_EDF = _block_weights(block, name)
        num_experts, hidden = gate_ED.shape
        ffn = gate_up_E2FD.shape[1] // 2
        top_k = int(getattr(block, "top_k", getattr(block.gate, "top_k", 0)))
        if top_k < 2:
            raise ValueError(f"{name}: num_experts_per_tok must be >= 2 (the HF top-1 weight is "
                             f"renormalised to 1, ours keeps the probability), got {top_k}")
        if num_experts % ep_size:
            raise ValueError(f"{name}: num_local_experts={num_experts} must be divisible by "
                             f"ep_size={ep_size}")
        fields: dict[str, Any] = dict(
            hidden_size=hidden, ffn_hidden_size=ffn, num_experts=num_experts, top_k=top_k,
            router="softmax_topk", normalize_topk=True, capacity_factor=None,
            eval_capacity_factor=None, activation="swiglu", z_loss_coeff=0.0,
            aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
            router_jitter=float(getattr(block, "jitter_noise", 0.0) or 0.0),
        )
        fields.update(config_overrides)
        layer = MoELayer(MoEConfig(**fields), groups, seed=seed, name=name)
        layer.to(device=gate_ED.device, dtype=gate_ED.dtype)
        ids = layer.experts.expert_ids
        lo, hi = ids[0], ids[-1] + 1
        layer.router.weight.copy_(gate_ED)
        layer.experts.w1_eDF.copy_(gate_up_E2FD[lo:hi, :ffn, :].transpose(1, 2))
        layer.experts.w3_eDF.copy_(gate_up_E2FD[lo:hi, ffn:, :].transpose(1, 2))
        layer.experts.w2_eFD.copy_(down_EDF[lo:hi].transpose(1, 2))
        layer.train(block.training)
        _set_submodule(model, name, HFMoEBlock(layer, type(block), hf_config, gate_ED.dtype))
        replaced.append(name)
    return replaced


def _ep_blocks(model: nn.Module) -> list[tuple[str, HFMoEBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, HFMoEBlock)]


@torch.no_grad()
def _hf_block_tensors(block: HFMoEBlock, name: str) -> dict[str, torch.Tensor]:
    """Full HF tensors of one block (all-gather over its EP group; collective)."""
    cfg = block.moe.config
    if cfg.router != "softmax_topk" or cfg.activation != "swiglu":
        raise ValueError(f"{name}: only router='softmax_topk' with swiglu experts maps back to "
                         f"the HF layout, got router={cfg.router!r}, activation={cfg.activation!r}")
    sd = block.moe.global_state_dict()
    dtype = block.hf_dtype
    gate_up = torch.cat([sd["experts.w1_eDF"].transpose(1, 2), sd["experts.w3_eDF"].transpose(1, 2)], 1)
    return {
        "gate.weight": sd["router.weight"].to(dtype),
        "experts.gate_up_proj": gate_up.to(dtype).contiguous(),
        "experts.down_proj": sd["experts.w2_eFD"].transpose(1, 2).to(dtype).contiguous(),
    }


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the original HF layout (full experts on every rank),
    without modifying the model. Collective over each block's EP group: call on all ranks."""
    out = {}
    blocks = dict(_ep_blocks(model))
    for key, value in model.state_dict().items():
        if not any(key.startswith(f"{b}.") for b in blocks):
            out[key] = value
    for name, block in blocks.items():
        for key, value in _hf_block_tensors(block, name).items():
            out[f"{name}.{key}"] = value
    return out


@torch.no_grad()
def gather_to_hf(model: nn.Module, groups: Optional[ParallelGroups] = None) -> nn.Module:
    """Put HF blocks with the full, gathered weights back in place of every
    :class:`HFMoEBlock` (in place; returns ``model``). Collective: call on all ranks."""
    blocks = _ep_blocks(model)
    if not blocks:
        raise ValueError("model has no expert-parallel HFMoEBlock to gather")
    for name, block in blocks:
        if groups is not None and block.moe.groups.ep_size != groups.ep_size:
            raise ValueError(f"{name}: the block was sharded with ep_size="
                             f"{block.moe.groups.ep_size}, got groups.ep_size={groups.ep_size}")
        tensors = _hf_block_tensors(block, name)
        hf_block = block.hf_class(block.hf_config)
        device = block.moe.router.weight.device
        hf_block.to(device=device, dtype=block.hf_dtype)
        hf_block.gate.weight.copy_(tensors["gate.weight"])
        hf_block.experts.gate_up_proj.copy_(tensors["experts.gate_up_proj"])
        hf_block.experts.down_proj.copy_(tensors["experts.down_proj"])
        hf_block.train(block.training)
        _set_submodule(model, name, hf_block)
    return model


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the aux losses of the last forward over all expert-parallel blocks."""
    losses = [b.last_aux_loss for _, b in _ep_blocks(model) if b.last_aux_loss is not None]
    if not losses:
        raise ValueError("no expert-parallel block has run a forward yet")
    return torch.stack([loss.float() for loss in losses]).sum()


def moe_stats(model: nn.Module) -> dict[str, MoEStats]:
    """``{block name: MoEStats}`` of the last forward (this rank's tokens)."""
    return {n: b.last_stats for n, b in _ep_blocks(model) if b.last_stats is not None}
