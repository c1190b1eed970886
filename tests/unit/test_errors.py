"""Bad input is a clear error naming the field and the value (issue 7).

Each test feeds one kind of bad input and asserts the exact message fragment a user
would read: MoE config fields, EP sizes, layer inputs (hidden size, dtype, device,
NaN router logits), data files, launcher options, run-config fields, and the trainer's
non-finite policy. Single process, CPU; the cross-rank cases (consensus, a NaN on one
rank only) live in ``tests/distributed/test_consensus_errors.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from expert_parallel import MoEConfig, MoELayer, NonFiniteRouterError, ParallelGroups
from expert_parallel.distributed.groups import check_ep_size
from expert_parallel.training.config import TrainConfig
from expert_parallel.training.options import config_from, parse_args
from expert_parallel.training.data import BatchSampler, load_data

D, F = 8, 12


def cfg(**kw) -> MoEConfig:
    base = dict(hidden_size=D, ffn_hidden_size=F, num_experts=4, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def raises(exc: type, message: str):
    """pytest.raises matching ``message`` literally (not as a regex)."""
    return pytest.raises(exc, match=re.escape(message))


# --------------------------------------------------------------------- MoE config
def test_top_k_larger_than_num_experts() -> None:
    with raises(ValueError, "top_k must be <= num_experts (4), got 5"):
        cfg(top_k=5)


@pytest.mark.parametrize("factor", [0.0, -1.5])
def test_capacity_factor_not_positive(factor: float) -> None:
    with raises(ValueError, f"capacity_factor must be finite and > 0.0, got {factor!r}"):
        cfg(capacity_factor=factor)


def test_capacity_factor_nan() -> None:
    with raises(ValueError, "capacity_factor must be finite and > 0.0, got nan"):
        cfg(capacity_factor=float("nan"))


def test_eval_capacity_factor_not_positive() -> None:
    with raises(ValueError, "eval_capacity_factor must be finite and > 0.0, got -0.5"):
        cfg(eval_capacity_factor=-0.5)


def test_hidden_size_of_wrong_type() -> None:
    with raises(TypeError, "hidden_size must be an int, got 8.0 (float)"):
        cfg(hidden_size=8.0)


def test_num_experts_zero() -> None:
    with raises(ValueError, "num_experts must be >= 1, got 0"):
        cfg(num_experts=0, top_k=1)


def test_unknown_router() -> None:
    from expert_parallel.config import ROUTERS

    with raises(ValueError, f"router must be one of {list(ROUTERS)}, got 'topk'"):
        cfg(router="topk")


def test_switch_router_needs_top1() -> None:
    with raises(ValueError, "top_k must be 1 for router='switch', got 2"):
        cfg(router="switch")


def test_static_shapes_needs_a_capacity() -> None:
    with raises(ValueError, "static_shapes=True needs capacity_factor and eval_capacity_factor, "
                            "got capacity_factor=None"):
        cfg(static_shapes=True)


def test_unknown_nonfinite_policy() -> None:
    with raises(ValueError, "nonfinite_policy must be one of ['raise', 'count'], got 'ignore'"):
        cfg(nonfinite_policy="ignore")


def test_layer_needs_an_moe_config() -> None:
    with raises(TypeError, "config must be an MoEConfig, got dict"):
        MoELayer({"hidden_size": D})  # type: ignore[arg-type]


# --------------------------------------------------------------------- EP sizes
def test_ep_size_not_dividing_world() -> None:
    with raises(ValueError, "ep_size=3 must divide the world size 4"):
        check_ep_size(3, 4)


def test_ep_size_zero_and_wrong_type() -> None:
    with raises(ValueError, "ep_size must be >= 1, got 0"):
        check_ep_size(0, 4)
    with raises(TypeError, "ep_size must be an int, got '2'"):
        check_ep_size("2", 4)


def test_ep_size_not_dividing_experts() -> None:
    with raises(ValueError, "ep_size=4 must divide num_experts=6"):
        config_from(num_experts=6, ep_size=4)


# --------------------------------------------------------------------- layer input
@pytest.fixture(scope="module")
def layer() -> MoELayer:
    return MoELayer(cfg(), name="layers.0.ffn")


def test_input_with_wrong_hidden_size(layer: MoELayer) -> None:
    with raises(ValueError, "layers.0.ffn: input last dim must be hidden_size=8, got shape (3, 6)"):
        layer(torch.randn(3, 6))


def test_input_with_integer_dtype(layer: MoELayer) -> None:
    with raises(TypeError, "layers.0.ffn: input dtype must be floating point, got torch.int64"):
        layer(torch.ones(3, D, dtype=torch.int64))


def test_input_on_another_device(layer: MoELayer) -> None:
    # "meta" stands in for a GPU tensor fed to a CPU layer (and vice versa).
    with raises(ValueError, "layers.0.ffn: input is on device meta but the layer is on cpu"):
        layer(torch.empty(3, D, device="meta"))


def test_input_not_a_tensor(layer: MoELayer) -> None:
    with raises(TypeError, "layers.0.ffn: input must be a torch.Tensor, got list"):
        layer([[0.0] * D])  # type: ignore[arg-type]


def test_nonfinite_router_logits_raise_naming_layer_and_call() -> None:
    layer = MoELayer(cfg(), name="layers.2.ffn")
    x = torch.randn(5, D)
    layer(x)  # forward call 1 is fine
    x[3, 0] = float("nan")
    with raises(NonFiniteRouterError,
                "layers.2.ffn (forward call 2): router logits are NaN/Inf on EP rank(s) [0]"):
        layer(x)


def test_nonfinite_router_logits_counted_under_count_policy() -> None:
    layer = MoELayer(cfg(nonfinite_policy="count"), name="moe")
    x = torch.randn(5, D)
    x[0, 0] = float("inf")
    out = layer(x)  # no error: the caller reads the flag and skips the step
    assert int(out.stats.nonfinite) == 1
    assert int(layer(torch.randn(5, D)).stats.nonfinite) == 0


def test_empty_input_works(layer: MoELayer) -> None:
    """T = 0 is not an error: an empty output and zero gradients, dropless or not."""
    for capacity in (None, 1.0):
        lay = MoELayer(cfg(capacity_factor=capacity, min_capacity=0), name="moe")
        x = torch.randn(0, D, requires_grad=True)
        out = lay(x)
        assert out.output.shape == (0, D)
        (out.output.sum() + out.aux_loss).backward()
        assert x.grad is not None and x.grad.shape == (0, D)
        assert int(out.stats.num_tokens) == 0 and int(out.stats.routed_E.sum()) == 0
        for name, p in lay.named_parameters():
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


def test_global_state_dict_with_wrong_shape(layer: MoELayer) -> None:
    sd = layer.global_state_dict()
    sd["experts.w1_eDF"] = sd["experts.w1_eDF"][:3]
    with raises(ValueError, "layers.0.ffn: experts.w1_eDF has shape (3, 8, 12), expected (4, 8, 12)"):
        layer.load_global_state_dict(sd)


# --------------------------------------------------------------------- data files
def test_data_file_missing(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.txt")
    with raises(ValueError, f"data: file {path!r} does not exist"):
        load_data(path, 256, 16)


def test_data_file_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with raises(ValueError, f"data: file {str(path)!r} is empty"):
        load_data(str(path), 256, 16)


def test_data_file_is_a_directory(tmp_path: Path) -> None:
    with raises(ValueError, f"data: {str(tmp_path)!r} is a directory, expected a text or .bin file"):
        load_data(str(tmp_path), 256, 16)


def test_data_bin_with_odd_byte_count(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    path.write_bytes(b"\x01\x00\x02")
    with raises(ValueError, f"data: {str(path)!r} has 3 bytes, not a whole number of uint16 tokens"):
        load_data(str(path), 256, 16)


def test_data_bin_token_out_of_vocab(tmp_path: Path) -> None:
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    with raises(ValueError, f"data: {str(path)!r} holds token id 999 >= vocab_size=256"):
        load_data(str(path), 256, 16)


def test_data_file_too_short_for_seq_len(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("x" * 100)
    with raises(ValueError, f"data: the val split of {str(path)!r} has 10 tokens, fewer than "
                            "seq_len + 2 = 18"):
        load_data(str(path), 256, 16)


def test_global_batch_not_divisible_by_world() -> None:
    with raises(ValueError, "global_batch_size=6 must be divisible by the world size 4"):
        BatchSampler(np.zeros(100, dtype=np.uint8), 8, 6, 0, 4, 0)


# --------------------------------------------------------------------- launcher options
def test_unknown_launcher_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--capcity-factor", "1.0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("train.py: error: unknown option --capcity-factor; "
                                       "did you mean --capacity-factor?\n")


def test_unparsable_launcher_value(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--lr", "fast"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "train.py: error: argument --lr: cannot parse 'fast' as float\n"


def test_config_file_not_json(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text("{ep_size: 2")
    with raises(ValueError, f"--config: {str(path)!r} is not valid JSON"):
        parse_args(["--config", str(path)])


def test_collective_timeout_not_positive() -> None:
    with raises(ValueError, "collective_timeout_s must be finite and > 0.0, got 0.0"):
        TrainConfig(collective_timeout_s=0.0)


def test_unknown_trainer_nonfinite_policy() -> None:
    # One name per thing: the launcher takes MoEConfig's raise | count ('skip' is gone).
    with raises(ValueError, "--nonfinite-policy: cannot parse 'skip' as raise|count"):
        config_from(nonfinite_policy="skip")


# --------------------------------------------------------------------- trainer policy
def _trainer(tmp_path: Path, policy: str):
    from expert_parallel.training.trainer import Trainer

    text = tmp_path / "corpus.txt"
    text.write_bytes(bytes(range(32, 127)) * 40)
    cfg_ = config_from(d_model=16, n_layers=2, n_heads=2, seq_len=16, num_experts=4,
                       expert_ffn_hidden=16, dense_ffn_hidden=32, global_batch_size=2,
                       tensorboard=False, out=str(tmp_path / "run"), data=str(text),
                       nonfinite_policy=policy)
    trainer = Trainer(cfg_, ParallelGroups.single(), torch.device("cpu"))
    with torch.no_grad():  # poison layer 1's router: its logits become NaN
        trainer.model.moe_layers()["layers.1.ffn"].router.weight[0, 0] = float("nan")
    return trainer


def test_trainer_raises_on_nonfinite_naming_step_and_layer(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "raise")
    trainer.step = 7
    with raises(NonFiniteRouterError, "step 7: layers.1.ffn (forward call 1): router logits are "
                                      "NaN/Inf on EP rank(s) [0]; set nonfinite_policy=count"):
        trainer.train_step()


def test_trainer_skips_nonfinite_step_without_updating(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "count")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.train_step()
    assert result.skipped
    assert int(result.stats["layers.1.ffn"].nonfinite) == 1
    assert int(result.stats["layers.0.ffn"].nonfinite) == 0
    for n, p in trainer.model.named_parameters():
        same = torch.allclose(p, before[n], rtol=0.0, atol=0.0, equal_nan=True)  # NaN stays NaN
        assert same, f"{n} changed on a skipped step"
        assert p.grad is None, f"{n} kept a gradient after a skipped step"
