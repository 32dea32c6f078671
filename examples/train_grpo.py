"""GRPO: group-relative advantages from a reward model's scores of several responses per prompt, no critic.

    python examples/train_reward_model.py                          # first: the reward model (runs/reward_model)
    python examples/train_grpo.py rollout.samples_per_prompt=4

The recipe is nemo_dvpo/recipes/grpo.py; settings and defaults are its dataclasses
(nemo_dvpo/conf/grpo.yaml overrides them for the embedded default).
"""

import hydra
from omegaconf import DictConfig

from nemo_dvpo.recipes.grpo import GRPORecipe, GRPORecipeConfig, parse_config
from nemo_dvpo.rlhf.report import format_summary
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.distributed import destroy_distributed, print_rank_zero
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import CONF_DIR

register_defaults("grpo_defaults", GRPORecipeConfig)


@hydra.main(config_path=str(CONF_DIR), config_name="grpo", version_base=None)
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    config = parse_config(cfg)
    with GracefulStop() as stop:
        recipe = GRPORecipe(config, stop=stop)
        summary = recipe.train()
    print_rank_zero(format_summary("GRPO", summary))
    recipe.cleanup()
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
