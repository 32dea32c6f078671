"""Serve a frozen GVM over HTTP (Open Inference Protocol / KServe v2) for DVPO actors: ``gvm=http://host:port``.

    python examples/serve_gvm.py gvm=runs/gvm/final server.port=8000
    torchrun --nproc-per-node 2 examples/serve_gvm.py gvm=runs/gvm/final parallel.tensor_model_parallel_size=2
    NEMO_DVPO_GVM_TOKEN=secret python examples/serve_gvm.py gvm=... server.host=0.0.0.0   # beyond loopback

The server is nemo_dvpo/serving/gvm_server.py (endpoints, batching, shutdown); settings and defaults are
its dataclasses (nemo_dvpo/conf/serve_gvm.yaml). SIGTERM or Ctrl-C answers the requests in flight, then every
rank exits.
"""

import hydra
from omegaconf import DictConfig

from nemo_dvpo.serving.gvm_server import ServeGVMConfig, serve
from nemo_dvpo.serving.http import serve_main
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import CONF_DIR

register_defaults("serve_gvm_defaults", ServeGVMConfig)


@hydra.main(config_path=str(CONF_DIR), config_name="serve_gvm", version_base=None)
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    serve_main(cfg, ServeGVMConfig, "serve_gvm", serve)


if __name__ == "__main__":
    run_and_exit(main)
