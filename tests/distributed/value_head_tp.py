"""GVM values and gradients at a TP layout, with the HF trunk + head as an independent reference.

    torchrun --nproc-per-node N value_head_tp.py --tp T --out result.pt
"""

import argparse

import common
import torch
import torch.distributed as dist

from nemo_dvpo.algorithms.gvm import gvm_loss, lambda_returns, terminal_rewards
from nemo_dvpo.models.builder import unwrap_model
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.forward import position_ids_for
from nemo_dvpo.models.value_model import attach_value_head, token_values, value_head
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import run_and_exit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    model_cfg = load_model_config("tiny")
    hf_model = common.random_hf_model(model_cfg)
    model = attach_value_head(common.megatron_from_hf(model_cfg, hf_model, ParallelConfig(args.tp, 1)))
    head = value_head(model)
    assert head.weight.dtype == torch.float32 and not head.weight.any(), "head must start at zero in fp32"
    # A non-zero head, identical on every rank, so that values are informative.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.1)
        head.bias.fill_(0.05)

    tokens = torch.randint(0, model_cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(4))
    response_mask = torch.zeros_like(tokens, dtype=torch.bool)
    response_mask[0, 4:12] = True
    response_mask[1, 6:9] = True
    response_mask[2, 2:3] = True
    labels = torch.tensor([1.0, -1.0, 0.5])

    values = token_values(model, tokens)

    # Gradients of the GVM loss through the whole model.
    module = model[0]
    module.train()
    live_values = module(tokens, position_ids_for(tokens), attention_mask=None).squeeze(-1)
    returns = lambda_returns(live_values, terminal_rewards(labels, response_mask), response_mask)
    loss = gvm_loss(live_values, returns, response_mask)
    loss.backward()
    head_gradient = torch.cat([head.weight.grad.flatten(), head.bias.grad.flatten()])
    gpt = unwrap_model(module)
    embedding_gradient_norm = gpt.embedding.word_embeddings.weight.grad.float().norm() ** 2
    dist.all_reduce(embedding_gradient_norm)  # vocab-parallel: sum the shards' squared norms

    # Reference: HF trunk's final hidden states through the same head.
    with torch.no_grad():
        hidden = hf_model.model(tokens).last_hidden_state
        reference_values = (hidden.float() @ head.weight.T + head.bias).squeeze(-1)
    if dist.get_rank() == 0:
        torch.save({"values": values, "reference_values": reference_values, "loss": loss.item(),
                    "head_gradient": head_gradient, "embedding_gradient_norm": embedding_gradient_norm.sqrt().item()},
                   args.out)
    common.write_result({"loss": loss.item()})


# Guarded: a spawned helper process may re-import this module.
if __name__ == "__main__":
    run_and_exit(main)
