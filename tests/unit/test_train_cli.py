"""The launcher's generated command line and JSON config (training/options.py), in-process.

The options come from the config dataclasses, so these tests read the dataclasses at
test time: a field added to MoEConfig (or any config of the tree) must show up as an
option, in --help with its docstring, type and default, without anyone listing it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from expert_parallel import MoEConfig
from expert_parallel.config import ROUTERS, ParallelConfig
from expert_parallel.models.transformer import ModelConfig
from expert_parallel.moe.capacity_tuner import CapacityTunerConfig
from expert_parallel.training.config import TrainConfig
from expert_parallel.training.options import (build_config, config_from, field_docs, make_parser, options,
                                              parse_args)

REPO = Path(__file__).resolve().parents[2]
SECTIONS = {("model",): ModelConfig, ("model", "moe"): MoEConfig, ("parallel",): ParallelConfig,
            ("tuner",): CapacityTunerConfig, (): TrainConfig}


def _leaf_paths() -> set[tuple[str, ...]]:
    out = set()
    for prefix, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.type) and f.name not in ("model", "moe", "parallel", "tuner"):
                out.add(prefix + (f.name,))
    return out


def test_every_field_of_every_config_is_an_option() -> None:
    got = {o.path for o in options()}
    # moe.hidden_size is derived from model.d_model; nothing else is left out.
    assert _leaf_paths() - got == {("model", "moe", "hidden_size")}
    assert got <= _leaf_paths()
    for f in dataclasses.fields(MoEConfig):
        if f.name != "hidden_size":
            assert any(o.path == ("model", "moe", f.name) for o in options()), f.name


def test_flat_names_users_know_are_kept() -> None:
    names = {n for o in options() for n in o.names}
    for name in ("capacity-factor", "num-experts", "top-k", "ep-size", "ranks-per-node", "expert-ffn-hidden",
                 "a2a-algorithm", "overlap-chunks", "static-shapes", "expert-backend", "router",
                 "nonfinite-policy", "capacity-target-drop", "capacity-tune-every", "resume", "overwrite",
                 "d-model", "max-steps", "out"):
        assert name in names, name
    flat = [n for o in options() for n in o.names]
    assert len(flat) == len(set(flat))  # no two options share a name


def test_help_lists_every_option_grouped_with_doc_type_and_default() -> None:
    text = " ".join(make_parser().format_help().split())  # argparse wraps lines
    for title in ("model (ModelConfig)", "moe (MoEConfig)", "parallel (ParallelConfig)",
                  "capacity tuner (CapacityTunerConfig)", "training (TrainConfig)"):
        assert title in text, title
    assert text.index("model (ModelConfig)") < text.index("moe (MoEConfig)") < text.index("training (TrainConfig)")
    for opt in options():
        assert f"--{opt.names[0]}" in text, opt.names
        first_words = " ".join(opt.doc.replace("``", "").split()[:4])
        assert first_words and first_words in text, (opt.names, first_words)
    assert "Training capacity factor." in text and "[float|none, default: 1.25]" in text
    assert "[bool, default: false]" in text and "default: auto]" in text
    assert "hidden_size is set from model.d_model" in text


def test_docstrings_come_from_the_class_source() -> None:
    docs = field_docs(MoEConfig)
    assert docs["capacity_factor"].startswith("Training capacity factor. ``None`` = dropless")
    assert field_docs(TrainConfig)["max_steps"] == "Training steps."


@dataclass(frozen=True)
class _Knobs:
    """A component nobody taught the launcher about."""

    new_knob: int = 3
    """A brand-new setting."""
    maybe: Optional[float] = None
    """Optional, none by default."""


@dataclass(frozen=True)
class _Root:
    knobs: _Knobs = field(default_factory=_Knobs)
    """Nested section."""
    lr: float = 1.0
    """Top-level."""


def test_a_new_field_becomes_an_option_by_itself() -> None:
    opts = {o.names[0]: o for o in options(_Root)}
    assert set(opts) == {"new-knob", "maybe", "lr"}
    assert opts["new-knob"].doc == "A brand-new setting." and opts["new-knob"].section == ("knobs",)
    text = " ".join(make_parser(root=_Root).format_help().split())
    assert "--new-knob INT A brand-new setting. [int, default: 3]" in text
    assert "--maybe FLOAT|none Optional, none by default. [float|none, default: none]" in text
    cfg = build_config({("knobs", "new_knob"): 5}, root=_Root)
    assert cfg == _Root(knobs=_Knobs(new_knob=5))


def test_values_none_bools_aliases_and_underscores() -> None:
    cfg = parse_args(["--capacity-factor", "none", "--resume", "--top_k", "1", "--router", "switch",
                      "--expert-ffn-hidden", "64", "--static-shapes", "false", "--ep-size", "4",
                      "--ranks-per-node", "2", "--overlap-chunks=3", "--tensorboard", "off"])
    moe = cfg.model.moe
    assert (moe.capacity_factor, moe.top_k, moe.router, moe.ffn_hidden_size, moe.static_shapes,
            moe.overlap_chunks) == (None, 1, "switch", 64, False, 3)
    assert cfg.resume is True and cfg.tensorboard is False
    assert cfg.parallel == ParallelConfig(ep_size=4, ranks_per_node=2)
    assert parse_args([]).parallel.ep_size == "auto"  # EP stays inside a node by default


def test_hidden_size_follows_d_model() -> None:
    cfg = parse_args(["--d-model", "48", "--n-heads", "4"])
    assert cfg.model.d_model == cfg.model.moe.hidden_size == 48


def test_json_flat_and_nested_keys_and_precedence(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"d_model": 64, "capacity_factor": "none", "moe": {"top_k": 1,
                                "router": "switch"}, "parallel": {"ep_size": 2}, "max_steps": 7,
                                "model": {"moe": {"num_experts": 4}}, "capacity-tune-every": 5}))
    cfg = parse_args(["--config", str(path), "--max-steps", "9"])
    assert cfg.model.d_model == cfg.model.moe.hidden_size == 64
    assert (cfg.model.moe.capacity_factor, cfg.model.moe.top_k, cfg.model.moe.num_experts) == (None, 1, 4)
    assert cfg.parallel.ep_size == 2 and cfg.max_steps == 9 and cfg.tuner.tune_every == 5  # CLI wins


def test_the_config_json_a_run_writes_reads_back(tmp_path: Path) -> None:
    cfg = config_from(d_model=32, n_heads=2, num_experts=4, top_k=1, ep_size=2, capacity_target_drop=0.02)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))  # nested, hidden_size included
    assert parse_args(["--config", str(path)]) == cfg


@pytest.mark.parametrize("obj,message", [
    ({"capcity_factor": 1.0}, "unknown key 'capcity_factor'; did you mean 'capacity_factor'?"),
    ({"moe": {"hidden_size": 7}}, "model.moe.hidden_size is derived from model.d_model=128, got 7"),
    ({"lr": "fast"}, "--lr: cannot parse 'fast' as float"),
])
def test_json_errors_are_named(tmp_path: Path, obj, message) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError) as err:
        parse_args(["--config", str(path)])
    assert message in str(err.value)


@pytest.mark.parametrize("argv,line", [
    (["--capcity-factor", "1.5"], "unknown option --capcity-factor; did you mean --capacity-factor?"),
    (["--ep-sise=2"], "unknown option --ep-sise; did you mean --ep-size?"),
    (["--top-k", "two"], "argument --top-k: cannot parse 'two' as int"),
    (["--resume", "maybe"], "argument --resume: cannot parse 'maybe' as bool"),
    (["stray"], "unexpected argument 'stray'; options are --name value"),
])
def test_bad_options_are_one_line_and_exit_2(capsys, argv, line) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"train.py: error: {line}\n"


def test_abbreviations_are_not_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--capacity", "1.5"])  # argparse would take a unique prefix; we do not
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error: unknown option --capacity; did you mean --") and err.count("\n") == 1
    suggested = err.split("did you mean --")[1].rstrip("?\n")
    assert suggested in {n for o in options() for n in o.names}


def test_quiet_ranks_print_nothing(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--capcity-factor", "1.5"], quiet=True)
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"], quiet=True)
    assert exit_.value.code == 0
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("argv,error,message", [
    (["--top-k", "9"], ValueError, "top_k must be <= num_experts (8), got 9"),
    (["--resume", "--overwrite"], ValueError, "resume=True and overwrite=True exclude each other"),
    (["--capacity-target-drop", "0.01", "--capacity-factor", "none"], ValueError,
     "tuner.target_drop=0.01 needs a capacity_factor to tune"),
    (["--ep-size", "3"], ValueError, "ep_size=3 must divide num_experts=8"),
    (["--ep-size", "many"], ValueError, "ep_size must be a positive int or 'auto', got 'many'"),
    (["--keep-checkpoints", "0"], ValueError, "keep_checkpoints must be >= 1, got 0"),
])
def test_validation_errors_name_the_field(argv, error, message) -> None:
    with pytest.raises(error) as err:
        parse_args(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_choices_are_checked_on_the_command_line(capsys) -> None:
    # One name per thing: the old 'skip' spelling of nonfinite_policy='count' is refused.
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--nonfinite-policy", "skip"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--nonfinite-policy: cannot parse 'skip' as raise|count" in err and err.count("\n") == 1


def test_config_from_takes_flat_and_sectioned_keywords() -> None:
    cfg = config_from(num_experts=4, top_k=1, **{"moe.router": "switch"})
    assert (cfg.model.moe.num_experts, cfg.model.moe.router) == (4, "switch")
    with pytest.raises(ValueError, match="unknown key 'num_expert'; did you mean 'num_experts'"):
        config_from(num_expert=4)


@pytest.mark.parametrize("router", ROUTERS)
def test_every_router_is_reachable(router) -> None:
    needs = {"switch": ["--top-k", "1"], "top_p": ["--top-p", "0.8"],
             "sigmoid_topk": ["--bias-update-rate", "0.001"]}  # any other router: no extra option
    cfg = parse_args(["--router", router, *needs.get(router, [])])
    assert cfg.model.moe.router == router


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "launch" / "configs").glob("*.json")
                                        if not p.name.startswith("ds_")), ids=lambda p: p.name)
def test_shipped_launcher_configs_parse(path) -> None:
    cfg = parse_args(["--config", str(path)])
    assert cfg.model.moe.hidden_size == cfg.model.d_model


def test_two_node_config_asks_for_the_hierarchical_exchange() -> None:
    cfg = parse_args(["--config", str(REPO / "launch" / "configs" / "two_nodes.json")])
    assert (cfg.parallel.ep_size, cfg.model.moe.a2a_algorithm, cfg.model.moe.overlap_chunks) == (16, "hierarchical", 2)
    # 2 nodes x 8 ranks: EP=16 spans both nodes, 8 ranks per node from the launcher.
    assert cfg.parallel.resolve(cfg.model.moe.num_experts, 16, 8) == (16, 8)


def test_consensus_payload_names_leaf_fields() -> None:
    flat = config_from(num_experts=4, ep_size=2).flat_dict()
    assert flat["model.moe.num_experts"] == 4 and flat["parallel.ep_size"] == 2 and "lr" in flat
    assert not any(isinstance(v, dict) for v in flat.values())
