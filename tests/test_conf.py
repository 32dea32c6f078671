"""Every entry point's ``nemo_dvpo/conf/<name>.yaml`` composes with Hydra as the entry point composes it, and its typed
config validates, for every model preset in ``nemo_dvpo/conf/model/`` where the entry point takes one.

A YAML key the dataclasses do not have, a value of the wrong type, or a preset that no longer loads fails
here, not in the first minute of a user's run.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nemo_dvpo.utils.paths import CONF_DIR
PRESETS = sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml"))


def _entry_points():
    from nemo_dvpo.inference.completion import GenerateConfig
    from nemo_dvpo.recipes import dpo, dvpo, grpo, gvm, ppo
    from nemo_dvpo.recipes.config import parse_recipe_config
    from nemo_dvpo.serving.gvm_server import ServeGVMConfig
    from nemo_dvpo.serving.openai_server import ServePolicyConfig
    from nemo_dvpo.utils.config import from_dict

    def served(cls, required):
        def parse(cfg):
            raw = OmegaConf.to_container(cfg, resolve=True)
            raw.pop("hydra", None)
            return from_dict(cls, {**raw, **required}, "config")
        return parse

    # conf name -> (the defaults node the entry point registers, its dataclass, how it parses the config)
    return {
        "dvpo": ("dvpo_defaults", dvpo.DVPORecipeConfig, dvpo.parse_config),
        "gvm": ("gvm_defaults", gvm.GVMRecipeConfig, gvm.parse_config),
        "reward_model": ("gvm_defaults", gvm.GVMRecipeConfig, gvm.parse_config),
        "ppo": ("ppo_defaults", ppo.PPORecipeConfig, ppo.parse_config),
        "grpo": ("grpo_defaults", grpo.GRPORecipeConfig, grpo.parse_config),
        "dpo": ("dpo_defaults", dpo.DPORecipeConfig, dpo.parse_config),
        "serve_gvm": ("serve_gvm_defaults", ServeGVMConfig, served(ServeGVMConfig, {"gvm": "runs/gvm/final"})),
        "serve_policy": ("serve_policy_defaults", ServePolicyConfig, served(ServePolicyConfig, {"policy": "tiny"})),
        # As examples/generate.py parses it, given the prompts its command line must add.
        "generate": ("generate_defaults", GenerateConfig,
                     lambda cfg: parse_recipe_config(OmegaConf.merge(cfg, {"prompts": ["Hi"]}), GenerateConfig,
                                                     "generate")),
    }


def _compose(name: str, overrides: list[str]):
    from nemo_dvpo.utils.config import register_defaults

    defaults_name, cls, _ = _entry_points()[name]
    register_defaults(defaults_name, cls)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return compose(config_name=name, overrides=overrides)


def test_every_conf_file_is_an_entry_point_here():
    tested = set(_entry_points())
    assert sorted(path.stem for path in CONF_DIR.glob("*.yaml")) == sorted(tested)


@pytest.mark.parametrize("name", ["dvpo", "gvm", "reward_model", "ppo", "grpo", "dpo", "serve_gvm", "serve_policy",
                                  "generate"])
def test_each_conf_composes_and_validates(name):
    config = _entry_points()[name][2](_compose(name, []))
    assert config is not None


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["dvpo", "gvm", "ppo", "grpo", "dpo"])
def test_each_recipe_validates_with_each_model_preset(name, preset):
    config = _entry_points()[name][2](_compose(name, [f"model={preset}"]))
    assert config.model.name == preset


def test_a_wrong_key_or_type_in_a_conf_file_is_named():
    """The check can fail: a key the dataclasses lack, or a value of the wrong type, is refused naming the field."""
    from nemo_dvpo.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dvpo.ppo: unknown field\(s\) clip_range"):
        _entry_points()["dvpo"][2](_compose("dvpo", ["+ppo.clip_range=0.3"]))
    with pytest.raises(ConfigError, match=r"dvpo.train.steps"):
        _entry_points()["dvpo"][2](_compose("dvpo", ["train.steps=many"]))


def test_generate_defaults_to_greedy_answers_and_refuses_missing_prompts():
    from nemo_dvpo.inference.completion import GenerateConfig
    from nemo_dvpo.recipes.config import parse_recipe_config
    from nemo_dvpo.utils.errors import ConfigError

    config = _entry_points()["generate"][2](_compose("generate", []))
    assert config.sampling.greedy and config.model.name == "smollm2_135m" and config.prompts == ["Hi"]
    with pytest.raises(ConfigError, match="give exactly one of prompts"):
        parse_recipe_config(_compose("generate", []), GenerateConfig, "generate")
