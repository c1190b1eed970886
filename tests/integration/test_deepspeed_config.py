"""Validation of the DeepSpeed path's inputs, in-process (no ranks): every bad field is a
ValueError naming the field and value, raised before any collective."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expert_parallel.training.config import TrainConfig
from expert_parallel.training.deepspeed_config import load_ds_config
from expert_parallel.training.deepspeed_setup import check_group_ranks, expert_group_name
from expert_parallel.training.options import config_from

REPO = Path(__file__).resolve().parents[2]
CFG = TrainConfig(global_batch_size=8, grad_clip=0.5)


def write(tmp_path: Path, obj) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("stage", [1, 2])
def test_shipped_configs_load_and_are_filled_from_train_config(stage) -> None:
    ds = load_ds_config(str(REPO / "launch" / "configs" / f"ds_zero{stage}.json"), CFG, world_size=4)
    assert ds["zero_optimization"]["stage"] == stage
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) \
        == (8, 2, 1)
    assert ds["gradient_clipping"] == 1.0  # the DeepSpeed config wins over TrainConfig.grad_clip


def test_missing_clipping_comes_from_train_config(tmp_path) -> None:
    ds = load_ds_config(write(tmp_path, {"zero_optimization": {"stage": 2}}), CFG, world_size=4)
    assert ds["gradient_clipping"] == 0.5


@pytest.mark.parametrize("obj,message", [
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3 is not supported"),
    ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage=0 is not supported"),
    ({}, "zero_optimization must be an object"),
    ({"zero_optimization": {"stage": 1, "contiguous_gradients": False}},
     "zero_optimization.contiguous_gradients=False must be true"),
    ({"zero_optimization": {"stage": 2, "reduce_scatter": False}}, "zero_optimization.reduce_scatter=False"),
    ({"zero_optimization": {"stage": 2, "load_from_fp32_weights": False}}, "load_from_fp32_weights=False"),
    ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "elastic_checkpoint=True must be false"),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 16}, "train_batch_size=16 must be 8"),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4},
     "train_micro_batch_size_per_gpu=4 must be 2"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 must be 1"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16.enabled=true is not supported"),
    ({"zero_optimization": {"stage": 2}, "use_data_before_expert_parallelism": True},
     "use_data_before_expert_parallelism=True must be false"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": -1}, "gradient_clipping=-1"),
    ({"zero_optimization": {"stage": 2}, "optimizer": "adam"}, "optimizer='adam' must be an object"),
])
def test_bad_fields_name_field_and_value(tmp_path, obj, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_ds_config(write(tmp_path, obj), CFG, world_size=4)


def test_missing_or_invalid_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_ds_config(str(tmp_path / "nope.json"), CFG, world_size=4)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_ds_config(str(bad), CFG, world_size=4)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_ds_config(str(bad), CFG, world_size=4)


def test_batch_must_divide_by_world(tmp_path) -> None:
    with pytest.raises(ValueError, match="global_batch_size=8 must divide by the world size 3"):
        load_ds_config(write(tmp_path, {"zero_optimization": {"stage": 1}}), CFG, world_size=3)


def test_count_policy_is_refused(tmp_path) -> None:
    cfg = config_from(global_batch_size=8, nonfinite_policy="count")
    with pytest.raises(ValueError, match="nonfinite_policy='count' is not supported with --deepspeed"):
        load_ds_config(write(tmp_path, {"zero_optimization": {"stage": 1}}), cfg, world_size=4)


def test_group_mismatch_names_both_rank_lists() -> None:
    assert expert_group_name(2) == "ep_size_2"
    check_group_ranks("expert-parallel", "ep_size_2", None, (0, 1))  # not registered yet: fine
    check_group_ranks("expert-parallel", "ep_size_2", range(0, 2), (0, 1))  # same ranks: fine
    with pytest.raises(ValueError, match=r"group 'ep_size_2' holds ranks \[0, 2\].*ParallelGroups has \[0, 1\]"):
        check_group_ranks("expert-data-parallel", "ep_size_2", [0, 2], (0, 1))
