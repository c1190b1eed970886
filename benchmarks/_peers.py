"""The peer MoE layers that ``compare_peers.py`` runs beside ours, on our weights.

Legend: T tokens (this rank), D model dim, F expert ffn dim, E experts, e = E / R local
experts, K choices, R EP ranks.

Each builder takes our layer (its router and this rank's experts are the weights every
peer gets, copied in the peer's own layout) and returns a :class:`Peer` whose
``forward(x_TD, bf16) -> (y_TD, aux)`` is the peer's layer (``bf16``: the caller runs it
under bf16 autocast). A peer that is not installed
raises :class:`PeerMissing` with the reason, which the benchmark reports.

* ``deepspeed``: ``deepspeed.moe.layer.MoE`` (GShard top-2, ``drop_tokens=True`` at our
  capacity, ``use_rts=False``, deterministic second expert); our expert MLP as its
  expert module. Drops like ours (position priority, same capacity rule) but
  renormalises a token's weights over its *kept* choices.
* ``torchtitan``: torchtitan 0.3.0's ``MoE`` (softmax top-k, ``route_norm``, dropless)
  with its ``AllToAllTokenDispatcher`` wired to an EP ``DeviceMesh``; the
  ``partial_dtensor`` SPMD backend (the default ``spmd_types`` backend's uneven list
  all-to-all is refused by gloo). Its ``GroupedExperts`` always computes in bf16 (it
  casts); for the fp32 rows :class:`_TorchtitanFP32Experts` runs the same grouped GEMMs
  without those casts. SwiGLU only.
* ``transformers``: the EP experts block of transformers 5.x
  (``distributed/expert_parallel.py``: ``EpDispatchExpertsParallel`` with the
  ``all_to_all`` implementation) on a Qwen3-MoE sparse block (softmax top-k,
  ``norm_topk_prob``, dropless), with the experts implementation a
  ``PreTrainedModel`` picks by default (``grouped_mm`` where torch has it). SwiGLU only.

Shims (only where an import needs a GPU-only package, and only inside this benchmark):
torchtitan's token-dispatcher module imports ``torchtitan.distributed.minimal_async_ep``,
whose kernels need ``triton`` (a GPU compiler, not installed with CPU torch) and CUDA
symmetric memory. Without triton, :func:`shim_torchtitan` puts a stub of that one
module in ``sys.modules`` (its functions raise if called); the MinimalAsyncEP dispatcher
is never used here. With triton installed the real module is imported. Of torchtitan's
declared dependencies the MoE path imports only ``spmd_types`` and ``tyro``:
``pip install --no-deps torchtitan==0.3.0 && pip install spmd_types==0.2.3 tyro`` is enough
(``pip install -e '.[peers]'`` installs all of them: datasets, wandb, ...).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

PEERS = ("deepspeed", "torchtitan", "transformers")
SHIMS: list[str] = []
"""Modules stubbed in this process (reported with the results)."""


class PeerMissing(RuntimeError):
    """The peer cannot run here (not installed, or not applicable to the config)."""


@dataclass
class Peer:
    name: str
    forward: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
    drops: bool
    """Whether the peer has a capacity (compared against our layer with drops)."""
    router_in_autocast: bool
    """True when the peer's router logits come out of autocast (bf16) under bf16
    autocast; ours, torchtitan's run fp32."""
    routing: Callable[[torch.Tensor, bool], torch.Tensor] | None = None
    """``routing(x_TD, bf16) -> kept_TE``: which experts the peer's own router sends
    each token to (after its capacity), ``[T, E]`` bool, computed as in ``forward``."""
    notes: list[str] = field(default_factory=list)


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)


