"""Every validation error of MoEConfig, ParallelGroups and MoELayer's input checks.

Each bad value must raise the right exception class with a message naming the field
and the offending value (the project rule: bad input fails loudly and identically on
every rank, before any collective). Also the capacity formula on hand-computed cases.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, ParallelGroups
from expert_parallel.config import A2A_ALGORITHMS, ACTIVATIONS, DROP_POLICIES, EXPERT_BACKENDS, ROUTERS
from expert_parallel.distributed.groups import check_ep_size, edp_group_ranks, ep_group_ranks

BASE: dict[str, Any] = dict(hidden_size=8, ffn_hidden_size=16, num_experts=4)


def make(**changes: Any) -> MoEConfig:
    return MoEConfig(**{**BASE, **changes})


def test_defaults_are_valid() -> None:
    cfg = make()
    assert cfg.top_k == 2 and cfg.router == "softmax_topk" and cfg.capacity_factor is None


# --------------------------------------------------------------------- integer fields
INT_FIELDS = [
    # (field, smallest legal value)
    ("hidden_size", 1),
    ("ffn_hidden_size", 1),
    ("num_experts", 1),
    ("top_k", 1),
    ("min_capacity", 0),
    ("overlap_chunks", 1),
]


@pytest.mark.parametrize("field,minimum", INT_FIELDS)
@pytest.mark.parametrize("bad", [2.0, "2", True, None])
def test_int_field_wrong_type(field: str, minimum: int, bad: Any) -> None:
    # bool is an int subclass but never a meaningful size: it must be rejected too.
    with pytest.raises(TypeError, match=rf"^{field} must be an int, got {re.escape(repr(bad))}"):
        make(**{field: bad})


@pytest.mark.parametrize("field,minimum", INT_FIELDS)
def test_int_field_below_minimum(field: str, minimum: int) -> None:
    bad = minimum - 1
    with pytest.raises(ValueError, match=rf"^{field} must be >= {minimum}, got {bad}$"):
        make(**{field: bad})


@pytest.mark.parametrize("field,minimum", INT_FIELDS)
def test_int_field_minimum_is_accepted(field: str, minimum: int) -> None:
    changes: dict[str, Any] = {field: minimum}
    if field == "num_experts":
        changes["top_k"] = 1  # top_k=2 > num_experts=1 would be a different error
    assert getattr(make(**changes), field) == minimum


def test_top_k_greater_than_num_experts() -> None:
    with pytest.raises(ValueError, match=r"^top_k must be <= num_experts \(4\), got 5$"):
        make(top_k=5)
    assert make(top_k=4).top_k == 4  # top_k == num_experts is legal


# -------------------------------------------------------------------- choice fields
# The lists come from config.py so that adding a choice does not break the message
# check; the core choices the issue names are asserted to be present separately.
CHOICE_FIELDS = [
    ("router", list(ROUTERS)),
    ("drop_policy", list(DROP_POLICIES)),
    ("activation", list(ACTIVATIONS)),
    ("expert_backend", list(EXPERT_BACKENDS)),
    ("nonfinite_policy", ["raise", "count"]),
    ("a2a_algorithm", list(A2A_ALGORITHMS)),
]


@pytest.mark.parametrize("field,choices", CHOICE_FIELDS)
@pytest.mark.parametrize("bad", ["bogus", "", 3, None])
def test_choice_field_rejects_unknown(field: str, choices: list[str], bad: Any) -> None:
    expected = f"{field} must be one of {choices}, got {bad!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        make(**{field: bad})


REQUIRED_CHOICES = [
    ("router", ["softmax_topk", "switch", "sigmoid_topk"]),
    ("drop_policy", ["position", "probs"]),
    ("activation", ["swiglu", "gelu"]),
    ("expert_backend", ["auto", "loop", "bmm", "grouped_mm"]),
    ("nonfinite_policy", ["raise", "count"]),
    ("a2a_algorithm", ["flat", "hierarchical", "allgather", "auto"]),
]


@pytest.mark.parametrize("field,choices", REQUIRED_CHOICES)
def test_choice_field_accepts_required_choices(field: str, choices: list[str]) -> None:
    for choice in choices:
        changes: dict[str, Any] = {field: choice}
        if choice == "switch":
            changes["top_k"] = 1
        assert getattr(make(**changes), field) == choice


def test_switch_needs_top_k_1() -> None:
    with pytest.raises(ValueError, match=r"^top_k must be 1 for router='switch', got 2$"):
        make(router="switch", top_k=2)
    with pytest.raises(ValueError, match=r"got 3$"):
        make(router="switch", top_k=3)
    assert make(router="switch", top_k=1).router == "switch"


# --------------------------------------------------------------------- float fields
@pytest.mark.parametrize("field", ["capacity_factor", "eval_capacity_factor"])
@pytest.mark.parametrize("bad", [0.0, -1.0, 0, math.inf, math.nan])
def test_capacity_factor_must_be_positive_and_finite(field: str, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be finite and > 0.0, got {re.escape(repr(bad))}$"):
        make(**{field: bad})


@pytest.mark.parametrize("field", ["capacity_factor", "eval_capacity_factor"])
@pytest.mark.parametrize("bad", ["1.0", True, [1.0]])
def test_capacity_factor_wrong_type(field: str, bad: Any) -> None:
    with pytest.raises(TypeError, match=rf"^{field} must be a float, got {re.escape(repr(bad))}"):
        make(**{field: bad})


@pytest.mark.parametrize("field", ["capacity_factor", "eval_capacity_factor"])
def test_capacity_factor_none_and_int_accepted(field: str) -> None:
    assert getattr(make(**{field: None}), field) is None
    assert getattr(make(**{field: 2}), field) == 2
    assert getattr(make(**{field: 1e-3}), field) == 1e-3


@pytest.mark.parametrize("field", ["aux_loss_coeff", "z_loss_coeff", "router_jitter", "bias_update_rate"])
@pytest.mark.parametrize("bad", [-0.1, math.inf, -math.inf, math.nan])
def test_nonnegative_float_fields(field: str, bad: float) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be finite and >= 0.0, got {re.escape(repr(bad))}$"):
        make(**{field: bad})


@pytest.mark.parametrize("field", ["aux_loss_coeff", "z_loss_coeff", "router_jitter", "bias_update_rate", "init_std"])
@pytest.mark.parametrize("bad", ["0.1", False, None])
def test_float_fields_wrong_type(field: str, bad: Any) -> None:
    with pytest.raises(TypeError, match=rf"^{field} must be a float, got {re.escape(repr(bad))}"):
        make(**{field: bad})


@pytest.mark.parametrize("field", ["aux_loss_coeff", "z_loss_coeff", "router_jitter"])
def test_zero_disables_and_is_accepted(field: str) -> None:
    assert getattr(make(**{field: 0.0}), field) == 0.0


@pytest.mark.parametrize("bad", [1.0, 1.5])
def test_router_jitter_below_one(bad: float) -> None:
    # jitter multiplies inputs by U(1-eps, 1+eps); eps >= 1 could flip or zero them.
    with pytest.raises(ValueError, match=rf"^router_jitter must be < 1, got {bad!r}$"):
        make(router_jitter=bad)
    assert make(router_jitter=0.99).router_jitter == 0.99


@pytest.mark.parametrize("bad", [0.0, -0.02, math.nan])
def test_init_std_strictly_positive(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"^init_std must be finite and > 0.0, got {re.escape(repr(bad))}$"):
        make(init_std=bad)


@pytest.mark.parametrize("router,top_k", [("softmax_topk", 2), ("switch", 1)])
def test_bias_update_rate_needs_sigmoid_router(router: str, top_k: int) -> None:
    expected = f"bias_update_rate > 0 needs router='sigmoid_topk', got router={router!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        make(router=router, top_k=top_k, bias_update_rate=0.01)
    # rate 0 (disabled) is fine with any router; > 0 is fine with sigmoid_topk.
    assert make(router=router, top_k=top_k, bias_update_rate=0.0).bias_update_rate == 0.0
    assert make(router="sigmoid_topk", bias_update_rate=0.01).bias_update_rate == 0.01


# ---------------------------------------------------------------------- bool fields
@pytest.mark.parametrize("bad", [1, 0, "yes", None])
def test_normalize_topk_must_be_bool(bad: Any) -> None:
    with pytest.raises(TypeError, match=rf"^normalize_topk must be a bool, got {re.escape(repr(bad))}$"):
        make(normalize_topk=bad)


@pytest.mark.parametrize("bad", [1, "true", None])
def test_static_shapes_must_be_bool(bad: Any) -> None:
    with pytest.raises(TypeError, match=rf"^static_shapes must be a bool, got {re.escape(repr(bad))}$"):
        make(static_shapes=bad)


@pytest.mark.parametrize("cf,ecf", [(None, None), (1.0, None), (None, 1.0)])
def test_static_shapes_needs_both_capacity_factors(cf: Any, ecf: Any) -> None:
    expected = (
        "static_shapes=True needs capacity_factor and eval_capacity_factor, got "
        f"capacity_factor={cf!r}, eval_capacity_factor={ecf!r}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        make(static_shapes=True, capacity_factor=cf, eval_capacity_factor=ecf)
    assert make(static_shapes=True, capacity_factor=1.0, eval_capacity_factor=2.0,
                nonfinite_policy="count").static_shapes


def test_config_is_frozen_and_replace_revalidates() -> None:
    cfg = make()
    with pytest.raises(Exception):
        cfg.top_k = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        cfg.replace(top_k=9)


def test_fingerprint_tracks_every_field() -> None:
    assert make().fingerprint() == make().fingerprint()
    assert make().fingerprint() != make(drop_policy="probs").fingerprint()


# ------------------------------------------------------------------- capacity formula
@pytest.mark.parametrize(
    "cf,tokens,top_k,experts,min_cap,expected",
    [
        # C = max(min_capacity, ceil(cf * T * k / E))
        (1.0, 10, 2, 4, 0, 5),    # 1*10*2/4 = 5 exactly
        (1.25, 10, 2, 4, 0, 7),   # 6.25 -> 7
        (1.0, 10, 2, 4, 6, 6),    # 5 < min_capacity 6
        (1.0, 2, 1, 4, 4, 4),     # 0.5 -> 1, floored up to min_capacity 4
        (1.0, 2, 1, 4, 0, 1),     # 0.5 -> 1
        (2.0, 7, 3, 5, 0, 9),     # 2*7*3/5 = 8.4 -> 9
        (0.5, 16, 1, 8, 0, 1),    # 1 exactly
        (1.0, 0, 2, 4, 0, 0),     # no tokens -> capacity 0
        (1.0, 0, 2, 4, 3, 3),     # ... unless min_capacity says otherwise
        (3, 5, 1, 4, 0, 4),       # int factor: 3.75 -> 4
    ],
)
def test_capacity_formula(cf: float, tokens: int, top_k: int, experts: int, min_cap: int,
                          expected: int) -> None:
    cfg = MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=experts, top_k=top_k,
                    capacity_factor=cf, min_capacity=min_cap)
    assert cfg.capacity(tokens, training=True) == expected


def test_eval_uses_eval_capacity_factor() -> None:
    cfg = make(top_k=1, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    # T=8, k=1, E=4: training 1*8/4 = 2, eval 2*8/4 = 4.
    assert cfg.capacity(8, training=True) == 2
    assert cfg.capacity(8, training=False) == 4


def test_capacity_none_means_dropless() -> None:
    assert make(capacity_factor=None, eval_capacity_factor=1.0).capacity(8, training=True) is None
    assert make(capacity_factor=1.0, eval_capacity_factor=None).capacity(8, training=False) is None
    assert make(capacity_factor=1.0, eval_capacity_factor=None).capacity(8, training=True) == 4


def test_layer_uses_eval_capacity_in_eval_mode() -> None:
    # All 8 tokens to expert 0 (router weight zero except a large row 0 logit): with
    # min_capacity 0, training C = 1*8*1/4 = 2 and eval C = 2*8*1/4 = 4.
    cfg = make(top_k=1, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(10.0)
    x = torch.rand(8, 8) + 0.1  # positive, so expert 0's logit is the largest
    layer.train()
    st = layer(x).stats
    assert st.kept_E.tolist() == [2, 0, 0, 0] and st.capacity_E.tolist() == [2] * 4
    layer.eval()
    st = layer(x).stats
    assert st.kept_E.tolist() == [4, 0, 0, 0] and st.capacity_E.tolist() == [4] * 4
    assert st.routed_E.tolist() == [8, 0, 0, 0] and st.dropped_E.tolist() == [4, 0, 0, 0]


# ------------------------------------------------------------------ ParallelGroups
@pytest.mark.parametrize("bad", [2.0, "2", True, None])
def test_check_ep_size_type(bad: Any) -> None:
    with pytest.raises(TypeError, match=rf"^ep_size must be an int, got {re.escape(repr(bad))}$"):
        check_ep_size(bad, 4)


@pytest.mark.parametrize("bad", [0, -2])
def test_check_ep_size_positive(bad: int) -> None:
    with pytest.raises(ValueError, match=rf"^ep_size must be >= 1, got {bad}$"):
        check_ep_size(bad, 4)


def test_check_ep_size_divides_world() -> None:
    with pytest.raises(ValueError, match=r"^ep_size=3 must divide the world size 4"):
        check_ep_size(3, 4)
    with pytest.raises(ValueError, match=r"^ep_size=8 must divide the world size 4"):
        check_ep_size(8, 4)
    for ok in (1, 2, 4):
        check_ep_size(ok, 4)


def test_build_without_process_group() -> None:
    # No torch.distributed init in this process: ep_size=1 gives the trivial groups,
    # anything larger cannot divide a world of 1.
    assert not torch.distributed.is_initialized()
    single = ParallelGroups.build(1)
    assert single == ParallelGroups.single()
    assert not single.distributed and single.ep_group is None and single.dp_group is None
    with pytest.raises(ValueError, match=r"^ep_size=2 must divide the world size 1"):
        ParallelGroups.build(2)


def test_group_rank_layouts() -> None:
    # W=8, ep=2: EP groups are consecutive runs; EDP groups stride by ep.
    assert ep_group_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert edp_group_ranks(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert ep_group_ranks(4, 4) == [[0, 1, 2, 3]]
    assert edp_group_ranks(4, 4) == [[0], [1], [2], [3]]


def _groups(ep_size: int, ep_rank: int) -> ParallelGroups:
    return ParallelGroups(ep_size, ep_rank, ep_size, ep_rank, None, tuple(range(ep_size)),
                          1, 0, None, (ep_rank,), None)


def test_local_expert_range() -> None:
    assert ParallelGroups.single().local_expert_range(5) == range(0, 5)
    assert _groups(2, 0).local_expert_range(8) == range(0, 4)
    assert _groups(2, 1).local_expert_range(8) == range(4, 8)
    assert _groups(4, 3).local_expert_range(8) == range(6, 8)
    with pytest.raises(ValueError, match=r"^num_experts=5 must be divisible by ep_size=2$"):
        _groups(2, 1).local_expert_range(5)


def test_layer_rejects_num_experts_not_divisible_by_ep_size() -> None:
    # Single process with a hand-made ep_size=3 groups object (no process group, so the
    # consensus check is a no-op); the error is the divisibility one, raised at init.
    with pytest.raises(ValueError, match=r"num_experts=4 must be divisible by ep_size=3"):
        MoELayer(make(), groups=_groups(3, 0))


# ------------------------------------------------------------------ MoELayer inputs
def test_layer_rejects_non_config() -> None:
    with pytest.raises(TypeError, match=r"config must be an MoEConfig, got dict"):
        MoELayer(dict(BASE))  # type: ignore[arg-type]


def test_layer_wrong_hidden_size() -> None:
    layer = MoELayer(make(), name="blk0.moe")
    with pytest.raises(ValueError, match=r"^blk0\.moe: .*hidden_size=8, got shape \(3, 7\)$"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"hidden_size=8, got shape \(2, 3, 16\)"):
        layer(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"hidden_size=8, got shape \(\)"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_layer_rejects_integer_dtype(dtype: torch.dtype) -> None:
    layer = MoELayer(make())
    with pytest.raises(TypeError, match=rf"input dtype must be floating point, got {re.escape(str(dtype))}"):
        layer(torch.zeros(3, 8, dtype=dtype))


def test_layer_rejects_non_tensor() -> None:
    layer = MoELayer(make())
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got list"):
        layer([[0.0] * 8])  # type: ignore[arg-type]


def test_layer_accepts_leading_dims() -> None:
    layer = MoELayer(make())
    x = torch.randn(2, 3, 8)
    out = layer(x)
    assert out.output.shape == x.shape and out.output.dtype == x.dtype
    assert int(out.stats.num_tokens) == 6


# ------------------------------------------------------ top_p / expert_choice routers
def test_top_p_router_needs_top_p() -> None:
    with pytest.raises(ValueError, match=re.escape(
            "top_p must be set (0 < top_p <= 1) for router='top_p', got None")):
        make(router="top_p")
    assert make(router="top_p", top_p=1.0).top_p == 1.0
    assert make(router="top_p", top_p=0.5).top_p == 0.5


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan, math.inf])
def test_top_p_must_be_positive_finite(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"^top_p must be finite and > 0.0, got {re.escape(repr(bad))}$"):
        make(router="top_p", top_p=bad)


@pytest.mark.parametrize("bad", ["0.5", True])
def test_top_p_wrong_type(bad: Any) -> None:
    with pytest.raises(TypeError, match=rf"^top_p must be a float, got {re.escape(repr(bad))}"):
        make(router="top_p", top_p=bad)


def test_top_p_at_most_one() -> None:
    with pytest.raises(ValueError, match=r"^top_p must be <= 1, got 1\.5$"):
        make(router="top_p", top_p=1.5)


def test_top_p_only_for_top_p_router() -> None:
    expected = "top_p is only used by router='top_p', got top_p=0.5 with router='softmax_topk'"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        make(top_p=0.5)


@pytest.mark.parametrize("missing", ["capacity_factor", "eval_capacity_factor"])
def test_expert_choice_needs_both_capacity_factors(missing: str) -> None:
    fields: dict[str, Any] = {"capacity_factor": 1.0, "eval_capacity_factor": 1.0, missing: None}
    with pytest.raises(ValueError, match=rf"^{missing} must be set for router='expert_choice'.*got None$"):
        make(router="expert_choice", **fields)
    assert make(router="expert_choice", capacity_factor=1.0, eval_capacity_factor=2.0).router == "expert_choice"
