"""Presets, config validation and distributed launch detection (no processes started)."""

from __future__ import annotations

import pytest

from nemo_dvpo.models.config import ModelConfig, available_presets, load_model_config
from nemo_dvpo.utils.distributed import (
    ParallelConfig,
    detect_launch,
    expand_slurm_nodelist,
    validate_parallel_layout,
)
from nemo_dvpo.utils.errors import ConfigError


def test_all_required_presets_exist_and_validate():
    assert {"llama3_8b", "llama3_2_3b", "mistral_7b", "smollm2_135m", "tiny"} <= set(available_presets())
    for name in available_presets():
        assert load_model_config(name).name == name


@pytest.mark.parametrize("name,expected", [
    ("llama3_8b", dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                       vocab_size=128256, rotary_base=500000.0, tie_word_embeddings=False)),
    ("llama3_2_3b", dict(num_layers=28, hidden_size=3072, num_attention_heads=24, num_query_groups=8,
                         tie_word_embeddings=True)),
    ("mistral_7b", dict(architecture="mistral", rotary_base=1e6, sliding_window=None,
                        num_attention_heads=32, num_query_groups=8, vocab_size=32000)),
    ("smollm2_135m", dict(num_layers=30, hidden_size=576, num_attention_heads=9, num_query_groups=3,
                          rotary_base=100000.0, tie_word_embeddings=True)),
])
def test_preset_shapes_match_the_published_models(name, expected):
    model_cfg = load_model_config(name)
    for field, value in expected.items():
        assert getattr(model_cfg, field) == value, field


def test_preset_round_trips_through_its_hf_config():
    for name in available_presets():
        model_cfg = load_model_config(name)
        again = ModelConfig.from_hf_config(model_cfg.to_hf_config(), name=name)
        assert model_cfg.shape_mismatches(again) == []
        assert again.rotary_base == model_cfg.rotary_base
    llama32 = load_model_config("llama3_2_3b").to_hf_config()
    assert llama32.rope_scaling["rope_type"] == "llama3" and llama32.rope_scaling["factor"] == 32.0
    assert load_model_config("mistral_7b").to_hf_config().sliding_window is None


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"model.hidden_size: expected an integer, got 'big'"):
        load_model_config("tiny", hidden_size="big")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) hiden_size"):
        load_model_config("tiny", hiden_size=64)
    with pytest.raises(ConfigError, match=r"model.architecture: expected 'llama' or 'mistral'"):
        load_model_config("tiny", architecture="gpt2")
    with pytest.raises(ConfigError, match="not divisible by model.num_query_groups"):
        load_model_config("tiny", num_query_groups=3)
    with pytest.raises(ConfigError, match="unknown model preset 'llama9'"):
        load_model_config("llama9")


def test_parallel_layout_validation():
    validate_parallel_layout(4, ParallelConfig(2, 2), num_attention_heads=4, num_query_groups=2, num_layers=4)
    with pytest.raises(ConfigError, match="does not divide the model's 9 attention heads"):
        validate_parallel_layout(2, ParallelConfig(2, 1), num_attention_heads=9, num_query_groups=3)
    with pytest.raises(ConfigError, match="does not divide the model's 2 key/value groups"):
        validate_parallel_layout(4, ParallelConfig(4, 1), num_attention_heads=8, num_query_groups=2)
    with pytest.raises(ConfigError, match="world size 3 is not a multiple"):
        validate_parallel_layout(3, ParallelConfig(2, 1), num_attention_heads=4, num_query_groups=2)
    with pytest.raises(ConfigError, match="must be a positive integer"):
        ParallelConfig(0, 1)


def test_launch_detection_torchrun_slurm_and_plain():
    torchrun = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node1",
                              "MASTER_PORT": "29400"})
    assert (torchrun.launcher, torchrun.rank, torchrun.world_size, torchrun.local_rank) == ("torchrun", 3, 8, 1)
    assert (torchrun.master_addr, torchrun.master_port) == ("node1", 29400)

    slurm = detect_launch({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                           "SLURM_JOB_NODELIST": "gpu[007-008],login1", "SLURM_JOB_ID": "4242"})
    assert (slurm.launcher, slurm.rank, slurm.world_size, slurm.local_rank) == ("slurm", 5, 16, 5)
    assert slurm.master_addr == "gpu007"
    assert slurm.master_port == 20000 + 4242

    # A heterogeneous job's second component: its step runs on its own nodes (the job's list starts with
    # the first component's), and its job id differs from the first component's, so its port does too.
    actor = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gvm01,gpu[02-03]",
             "SLURM_STEP_NODELIST": "gpu[02-03]", "SLURM_JOB_ID": "4243", "SLURM_STEP_ID": "0"}
    server = {**actor, "SLURM_STEP_NODELIST": "gvm01", "SLURM_JOB_ID": "4242"}
    assert detect_launch(actor).master_addr == "gpu02" and detect_launch(server).master_addr == "gvm01"
    assert detect_launch(actor).master_port != detect_launch(server).master_port
    # Two concurrent steps of one job on the same nodes
    assert detect_launch({**actor, "SLURM_STEP_ID": "1"}).master_port != detect_launch(actor).master_port
    assert 20000 <= detect_launch({**actor, "SLURM_JOB_ID": "99999999"}).master_port < 40000
    given = detect_launch({**actor, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"})
    assert (given.master_addr, given.master_port) == ("10.0.0.5", 1234)

    plain = detect_launch({})
    assert (plain.launcher, plain.rank, plain.world_size) == ("single", 0, 1)


def test_slurm_nodelist_expansion():
    assert expand_slurm_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_slurm_nodelist("a1") == ["a1"]
    assert expand_slurm_nodelist("r[1-2]-gpu") == ["r1-gpu", "r2-gpu"]
