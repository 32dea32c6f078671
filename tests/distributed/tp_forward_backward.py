"""One forward and backward of the tiny model at a given TP; loss and full gradients in HF naming.

    torchrun --nproc-per-node N tp_forward_backward.py --tp T --out grads.pt
"""

import argparse

import common
import torch
import torch.distributed as dist

from nemo_dvpo.models.builder import make_bridge
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.forward import position_ids_for
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import run_and_exit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model_cfg = load_model_config("tiny")
    hf_model = common.random_hf_model(model_cfg)
    model = common.megatron_from_hf(model_cfg, hf_model, ParallelConfig(args.tp, 1))
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 16), generator=generator)
    labels = torch.roll(tokens, -1, dims=1)

    module = model[0]
    module.train()
    per_token_loss = module(tokens, position_ids_for(tokens), attention_mask=None, labels=labels)
    loss = per_token_loss.float().mean()
    loss.backward()

    # Reuse the bridge's weight export to gather gradients: point each parameter at its gradient.
    for parameter in module.parameters():
        parameter.data = parameter.grad.detach().clone()
    gradients = {name: tensor.clone() for name, tensor in
                 make_bridge(hf_model.config, for_export=True).export_hf_weights(model, cpu=True, show_progress=False)}

    # The independent reference: the same loss and backward pass through the HF model.
    hf_logits = hf_model.train()(tokens).logits
    hf_loss = torch.nn.functional.cross_entropy(hf_logits.reshape(-1, hf_logits.shape[-1]).float(), labels.reshape(-1))
    hf_loss.backward()
    hf_gradients = {name: parameter.grad.detach().clone() for name, parameter in hf_model.named_parameters()}

    if dist.get_rank() == 0:
        torch.save({"loss": loss.item(), "gradients": gradients,
                    "hf_loss": hf_loss.item(), "hf_gradients": hf_gradients}, args.out)
    common.write_result({"loss": loss.item(), "num_gradients": len(gradients)})


# Guarded: dist_checkpointing's writer starts a spawned process that re-imports this module.
if __name__ == "__main__":
    run_and_exit(main)
