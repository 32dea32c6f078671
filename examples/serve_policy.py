"""Serve a policy with an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions).

    python examples/serve_policy.py policy=smollm2_135m server.port=8001
    python examples/serve_policy.py policy=runs/dvpo/final served_model_name=dvpo
    torchrun --nproc-per-node 2 examples/serve_policy.py policy=CHECKPOINT parallel.tensor_model_parallel_size=2
    NEMO_DVPO_POLICY_TOKEN=secret python examples/serve_policy.py policy=... server.host=0.0.0.0   # beyond loopback

The server is nemo_dvpo/serving/openai_server.py (endpoints, batching, shutdown); settings and defaults are
its dataclasses (nemo_dvpo/conf/serve_policy.yaml). The ``openai`` client and tools/eval_benchmarks.py
(``--answers-from``, ``--judge-base-url``) talk to it. SIGTERM or Ctrl-C answers the requests in flight,
then every rank exits.
"""

import hydra
from omegaconf import DictConfig

from nemo_dvpo.serving.http import serve_main
from nemo_dvpo.serving.openai_server import ServePolicyConfig, serve
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import CONF_DIR

register_defaults("serve_policy_defaults", ServePolicyConfig)


@hydra.main(config_path=str(CONF_DIR), config_name="serve_policy", version_base=None)
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    serve_main(cfg, ServePolicyConfig, "serve_policy", serve)


if __name__ == "__main__":
    run_and_exit(main)