def _mask_TE(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(idx_TK.shape[0], num_experts, dtype=torch.bool)
    return mask.scatter_(1, idx_TK.long(), True)


def _require(module: str, extra: str = "peers") -> None:
    if importlib.util.find_spec(module) is None:
        raise PeerMissing(f"{module} is not installed (pip install -e '.[{extra}]')")


# -- DeepSpeed ---------------------------------------------------------------------------
class _SwiGLU(nn.Module):
    """Our SwiGLU expert, ``(silu(x W1) * x W3) W2``, as a DeepSpeed expert module."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _GELU(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


def build_deepspeed(ours: Any, ep_size: int) -> Peer:
    """DeepSpeed-MoE on ``ours``' weights (collective: EP groups; all ranks call it)."""
    _require("deepspeed", "deepspeed")
    import deepspeed
    from deepspeed.moe.layer import MoE as DSMoE

    cfg = ours.config
    if cfg.top_k not in (1, 2):
        raise PeerMissing(f"deepspeed: top_k={cfg.top_k} (its GShard gates are top-1/top-2)")
    deepspeed.init_distributed(dist_backend="gloo")
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    expert = _SwiGLU(d, f) if cfg.activation == "swiglu" else _GELU(d, f)
    drops = cfg.capacity_factor is not None
    cf = cfg.capacity_factor if drops else 1.0
    ds = DSMoE(hidden_size=d, expert=expert, num_experts=cfg.num_experts, ep_size=ep_size, k=cfg.top_k,
               capacity_factor=cf, eval_capacity_factor=cf, min_capacity=cfg.min_capacity,
               drop_tokens=drops, use_rts=False, top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for l, mod in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            mod.w1.weight.copy_(ours.experts.w1_eDF[l].t())
            mod.w2.weight.copy_(ours.experts.w2_eFD[l].t())
            if cfg.activation == "swiglu":
                mod.w3.weight.copy_(ours.experts.w3_eDF[l].t())
    coeff = cfg.aux_loss_coeff

    def forward(x_TD: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        y, l_aux, _ = ds(x_TD)
        return y, coeff * l_aux

    def routing(x_TD: torch.Tensor, bf16: bool) -> torch.Tensor:
        with torch.no_grad(), _autocast(bf16):
            gate_out = ds.deepspeed_moe.gate(x_TD, None, True, False)  # sparse routes
        idx_KT = gate_out[3].long()  # [k, T], -1 where the capacity evicted the route
        kept_TE = torch.zeros(x_TD.shape[0], cfg.num_experts + 1, dtype=torch.bool)
        kept_TE.scatter_(1, torch.where(idx_KT < 0, cfg.num_experts, idx_KT).t(), True)
        return kept_TE[:, :-1]

    notes = ["renormalises each token's weights over its kept choices (ours keeps the "
             "pre-drop top-k weights)"] if drops else []
    notes.append("its gate computes logits and softmax inside autocast (bf16 under bf16 autocast)")
    peer = Peer("deepspeed", forward, drops, router_in_autocast=True, routing=routing, notes=notes)
    peer.module = ds  # type: ignore[attr-defined]
    return peer


# -- torchtitan --------------------------------------------------------------------------
def shim_torchtitan() -> None:
    """Stub ``torchtitan.distributed.minimal_async_ep`` where triton is missing (see the
    module docstring); a no-op when triton is installed or the stub is in place."""
    name = "torchtitan.distributed.minimal_async_ep"
    if importlib.util.find_spec("triton") is not None or name in sys.modules:
        return
    stub = types.ModuleType(name)
    stub.__doc__ = "Stub (benchmarks/_peers.py): the real module needs triton + CUDA."

    def unavailable(*_a: Any, **_k: Any) -> None:
        raise RuntimeError(f"{name} is stubbed on this CPU-only machine (needs triton + CUDA)")

    class MinimalAsyncEPDispatchMetadata:  # placeholder type for annotations
        pass

    stub.combine_op = stub.dispatch_op = stub.init_buffer = unavailable
    stub.MinimalAsyncEPDispatchMetadata = MinimalAsyncEPDispatchMetadata
    sys.modules[name] = stub
    SHIMS.append(f"{name}: stubbed (its kernels import triton, a GPU-only package; "
                 "the MinimalAsyncEP dispatcher is not used)")


def build_torchtitan(ours: Any, ep_size: int) -> Peer:
    """torchtitan's ``MoE`` with EP over all ranks (collective: device mesh)."""
    _require("torchtitan")
    cfg = ours.config
    if cfg.activation != "swiglu" or cfg.router != "softmax_topk" or not cfg.normalize_topk:
        raise PeerMissing("torchtitan: needs activation='swiglu', router='softmax_topk', normalize_topk")
    shim_torchtitan()
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.distributed.utils import set_spmd_backend
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher

    from torchtitan.models.common.moe import GroupedExperts

    set_spmd_backend("partial_dtensor")
    E, e, K, d, f = cfg.num_experts, cfg.num_experts // ep_size, cfg.top_k, cfg.hidden_size, cfg.ffn_hidden_size
    mcfg = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=d, hidden_dim=f, num_experts=e),
            token_dispatcher=AllToAllTokenDispatcher.Config(num_experts=E, top_k=K)),
        router=TokenChoiceTopKRouter.Config(num_experts=E, gate=Linear.Config(in_features=d, out_features=E),
                                            top_k=K, score_func="softmax", route_norm=True),
        load_balance_coeff=None)
    tt = mcfg.build()
    inner = tt.routed_experts.inner_experts
    shipped, fp32_cls = type(inner), _torchtitan_fp32_experts()
    mesh = init_device_mesh("cpu", (ep_size,), mesh_dim_names=("ep",))
    tt.routed_experts.token_dispatcher.wire_meshes(ep_mesh=mesh)
    with torch.no_grad():
        tt.router.gate.weight.copy_(ours.router.weight)
        inner.w1_EFD.copy_(ours.experts.w1_eDF.transpose(1, 2))
        inner.w3_EFD.copy_(ours.experts.w3_eDF.transpose(1, 2))
        inner.w2_EDF.copy_(ours.experts.w2_eFD.transpose(1, 2))
    zero = torch.zeros(())

    def forward(x_TD: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        inner.__class__ = shipped if bf16 else fp32_cls
        return tt(x_TD.view(1, *x_TD.shape)).view(x_TD.shape), zero

    def routing(x_TD: torch.Tensor, bf16: bool) -> torch.Tensor:
        with torch.no_grad(), _autocast(bf16):
            ids = tt.router(x_TD.view(1, *x_TD.shape), None)[1].view(x_TD.shape[0], -1)
        return _mask_TE(ids, E)

    notes = ["partial_dtensor SPMD backend",
             "bf16: the shipped GroupedExperts (casts to bf16 itself); fp32: its grouped GEMMs "
             "without those .bfloat16() casts"]
    notes.append("under autocast it exchanges the rows in the input's dtype (fp32) and casts inside the experts")
    peer = Peer("torchtitan", forward, drops=False, router_in_autocast=False, routing=routing, notes=notes)
    peer.module = tt  # type: ignore[attr-defined]
    return peer


def _torchtitan_fp32_experts() -> type:
    from torchtitan.models.common.moe import GroupedExperts

    class _TorchtitanFP32Experts(GroupedExperts):
        """torchtitan's ``GroupedExperts.forward`` minus its unconditional bf16 casts:
        the same three grouped GEMMs and SwiGLU, in the weights' dtype."""

        def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
            offs = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)

            def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return self._grouped_mm(A=a, B_t=w.transpose(-2, -1), offs=offs)

            h_RF = F.silu(mm(x_RD, self.w1_EFD)) * mm(x_RD, self.w3_EFD)
            return mm(h_RF, self.w2_EDF).type_as(x_RD)

    return _TorchtitanFP32Experts


