"""``MoEConfig``: one mixture-of-experts layer, validated.

Its sizes, its router, its capacity / drop policy, its dispatch options and its
auxiliary losses. Every field is validated in ``__post_init__``; a bad value raises
``ValueError`` (or ``TypeError`` for a value of the wrong type) whose message names the
field and the value, so that every rank fails identically and before any collective is
issued. Combinations of options are either supported or refused here, naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

from .checks import _check_choice, _check_float, _check_int

ROUTERS = ("softmax_topk", "switch", "sigmoid_topk", "topk_softmax", "noisy_topk", "top_p",
           "expert_choice")
GROUP_ROUTERS = ("softmax_topk", "switch", "sigmoid_topk", "topk_softmax")
"""Routers whose top-k selection can be limited to ``topk_groups`` groups."""
AUX_LOSS_SCOPES = ("micro_batch", "sequence", "global_batch")
A2A_ALGORITHMS = ("flat", "hierarchical", "allgather", "auto")
ROUTER_DTYPES = ("fp32", "fp64")
DROP_POLICIES = ("position", "probs")
ACTIVATIONS = ("swiglu", "gelu", "swiglu_clamped")
EXPERT_BACKENDS = ("auto", "loop", "bmm", "grouped_mm")



@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one expert-parallel MoE layer."""

    hidden_size: int
    """Model dimension D of the tokens entering and leaving the layer."""

    ffn_hidden_size: int
    """Hidden dimension F of each expert MLP."""

    num_experts: int
    """Total number of experts E across the expert-parallel group."""

    top_k: int = 2
    """Experts per token K. Must be <= num_experts; the ``switch`` router needs 1."""

    router: Literal[ROUTERS] = "softmax_topk"
    """``softmax_topk`` (softmax over experts, then top-k), ``switch`` (top-1 of a
    softmax, Switch Transformer), or ``sigmoid_topk`` (independent sigmoid scores with a
    per-expert selection bias for aux-loss-free balancing, DeepSeek-V3 style),
    ``topk_softmax`` (top-k of the logits, then a softmax over the k: GPT-OSS, and
    Mixtral's function), ``noisy_topk`` (Shazeer et al. 2017: learned Gaussian noise on the logits in training,
    importance + load losses), ``top_p`` (a variable number of experts per token: experts
    in order of probability until their cumulative probability reaches ``top_p``, at most
    ``top_k``), or ``expert_choice`` (Zhou et al. 2022: each expert takes its top-C tokens
    of the source rank, ``C`` from the capacity formula with ``top_k`` as the average
    number of experts per token; needs both capacity factors). See ``moe/router.py``."""

    capacity_factor: Optional[float] = None
    """Training capacity factor. ``None`` = dropless (no expert ever drops a token);
    otherwise each expert accepts at most
    ``C = max(min_capacity, ceil(capacity_factor * T * top_k / num_experts))`` tokens
    from each source rank holding T tokens."""

    eval_capacity_factor: Optional[float] = None
    """Capacity factor used in eval mode (``layer.eval()``). ``None`` = dropless."""

    min_capacity: int = 4
    """Lower bound on the per-expert, per-source-rank capacity."""

    drop_policy: Literal[DROP_POLICIES] = "position"
    """Which (token, expert) pairs survive when an expert is over capacity:
    ``position`` keeps every token's first choice before any token's second choice and,
    within a choice, earlier tokens first (GShard priority); ``probs`` keeps the pairs
    with the highest combine weights first (ties broken by position)."""

    normalize_topk: bool = True
    """Renormalise the K selected weights of each token to sum to 1. Ignored when
    top_k == 1 (it would make every weight 1 and cut the router's gradient): ``switch``
    and other top-1 routers weigh a token by its raw gate probability."""

    aux_loss_coeff: float = 0.01
    """Coefficient of the Switch/GShard load-balancing loss (0 disables it)."""

    z_loss_coeff: float = 0.0
    """Coefficient of the router z-loss ``mean(logsumexp(logits)^2)`` (0 disables)."""

    router_jitter: float = 0.0
    """Multiplicative jitter eps on router inputs in training:
    ``x * U(1 - eps, 1 + eps)`` (Switch Transformer). 0 disables it."""

    activation: Literal[ACTIVATIONS] = "swiglu"
    """Expert MLP: ``swiglu`` (``(silu(x W1) * x W3) W2``), ``gelu`` (``gelu(x W1) W2``), or
    ``swiglu_clamped`` (GPT-OSS: ``g = min(x W1, limit)``, ``u = clamp(x W3, -limit, limit)``,
    ``((u + 1) * g * sigmoid(alpha * g)) W2``; see ``swiglu_alpha`` / ``swiglu_limit``)."""

    init_std: float = 0.02
    """Standard deviation of the normal initialisation of router and expert weights."""

    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (``sigmoid_topk`` only): after each training forward the
    selection bias moves by ``rate * sign(mean_load - load_e)``. 0 disables it."""

    expert_backend: Literal[EXPERT_BACKENDS] = "auto"
    """How the local experts are computed: ``loop`` (one GEMM per expert), ``bmm``
    (padded batched GEMM), ``grouped_mm`` (``torch._grouped_mm``), or ``auto``."""

    overlap_chunks: int = 1
    """Split the dispatched tokens into this many chunks and pipeline all-to-all with
    expert compute (1 = no overlap). Composes with the flat and the hierarchical
    exchange (there the inter-node hop is what overlaps)."""

    a2a_algorithm: Literal[A2A_ALGORITHMS] = "flat"
    """``flat``: one all-to-all over the EP group; ``hierarchical``: each token crosses
    the inter-node link once per destination node (to the rank with the sender's local
    index), then fans out over the node-local link; the combine sums per node before
    crossing back (needs ``ParallelGroups`` built with ``ranks_per_node``);
    ``allgather``: for small token counts (decoding), every rank's tokens (padded to
    the previous forward's largest count, rounded up to a power of two) are
    all-gathered, experts run on the rows routed to them, a reduce-scatter brings the
    sums home: two exchanges, no count exchange; ``auto``:
    ``allgather`` while the previous forward held at most ``allgather_max_tokens``
    tokens per rank, else ``flat`` (``moe/dispatchers/allgather.py``)."""

    allgather_max_tokens: int = 256
    """Most tokens per rank the ``allgather`` / ``auto`` exchange gathers (a forward with
    more runs the flat exchange). Default: the crossover ``benchmarks/decode_latency.py``
    measured on the project's CPU machine (``benchmarks/results/decode_latency.md``)."""

    static_shapes: bool = False
    """Fixed-capacity padded dispatch: every (rank, expert) block is padded to the
    capacity, so all shapes are static and the dispatcher never synchronises with the
    host (CUDA-graph friendly). Needs both capacity factors and
    ``nonfinite_policy='count'``; cannot be combined with ``overlap_chunks > 1`` or the
    hierarchical exchange. Costs padding compute/traffic."""

    nonfinite_policy: Literal["raise", "count"] = "raise"
    """What to do when router logits contain NaN/Inf: ``raise`` a ``FloatingPointError``
    naming the layer, or ``count`` it in the stats and let the caller skip the step."""

    top_p: Optional[float] = None
    """Cumulative-probability threshold of ``router='top_p'`` (required there, in
    (0, 1]; 1.0 takes exactly ``top_k`` experts). Must be None for other routers."""

    routed_scaling_factor: float = 1.0
    """Multiplies the routed experts' combine weights after any renormalisation
    (DeepSeek-V3: 2.5 with normalised sigmoid scores). 1.0 leaves them unchanged."""

    num_redundant_experts: int = 0
    """Extra physical expert slots over the EP group for replicas of hot experts (EPLB
    style): ``P = num_experts + num_redundant_experts`` slots, ``P / ep_size`` per rank,
    placed by ``moe/planner.py`` (``moe/placement.py``). Placement changes where experts
    compute, never what the layer computes. 0 = one slot per expert, contiguous."""

    num_groups: int = 1
    """Group-limited routing (DeepSeek-V2/V3): the E experts form ``num_groups``
    contiguous groups of ``E / num_groups``; each token keeps its ``topk_groups`` best
    groups (a group scores the sum of its two best expert scores, selection bias
    included) and takes its top-k experts inside them. Rank r holds experts
    ``[r*e, (r+1)*e)``, so ``num_groups = ep_size`` is device-limited routing and
    ``num_groups`` = nodes of the EP group is node-limited routing (a token then crosses
    the inter-node link at most ``topk_groups`` times in the hierarchical exchange).
    1 disables it."""

    topk_groups: Optional[int] = None
    """Groups each token may use (required when ``num_groups > 1``)."""

    num_shared_experts: int = 0
    """Shared experts every token passes through (DeepSeek, Qwen2-MoE): one dense MLP of
    hidden size ``shared_expert_ffn_hidden`` added to the routed output. Replicated
    (data-parallel, not expert-parallel). 0 disables it."""

    shared_expert_ffn_hidden: Optional[int] = None
    """Hidden size of the shared MLP; None = ``num_shared_experts * ffn_hidden_size``
    (the shared experts fused into one MLP, as DeepSeek does)."""

    shared_expert_gate: bool = False
    """Scale the shared output by ``sigmoid(x w_gate)`` per token (Qwen2-MoE)."""

    shared_expert_overlap: bool = True
    """Compute the shared expert while the dispatch all-to-all is in flight (Megatron's
    ``--moe-shared-expert-overlap``); False computes it after the routed experts."""

    aux_loss_scope: Literal[AUX_LOSS_SCOPES] = "micro_batch"
    """Where the load-balancing loss's load f and probability P are taken:
    ``micro_batch`` (this rank's tokens of this forward), ``sequence`` (DeepSeek-V3's
    complementary sequence-wise loss: f and P per sequence of a ``[B, S, D]`` input,
    averaged over sequences) or ``global_batch`` (f summed over the data-parallel group,
    and over the micro-batches since ``MoELayer.start_global_batch()``; Megatron's
    global aux loss, Qwen's "Demons in the Detail")."""

    router_dtype: Literal[ROUTER_DTYPES] = "fp32"
    """Precision of the router logits, scores and combine weights: ``fp32`` or ``fp64``."""

    swiglu_alpha: float = 1.702
    """Slope of the sigmoid in ``activation='swiglu_clamped'`` (GPT-OSS: 1.702); other
    activations refuse a changed value."""

    swiglu_limit: float = 7.0
    """Clamp of ``activation='swiglu_clamped'`` (GPT-OSS: 7.0): the gate projection is
    clamped from above, the up projection to ``[-limit, limit]``; other activations refuse
    a changed value."""

    router_bias: bool = False
    """A learned bias on the router logits, ``x W^T + b`` (GPT-OSS), replicated and trained
    like the router weight (zero init). Unlike ``router.expert_bias`` it changes the
    scores, not only the selection."""

    expert_proj_bias: bool = False
    """Biases on the routed experts' projections (GPT-OSS): ``b1_eF`` / ``b3_eF`` added to
    ``x W1`` / ``x W3`` before the activation and ``b2_eD`` to the down projection, sharded
    with the experts (zero init). Shared experts have none."""

    def __post_init__(self) -> None:
        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("ffn_hidden_size", self.ffn_hidden_size, 1)
        _check_int("num_experts", self.num_experts, 1)
        _check_int("top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k must be <= num_experts ({self.num_experts}), got {self.top_k}"
            )
        _check_choice("router", self.router, ROUTERS)
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"top_k must be 1 for router='switch', got {self.top_k}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None:
                _check_float(name, value, 0.0, strict=True)
        if self.router == "top_p":
            if self.top_p is None:
                raise ValueError("top_p must be set (0 < top_p <= 1) for router='top_p', got None")
            _check_float("top_p", self.top_p, 0.0, strict=True)
            if self.top_p > 1.0:
                raise ValueError(f"top_p must be <= 1, got {self.top_p!r}")
        elif self.top_p is not None:
            raise ValueError(
                f"top_p is only used by router='top_p', got top_p={self.top_p!r} "
                f"with router={self.router!r}"
            )
        if self.router == "expert_choice":
            # Each expert takes its top-C tokens: without a capacity there is no C
            # (dropless would mean every expert takes every token, a dense layer).
            for name in ("capacity_factor", "eval_capacity_factor"):
                if getattr(self, name) is None:
                    raise ValueError(
                        f"{name} must be set for router='expert_choice' (each expert takes "
                        f"its top-C tokens, C from the capacity formula), got None"
                    )
        _check_int("min_capacity", self.min_capacity, 0)
        _check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        if not isinstance(self.normalize_topk, bool):
            raise TypeError(f"normalize_topk must be a bool, got {self.normalize_topk!r}")
        _check_float("aux_loss_coeff", self.aux_loss_coeff, 0.0, strict=False)
        _check_float("z_loss_coeff", self.z_loss_coeff, 0.0, strict=False)
        _check_float("router_jitter", self.router_jitter, 0.0, strict=False)
        if self.router_jitter >= 1.0:
            raise ValueError(f"router_jitter must be < 1, got {self.router_jitter!r}")
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_float("init_std", self.init_std, 0.0, strict=True)
        _check_float("bias_update_rate", self.bias_update_rate, 0.0, strict=False)
        if self.bias_update_rate > 0 and self.router != "sigmoid_topk":
            raise ValueError(
                "bias_update_rate > 0 needs router='sigmoid_topk', "
                f"got router={self.router!r}"
            )
        _check_choice("expert_backend", self.expert_backend, EXPERT_BACKENDS)
        _check_int("overlap_chunks", self.overlap_chunks, 1)
        _check_choice("nonfinite_policy", self.nonfinite_policy, ("raise", "count"))
        _check_choice("a2a_algorithm", self.a2a_algorithm, A2A_ALGORITHMS)
        _check_int("allgather_max_tokens", self.allgather_max_tokens, 1)
        if self.a2a_algorithm in ("allgather", "auto") and self.overlap_chunks > 1:
            raise ValueError(
                f"a2a_algorithm={self.a2a_algorithm!r} and overlap_chunks={self.overlap_chunks} cannot be "
                "combined: the all-gather path is for a few tokens per rank, where there is nothing to "
                "pipeline; use overlap_chunks=1, or a2a_algorithm='flat' to pipeline")
        if not isinstance(self.static_shapes, bool):
            raise TypeError(f"static_shapes must be a bool, got {self.static_shapes!r}")
        if self.static_shapes:
            self._check_static_combinations()
        self._check_modern_options()
        self._check_expert_options()

    def _check_expert_options(self) -> None:
        """Clamped SwiGLU constants, router and expert-projection biases."""
        for name, default in (("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)):
            value = getattr(self, name)
            _check_float(name, value, 0.0, strict=True)
            if self.activation != "swiglu_clamped" and value != default:
                raise ValueError(f"{name}={value!r} is only used by activation='swiglu_clamped', "
                                 f"got activation={self.activation!r}")
        for name in ("router_bias", "expert_proj_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _check_modern_options(self) -> None:
        """Scoring, group-limited routing, shared experts, loss scope, router dtype."""
        _check_float("routed_scaling_factor", self.routed_scaling_factor, 0.0, strict=True)
        _check_int("num_groups", self.num_groups, 1)
        if self.num_groups > 1:
            if self.num_experts % self.num_groups:
                raise ValueError(f"num_groups={self.num_groups} must divide num_experts="
                                 f"{self.num_experts}")
            if self.topk_groups is None:
                raise ValueError(f"topk_groups must be set when num_groups={self.num_groups} > 1, "
                                 "got None")
            _check_int("topk_groups", self.topk_groups, 1)
            if self.topk_groups > self.num_groups:
                raise ValueError(f"topk_groups={self.topk_groups} must be <= num_groups="
                                 f"{self.num_groups}")
            reachable = self.topk_groups * (self.num_experts // self.num_groups)
            if self.top_k > reachable:
                raise ValueError(
                    f"top_k={self.top_k} is larger than the {reachable} experts in topk_groups="
                    f"{self.topk_groups} groups of {self.num_experts // self.num_groups} "
                    f"(num_groups={self.num_groups}, num_experts={self.num_experts})")
            if self.router not in GROUP_ROUTERS:
                raise ValueError(f"num_groups={self.num_groups} (group-limited routing) needs router in "
                                 f"{list(GROUP_ROUTERS)}, got router={self.router!r}")
        elif self.topk_groups is not None:
            raise ValueError(f"topk_groups={self.topk_groups} is only used with num_groups > 1, "
                             f"got num_groups={self.num_groups}")
        _check_int("num_redundant_experts", self.num_redundant_experts, 0)
        _check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_expert_ffn_hidden is not None:
            _check_int("shared_expert_ffn_hidden", self.shared_expert_ffn_hidden, 1)
            if self.num_shared_experts == 0:
                raise ValueError(f"shared_expert_ffn_hidden={self.shared_expert_ffn_hidden} needs "
                                 "num_shared_experts >= 1, got num_shared_experts=0")
        for name in ("shared_expert_gate", "shared_expert_overlap"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1, got "
                             "num_shared_experts=0")
        _check_choice("aux_loss_scope", self.aux_loss_scope, AUX_LOSS_SCOPES)
        if self.aux_loss_scope != "micro_batch" and self.router == "noisy_topk":
            raise ValueError(f"aux_loss_scope={self.aux_loss_scope!r} cannot be combined with "
                             "router='noisy_topk' (its cv^2 importance + load loss has no per-sequence "
                             "or global-batch form here); use aux_loss_scope='micro_batch'")
        _check_choice("router_dtype", self.router_dtype, ROUTER_DTYPES)

    @property
    def num_slots(self) -> int:
        """Physical expert slots over the EP group (``num_experts + num_redundant_experts``)."""
        return self.num_experts + self.num_redundant_experts

    @property
    def shared_ffn_hidden(self) -> int:
        """Hidden size of the shared MLP (0 without shared experts)."""
        if not self.num_shared_experts:
            return 0
        return self.shared_expert_ffn_hidden or self.num_shared_experts * self.ffn_hidden_size

    def _check_static_combinations(self) -> None:
        """The dispatch options are orthogonal except for the padded static-shape path:
        every router works with every mode, overlap composes with the flat and the
        hierarchical exchange (``moe/dispatchers/factory.py``); these are refused."""
        if self.capacity_factor is None or self.eval_capacity_factor is None:
            raise ValueError(
                "static_shapes=True needs capacity_factor and eval_capacity_factor, got "
                f"capacity_factor={self.capacity_factor!r}, "
                f"eval_capacity_factor={self.eval_capacity_factor!r}"
            )
        if self.overlap_chunks > 1:
            raise ValueError(
                f"static_shapes=True and overlap_chunks={self.overlap_chunks} cannot be combined: "
                "the padded exchange has fixed [E*C] buffers and no count exchange to cut into "
                "chunks; use overlap_chunks=1, or static_shapes=False to pipeline")
        if self.a2a_algorithm != "flat":
            raise ValueError(
                f"static_shapes=True and a2a_algorithm={self.a2a_algorithm!r} cannot be combined: "
                "the hierarchical exchange de-duplicates per node, which needs the per-node "
                "counts the padded path never exchanges; use a2a_algorithm='flat'")
        if self.nonfinite_policy == "raise":
            raise ValueError(
                "static_shapes=True and nonfinite_policy='raise' cannot be combined: raising "
                "needs a host read of the NaN flag, the sync static shapes exist to avoid; use "
                "nonfinite_policy='count' (the launcher checks the reduced stats every step)")

    # ------------------------------------------------------------------ helpers
    def capacity(self, num_tokens: int, training: bool) -> Optional[int]:
        """Per-expert capacity for ``num_tokens`` local tokens, or None (dropless)."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        if factor is None:
            return None
        raw = math.ceil(factor * num_tokens * self.top_k / self.num_experts)
        return max(self.min_capacity, raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A stable hash of every field, used to check that all ranks agree."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


__all__ = ["MoEConfig", "ROUTERS", "GROUP_ROUTERS", "DROP_POLICIES", "ACTIVATIONS", "EXPERT_BACKENDS",
           "AUX_LOSS_SCOPES", "ROUTER_DTYPES", "A2A_ALGORITHMS"]
