"""The one run lifecycle (``nemo_dvpo.training.run.Run``) as every recipe uses it: GVM, reward model, DPO, DVPO,
PPO and GRPO each built from a checkpoint (``init_from``) under a preset that says how to run it, trained for a
step in this process, and read back: the run settings reach the built model, and the metrics and the summary
carry the same names whatever the recipe."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

FIXTURE = str(REPO_ROOT / "tests" / "fixtures" / "ultrafeedback_binarized_mini.jsonl")
RECIPES = ("gvm", "reward_model", "dpo", "dvpo", "ppo", "grpo")
# Every metric a recipe logs is named under one of these (training/run.py's docstring).
PREFIXES = ("time/", "perf/", "train/", "rollout/", "eval/")


def _recipe(name: str, work_dir: Path, run_dir: Path):
    """The recipe ``name`` at the tiny shape from ``work_dir/init`` (bf16, full activation recompute), one step."""
    from nemo_dvpo.inference.generation import SamplingConfig
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.rlhf.config import EvalConfig, PolicyTrainConfig, PolicyUpdateConfig, PromptDataConfig, RolloutConfig

    # The checkpoint was saved in fp32 without recompute: the preset says how this run computes.
    model = dataclasses.replace(load_model_config("tiny"), precision="bf16", activation_recompute="full")
    common = dict(model=model, run_dir=str(run_dir), init_from=str(work_dir / "init"))
    if name in ("gvm", "reward_model"):
        from nemo_dvpo.recipes.gvm import DataSplits, GVMRecipe, GVMRecipeConfig, GVMTrainConfig

        train = GVMTrainConfig(objective="td_lambda" if name == "gvm" else "bradley_terry", steps=1,
                               global_batch_size=4, micro_batch_size=2, value_stats_samples=4)
        return GVMRecipe(GVMRecipeConfig(**common, data=DataSplits(train=FIXTURE, eval=FIXTURE), train=train))
    if name == "dpo":
        from nemo_dvpo.recipes.dpo import DPOData, DPORecipe, DPORecipeConfig, DPOTrainConfig

        return DPORecipe(DPORecipeConfig(**common, export_hf=False,
                                         data=DPOData(train=FIXTURE, eval=FIXTURE, eval_prompts=None),
                                         train=DPOTrainConfig(steps=1, global_batch_size=4, micro_batch_size=2,
                                                              eval_max_pairs=2)))
    rl = dict(common, export_hf=False, data=PromptDataConfig(max_prompt_tokens=96),
              rollout=RolloutConfig(prompts_per_step=2, samples_per_prompt=2,
                                    sampling=SamplingConfig(max_new_tokens=4, temperature=1.0)),
              eval=EvalConfig(before=False, after=False), train=PolicyTrainConfig(steps=1))
    update = dict(ppo_epochs=1, mini_batch_size=4, micro_batch_size=2)
    if name == "dvpo":
        from nemo_dvpo.recipes.dvpo import DVPORecipe, DVPORecipeConfig, DVPOUpdateConfig

        cfg = DVPORecipeConfig(**rl, gvm=str(work_dir / "gvm"), ppo=DVPOUpdateConfig(**update))
        return DVPORecipe(cfg, cfg.gvm)
    if name == "ppo":
        from nemo_dvpo.recipes.ppo import PPORecipe, PPORecipeConfig, PPOUpdateConfig

        return PPORecipe(PPORecipeConfig(**rl, reward_model=str(work_dir / "rm"), ppo=PPOUpdateConfig(**update)))
    from nemo_dvpo.recipes.grpo import GRPORecipe, GRPORecipeConfig

    return GRPORecipe(GRPORecipeConfig(**rl, reward_model=str(work_dir / "rm"), ppo=PolicyUpdateConfig(**update)))


def _trained_model(recipe) -> list:
    return recipe.parts.policy.model if hasattr(recipe, "parts") else \
        (recipe.model if hasattr(recipe, "objective") else recipe.policy)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_its_init_from_checkpoint_as_the_preset_says_and_logs_the_same_names(
        name, tiny_policy_and_gvm, tmp_path):
    import torch

    from nemo_dvpo.models.builder import unwrap_model

    recipe = _recipe(name, tiny_policy_and_gvm, tmp_path / name)
    # The checkpoint's shape, the preset's way of running it (DPO once dropped activation recompute here).
    assert (recipe.run.model_cfg.precision, recipe.run.model_cfg.activation_recompute) == ("bf16", "full")
    built = unwrap_model(_trained_model(recipe)[0])
    assert built.config.recompute_granularity == "full" and built.config.bf16
    assert {param.dtype for param in built.parameters()} == {torch.bfloat16}

    summary = recipe.train()
    recipe.cleanup()
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1]
    names = set(records[0]) - {"step"}
    assert {"time/step_s", "perf/peak_memory_mib"} <= names
    assert all(metric.startswith(PREFIXES) for metric in names), sorted(names)
    assert any(metric.startswith("train/") for metric in names)
    # The summary: the same lifecycle fields in every recipe, on disk as returned.
    assert summary["steps_this_run"] == 1 and summary["median_step_s"] > 0 and summary["peak_memory_mib"] > 0
    assert json.loads((tmp_path / name / "summary.json").read_text()) == json.loads(json.dumps(summary))
    final = json.loads((tmp_path / name / "final" / "nemo_dvpo_checkpoint.json").read_text())
    assert final["step"] == 1
    assert final["kind"] == {"gvm": "gvm", "reward_model": "reward_model"}.get(name, "policy")
