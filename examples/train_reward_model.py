"""Train a Bradley-Terry reward model on pairwise preference data (for PPO and GRPO, or to label data).

    python examples/train_reward_model.py                                  # SmolLM2 on the shipped pairs
    python examples/train_reward_model.py data.train=/data/uf/value.jsonl data.eval=/data/uf/test.jsonl \
        run_dir=runs/rm-8b model=llama3_8b model.source=/models/sft-8b parallel.tensor_model_parallel_size=4

The same recipe, data readers and value-model architecture as the GVM (nemo_dvpo/recipes/gvm.py) with
train.objective=bradley_terry: the value head read at each response's last token is its reward, and the
loss is -log sigmoid(r_chosen - r_rejected). Checkpoints say kind "reward_model".
"""

import hydra
from omegaconf import DictConfig

from nemo_dvpo.recipes.gvm import GVMRecipe, GVMRecipeConfig, parse_config
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.distributed import destroy_distributed
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import CONF_DIR

# nemo_dvpo/conf/reward_model.yaml composes these defaults (the value-model recipe's dataclasses) with its overrides.
register_defaults("gvm_defaults", GVMRecipeConfig)


@hydra.main(config_path=str(CONF_DIR), config_name="reward_model", version_base=None)
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    config = parse_config(cfg)
    with GracefulStop() as stop:
        recipe = GVMRecipe(config, stop=stop)
        recipe.train()
    recipe.cleanup()
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
