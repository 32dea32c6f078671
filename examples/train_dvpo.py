"""DVPO, the whole method: stage 1 (a GVM, unless one is given) then stage 2 (PPO against the frozen GVM).

    python examples/train_dvpo.py                                   # SmolLM2 on the shipped prompts, ~15 min CPU
    python examples/train_dvpo.py gvm=runs/gvm/final train.steps=200
    python examples/train_dvpo.py run_dir=runs/dvpo resume=true     # continue a killed run
    torchrun --nproc-per-node 8 examples/train_dvpo.py model=llama3_8b model.source=/models/llama3-8b-sft \
        gvm=/runs/gvm-8b/final parallel.tensor_model_parallel_size=4 rollout.sampling.max_new_tokens=1024

The recipe (the loop, step by step) is nemo_dvpo/recipes/dvpo.py; settings and defaults are its dataclasses;
nemo_dvpo/conf/dvpo.yaml overrides them for the embedded default.
"""

import hydra
from omegaconf import DictConfig

from nemo_dvpo.recipes.dvpo import DVPORecipe, DVPORecipeConfig, parse_config, train_gvm_first
from nemo_dvpo.rlhf.report import format_summary
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.distributed import destroy_distributed, print_rank_zero
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import CONF_DIR

# nemo_dvpo/conf/dvpo.yaml composes these defaults (one source: the dataclasses) with its overrides.
register_defaults("dvpo_defaults", DVPORecipeConfig)


@hydra.main(config_path=str(CONF_DIR), config_name="dvpo", version_base=None)
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    config = parse_config(cfg)
    # Signals during loading already ask for a clean stop (Ctrl-C twice exits at once).
    with GracefulStop() as stop:
        gvm_path = config.gvm or train_gvm_first(cfg, config, stop=stop)
        recipe = DVPORecipe(config, gvm_path, stop=stop)
        summary = recipe.train()
    print_rank_zero(format_summary("DVPO", summary))
    recipe.cleanup()
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
