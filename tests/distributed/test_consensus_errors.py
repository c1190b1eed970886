"""Cross-rank mistakes become the same named error on every rank, never a hang (issue 7).

Real gloo ranks (``tests/harness.py``). Each worker catches the error it gets and returns
its type and message, so the test can check that *every* rank raised and what it said:
a config mismatch between ranks (layer name, field, ranks), a parameter-shape mismatch,
a local setup error (num_experts not divisible by ep_size) that must not leave peers
waiting, a run-config mismatch in the launcher's trainer, NaN router logits on one rank
only, and an EP size that does not divide the world.
"""

from __future__ import annotations

import torch

from expert_parallel import MoEConfig, MoELayer, NonFiniteRouterError, ParallelGroups
from tests.harness import run_ranks

D, F = 8, 12


def _catch(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test inspects what each rank raised
        return type(err).__name__, str(err)
    return "none", ""


def _layer_worker(rank: int, world: int, per_rank: dict, ep_size: int) -> tuple[str, str]:
    groups = ParallelGroups.build(ep_size)
    base = dict(hidden_size=D, ffn_hidden_size=F, num_experts=4, top_k=2)
    cfg = MoEConfig(**{**base, **per_rank.get(rank, {})})
    return _catch(lambda: MoELayer(cfg, groups, name="layers.3.ffn"))


def test_config_mismatch_names_layer_field_and_ranks() -> None:
    results = run_ranks(_layer_worker, 2, {1: {"top_k": 1}}, 2, timeout=120)
    for kind, msg in results:
        assert kind == "ValueError", msg
        assert msg.startswith("MoE layer 'layers.3.ffn': ranks disagree on the configuration: ")
        assert "field 'top_k': 2 on ranks [0]; 1 on ranks [1]" in msg


def test_parameter_shape_mismatch_is_reported() -> None:
    results = run_ranks(_layer_worker, 2, {0: {"ffn_hidden_size": 16}}, 2, timeout=120)
    for kind, msg in results:
        assert kind == "ValueError", msg
        assert "field 'ffn_hidden_size': 16 on ranks [0]; 12 on ranks [1]" in msg
        assert "field 'param_shapes'" in msg and "[2, 8, 16]" in msg and "[2, 8, 12]" in msg


def test_setup_error_raised_on_every_rank_without_hang() -> None:
    # 6 experts over EP=4: every rank fails locally; the error travels through the
    # consensus payload so no rank is left waiting in a collective.
    results = run_ranks(_layer_worker, 4, {r: {"num_experts": 6} for r in range(4)}, 4, timeout=120)
    for kind, msg in results:
        assert (kind, msg) == ("ValueError", "num_experts=6 must be divisible by ep_size=4")


def _ep_size_worker(rank: int, world: int) -> tuple[str, str]:
    return _catch(lambda: ParallelGroups.build(3))


def test_ep_size_not_dividing_world_on_every_rank() -> None:
    for kind, msg in run_ranks(_ep_size_worker, 2, timeout=120):
        assert kind == "ValueError" and msg.startswith("ep_size=3 must divide the world size 2"), msg


def _run_config_worker(rank: int, world: int, out: str) -> tuple[str, str]:
    from expert_parallel.training.options import config_from
    from expert_parallel.training.trainer import Trainer

    groups = ParallelGroups.build(1)
    cfg = config_from(d_model=16, n_layers=1, n_heads=2, seq_len=16, num_experts=4,
                      expert_ffn_hidden=16, global_batch_size=2, tensorboard=False, out=out,
                      lr=3e-3 if rank == 0 else 1e-3)
    return _catch(lambda: Trainer(cfg, groups, torch.device("cpu")))


def test_run_config_mismatch_in_trainer(tmp_path) -> None:
    for kind, msg in run_ranks(_run_config_worker, 2, str(tmp_path), timeout=120):
        assert kind == "ValueError", msg
        assert msg.startswith("run config: ranks disagree on the configuration: ")
        assert "field 'lr': 0.003 on ranks [0]; 0.001 on ranks [1]" in msg


def _nan_worker(rank: int, world: int) -> tuple[str, str]:
    groups = ParallelGroups.build(2)
    layer = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=4), groups,
                     name="layers.1.ffn")
    x = torch.randn(6, D)
    layer(x)
    if rank == 1:
        x[2, 5] = float("nan")
    return _catch(lambda: layer(x))


def test_nan_on_one_rank_raises_on_every_rank() -> None:
    for kind, msg in run_ranks(_nan_worker, 2, timeout=120):
        assert kind == NonFiniteRouterError.__name__, msg
        assert msg == "layers.1.ffn (forward call 2): router logits are NaN/Inf on EP rank(s) [1]"
