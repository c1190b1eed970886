"""EP-size-independent state dicts for ``torch.distributed.checkpoint`` (DCP).

Expert parameters are stored per *global* expert: the local stacked parameter
``layers.0.ffn.experts.w1_eDF`` of shape [e, D, F] becomes the keys
``layers.0.ffn.experts.w1_eDF.expert{g}`` (views into the local tensor, [D, F]) for the
experts ``g`` this rank holds. Dense parameters keep their names. AdamW state follows the
same naming under ``optim.``. Because the keys name global experts, a checkpoint written
at one EP size loads at any other: each rank simply asks DCP for the keys of its own
experts, and DCP reads them from whichever rank wrote them. Replicated keys (dense
parameters, expert replicas in other EDP groups) are written once, by DCP's
de-duplication.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..moe.experts import GroupedExperts


def _expert_ids(model: nn.Module, param_name: str) -> list[int] | None:
    owner = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
    return owner.expert_ids if isinstance(owner, GroupedExperts) else None


def iter_keyed_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Split every expert tensor in ``tensors`` (keyed by parameter name) per global expert."""
    for name, t in tensors.items():
        ids = _expert_ids(model, name)
        if ids is None:
            yield name, t
        else:
            for local, g in enumerate(ids):
                yield f"{name}.expert{g}", t[local]


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {n: p.data for n, p in model.named_parameters()}
    tensors.update({n: b for n, b in model.named_buffers()})
    return dict(iter_keyed_tensors(model, tensors))


def ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW state tensors (zeros) so DCP can load into them in place."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    ensure_adam_state(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name, state = names[id(p)], optimizer.state[p]
            out[f"optim.{name}.step"] = state["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                for k, v in iter_keyed_tensors(model, {name: state[key]}):
                    out[f"optim.{name}.{key}{k[len(name):]}"] = v  # k[len(name):] = ".expert<g>" or ""
    return out
