"""DPO on the pairwise preference data of stage 1 (offline: no rollouts, no reward model).

    python examples/train_dpo.py                                   # SmolLM2 on the shipped pairs
    python examples/train_dpo.py data.train=/data/uf/value.jsonl train.beta=0.1 train.steps=500

The recipe is nemo_dvpo/recipes/dpo.py; settings and defaults are its dataclasses
(nemo_dvpo/conf/dpo.yaml overrides them for the embedded default).
"""

import hydra
from omegaconf import DictConfig

from nemo_dvpo.recipes.dpo import DPORecipe, DPORecipeConfig, parse_config
from nemo_dvpo.rlhf.report import format_summary
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.distributed import destroy_distributed, print_rank_zero
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import CONF_DIR

register_defaults("dpo_defaults", DPORecipeConfig)


@hydra.main(config_path=str(CONF_DIR), config_name="dpo", version_base=None)
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    config = parse_config(cfg)
    with GracefulStop() as stop:
        recipe = DPORecipe(config, stop=stop)
        summary = recipe.train()
    print_rank_zero(format_summary("DPO", summary))
    recipe.cleanup()
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
