"""LocalGradients (gradients in param.grad on one rank) against Megatron DDP's contiguous gradient buffer."""

import pytest
import torch

from nemo_dvpo.models.config import load_model_config


def _next_token_step(micro_batch, chunk):
    """Megatron forward step: the mean next-token cross-entropy of ``micro_batch`` (batch x sequence tokens)."""
    from nemo_dvpo.models.forward import position_ids_for

    inputs, labels = micro_batch[:, :-1], micro_batch[:, 1:]
    per_token = chunk(inputs, position_ids_for(inputs), attention_mask=None, labels=labels)

    def loss(output):
        value = output.float().mean()
        return value, {"loss": value.detach()}

    return per_token, loss


def _train(local_gradients: bool, micro_batches_per_step: list[list[torch.Tensor]]):
    """A tiny model from a fixed seed, trained one optimizer step per entry: (model, optimizer, metrics)."""
    from nemo_dvpo.models.builder import build_gpt_model, wrap_for_training
    from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for
    from nemo_dvpo.training.step import configure_for_training, train_step

    torch.manual_seed(0)
    optim = OptimConfig(lr=1e-2, clip_grad=0.5, weight_decay=0.1)  # clipping active: grad norms are ~1-10
    model = wrap_for_training(build_gpt_model(load_model_config("tiny")), ddp_config_for(optim),
                              local_gradients_on_one_rank=local_gradients)
    optimizer, scheduler = build_optimizer(model, optim, total_steps=len(micro_batches_per_step))
    configure_for_training(model, optimizer)
    sequence = micro_batches_per_step[0][0]
    metrics = [train_step(model, optimizer, scheduler, micro_batches, _next_token_step,
                          seq_length=sequence.shape[1] - 1, micro_batch_size=sequence.shape[0])
               for micro_batches in micro_batches_per_step]
    return model, optimizer, metrics


def test_local_gradients_train_exactly_as_megatron_ddp(megatron_single_rank):
    """Three optimizer steps of 1, 2 and 3 micro-batches, Adam with weight decay and active clipping: the same
    losses, gradient norms and weights, bit for bit. One micro-batch's gradient is stored as computed either
    way (DDP adds it to a zeroed fp32 buffer: 0 + g = g), and later micro-batches are summed in fp32 in the
    same order, so no rounding differs."""
    from megatron.core.distributed import DistributedDataParallel

    from nemo_dvpo.models.local_gradients import LocalGradients

    generator = torch.Generator().manual_seed(3)
    steps = [[torch.randint(0, 1000, (2, 17), generator=generator) for _ in range(count)] for count in (1, 2, 3)]
    local_model, local_optimizer, local_metrics = _train(True, steps)
    ddp_model, _, ddp_metrics = _train(False, steps)
    assert isinstance(local_model[0], LocalGradients) and isinstance(ddp_model[0], DistributedDataParallel)
    assert all(metrics["grad_norm"] > 0.5 for metrics in ddp_metrics)  # clipped: the norm is above clip_grad
    assert local_metrics == ddp_metrics
    local_weights, ddp_weights = local_model[0].module.state_dict(), ddp_model[0].module.state_dict()
    assert sorted(local_weights) == sorted(ddp_weights)
    for name, weight in ddp_weights.items():
        if torch.is_tensor(weight):
            assert torch.equal(local_weights[name], weight), name
    # No gradient is held between optimizer steps, and no parameter carries a DDP buffer view.
    trained = [param for param in local_model[0].parameters() if param.requires_grad]
    assert trained and all(param.grad is None and not hasattr(param, "main_grad") for param in trained)
    assert all(torch.is_tensor(state["exp_avg"]) for state in local_optimizer.optimizer.state.values())


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_only_fp32_models_on_one_rank_leave_megatron_ddp(megatron_single_rank, precision):
    """bf16 parameters keep DDP's fp32 gradient buffer: param.grad would sum micro-batches in bf16."""
    from megatron.core.distributed import DistributedDataParallel

    from nemo_dvpo.models.builder import build_gpt_model
    from nemo_dvpo.models.local_gradients import LocalGradients

    model_cfg = load_model_config("tiny")
    model_cfg.precision = precision
    model = build_gpt_model(model_cfg, wrap_with_ddp=True)
    assert isinstance(model[0], LocalGradients if precision == "fp32" else DistributedDataParallel)