# -- transformers ------------------------------------------------------------------------
def build_transformers(ours: Any, ep_size: int) -> Peer:
    """transformers' EP experts block on a Qwen3-MoE sparse block (collective: mesh)."""
    _require("transformers", "hf")
    cfg = ours.config
    if cfg.activation != "swiglu" or cfg.router != "softmax_topk" or not cfg.normalize_topk:
        raise PeerMissing("transformers: needs activation='swiglu', router='softmax_topk', normalize_topk")
    try:
        from transformers import Qwen3MoeConfig
        from transformers.distributed.expert_parallel import EpDispatchExpertsParallel
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError as err:
        raise PeerMissing(f"transformers: no expert-parallel experts block in this version ({err})") from None
    from torch.distributed.device_mesh import init_device_mesh

    E, e = cfg.num_experts, cfg.num_experts // ep_size
    hc = Qwen3MoeConfig(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.ffn_hidden_size,
                        num_experts=E, num_experts_per_tok=cfg.top_k, norm_topk_prob=True, hidden_act="silu")
    # What PreTrainedModel picks by default (get_correct_experts_implementation).
    impl = "grouped_mm" if hasattr(torch, "_grouped_mm") else "eager"
    hc._experts_implementation = impl
    block = Qwen3MoeSparseMoeBlock(hc)
    experts = block.experts
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        # gate_up_proj [e, 2F, D] = [W1^T; W3^T], down_proj [e, D, F] = W2^T: our shard.
        experts.gate_up_proj = nn.Parameter(torch.cat([ours.experts.w1_eDF.transpose(1, 2),
                                                       ours.experts.w3_eDF.transpose(1, 2)], 1).contiguous())
        experts.down_proj = nn.Parameter(ours.experts.w2_eFD.transpose(1, 2).contiguous())
    # What MoEParamShard does to a sharded experts module.
    experts.num_experts = e
    experts._is_expert_parallel = True
    mesh = init_device_mesh("cpu", (ep_size, 1), mesh_dim_names=("ep", "tp"))
    EpDispatchExpertsParallel().install_forward(experts, mesh["ep"], tp_mesh=mesh["tp"],
                                                ep_implementation="all_to_all")
    zero = torch.zeros(())

    def forward(x_TD: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return block(x_TD.view(1, *x_TD.shape)).view(x_TD.shape), zero

    def routing(x_TD: torch.Tensor, bf16: bool) -> torch.Tensor:
        with torch.no_grad(), _autocast(bf16):
            ids = block.gate(x_TD)[2]
        return _mask_TE(ids, E)

    notes = [f"experts_implementation={impl}",
             "under autocast its router logits are bf16 (F.linear is on autocast's list) and its "
             "grouped GEMMs run in the weights' dtype (fp32; grouped_mm is not on the list)"]
    peer = Peer("transformers", forward, drops=False, router_in_autocast=True, routing=routing, notes=notes)
    peer.module = block  # type: ignore[attr-defined]
    return peer


BUILDERS: dict[str, Callable[..., Peer]] = {
    "deepspeed": build_deepspeed,
    "torchtitan": build_torchtitan,
    "transformers": build_transformers,
}
