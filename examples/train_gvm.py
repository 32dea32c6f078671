"""Stage 1 of DVPO: train a Global Value Model (GVM) on preference data with a TD(lambda) loss.

    python examples/train_gvm.py                                     # SmolLM2 on the shipped preference set
    python examples/train_gvm.py run_dir=runs/gvm resume=true        # continue a killed run
    torchrun --nproc-per-node 8 examples/train_gvm.py model=llama3_8b model.source=/models/Meta-Llama-3-8B \
        data.train=/data/uf_value.jsonl data.eval=/data/uf_test.jsonl parallel.tensor_model_parallel_size=4

The recipe (the training loop, step by step) is nemo_dvpo/recipes/gvm.py; settings and defaults are its dataclasses
(nemo_dvpo/conf/gvm.yaml).
"""

import hydra
from omegaconf import DictConfig

from nemo_dvpo.recipes.gvm import GVMRecipe, GVMRecipeConfig, parse_config
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.distributed import destroy_distributed
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import CONF_DIR

# nemo_dvpo/conf/gvm.yaml composes these defaults (one source: the dataclasses) with its overrides.
register_defaults("gvm_defaults", GVMRecipeConfig)


@hydra.main(config_path=str(CONF_DIR), config_name="gvm", version_base=None)
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    config = parse_config(cfg)
    # Signals during loading already ask for a clean stop (Ctrl-C twice exits at once).
    with GracefulStop() as stop:
        recipe = GVMRecipe(config, stop=stop)
        recipe.train()
    recipe.cleanup()
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
