"""PPO with a reward model and a trained critic, in the same framework as DVPO (for comparisons).

    python examples/train_reward_model.py                          # first: the reward model (runs/reward_model)
    python examples/train_ppo.py                                   # SmolLM2 on the shipped prompts
    python examples/train_ppo.py reward_model=runs/rm/final critic.init_from=runs/gvm/final critic.warmup_steps=2

The recipe is nemo_dvpo/recipes/ppo.py; settings and defaults are its dataclasses
(nemo_dvpo/conf/ppo.yaml overrides them for the embedded default).
"""

import hydra
from omegaconf import DictConfig

from nemo_dvpo.recipes.ppo import PPORecipe, PPORecipeConfig, parse_config
from nemo_dvpo.rlhf.report import format_summary
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.distributed import destroy_distributed, print_rank_zero
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import CONF_DIR

register_defaults("ppo_defaults", PPORecipeConfig)


@hydra.main(config_path=str(CONF_DIR), config_name="ppo", version_base=None)
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    config = parse_config(cfg)
    with GracefulStop() as stop:
        recipe = PPORecipe(config, stop=stop)
        summary = recipe.train()
    print_rank_zero(format_summary("PPO", summary))
    recipe.cleanup()
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
