"""Training-checkpoint exactness: losses after a save/load equal those of an uninterrupted run.

    torchrun --nproc-per-node N train_resume.py --run-dir DIR [--distributed-optimizer]
"""

import argparse

import common
import torch

from nemo_dvpo.algorithms.gvm import gvm_loss, lambda_returns, terminal_rewards
from nemo_dvpo.checkpointing.train_checkpoint import (
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.forward import position_ids_for
from nemo_dvpo.models.value_model import build_value_model
from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for
from nemo_dvpo.training.step import configure_for_training, train_step
from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed
from nemo_dvpo.utils.errors import run_and_exit


def batch_for(step: int, rank: int):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    tokens = torch.randint(0, 49152, (2, 10), generator=generator)
    response_mask = torch.zeros_like(tokens, dtype=torch.bool)
    response_mask[:, 4:] = True
    labels = torch.tensor([1.0, -1.0])
    return tokens, response_mask, labels


def forward_step(batch, chunk):
    tokens, response_mask, labels = batch
    output = chunk(tokens, position_ids_for(tokens), attention_mask=None)

    def loss_func(values):
        values = values.squeeze(-1).float()
        returns = lambda_returns(values, terminal_rewards(labels, response_mask), response_mask)
        loss = gvm_loss(values, returns, response_mask)
        return loss, {"loss": loss.detach()}

    return output, loss_func


def build(optim):
    model_cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = build_value_model(model_cfg, wrap_with_ddp=True, ddp_config=ddp_config_for(optim))
    optimizer, scheduler = build_optimizer(model, optim, total_steps=6)
    configure_for_training(model, optimizer)
    return model_cfg, model, optimizer, scheduler


def run_steps(model, optimizer, scheduler, steps, rank):
    losses = []
    for step in steps:
        metrics = train_step(model, optimizer, scheduler, [batch_for(step, rank)], forward_step,
                             seq_length=10, micro_batch_size=2)
        losses.append(metrics["loss"])
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--distributed-optimizer", action="store_true")
    args = parser.parse_args()
    launch = initialize_distributed(ParallelConfig())
    from megatron.core import parallel_state

    rank = parallel_state.get_data_parallel_rank()
    optim = OptimConfig(lr=1e-3, warmup_steps=2, use_distributed_optimizer=args.distributed_optimizer)

    model_cfg, model, optimizer, scheduler = build(optim)
    first = run_steps(model, optimizer, scheduler, range(0, 3), rank)
    save_training_checkpoint(args.run_dir, 3, model, optimizer, scheduler, model_cfg, model_cfg.to_hf_config(),
                             None, kind="gvm", trainer_state={"note": "test"})
    uninterrupted = run_steps(model, optimizer, scheduler, range(3, 6), rank)

    # A fresh process state: new model (different random init), new optimizer, then load.
    torch.manual_seed(99)
    _, model, optimizer, scheduler = build(optim)
    state = load_training_checkpoint(latest_checkpoint(args.run_dir), model, optimizer, scheduler)
    resumed = run_steps(model, optimizer, scheduler, range(state["step"], 6), rank)
    common.write_result({"first": first, "uninterrupted": uninterrupted, "resumed": resumed,
                         "step": state["step"], "note": state["note"], "world_size": launch.world_size})


# Guarded: dist_checkpointing's writer starts a spawned process that re-imports this module.
if __name__ == "__main__":
    run_and_exit(main)
