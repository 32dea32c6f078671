"""One optimizer step of a Megatron model over micro-batches, at any TP/PP/DP layout.

Megatron's pipeline schedule runs the forward and backward passes of all micro-batches (gradient
accumulation), DDP reduces gradients across data-parallel ranks, and the optimizer clips and
steps. Losses are per-micro-batch means; the schedule divides by the number of micro-batches.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from nemo_dvpo.utils.distributed import compute_device

# forward_step(micro_batch, model_chunk) -> (output_tensor, loss_func); see megatron-core's schedules.
ForwardStep = Callable


def configure_for_training(model: list[torch.nn.Module], optimizer) -> None:
    """Wire the model config to the optimizer and DDP, as Megatron's training loop does."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model[0].no_sync if len(model) == 1 else [chunk.no_sync for chunk in model]


def reduce_metrics(per_micro_batch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average metrics over micro-batches and data-parallel ranks; every rank gets the result.

    Metrics exist only on the last pipeline stage; they are averaged over the data-parallel group
    and then broadcast along the pipeline, so logging code never branches on the stage.
    """
    from megatron.core import parallel_state

    keys = sorted(per_micro_batch[0]) if per_micro_batch else []
    keys_holder = [keys]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(keys_holder, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
    keys = keys_holder[0]
    if not keys:
        return {}
    # The collective's device (NCCL needs CUDA tensors). Every metric is moved there one by one: a loss may log a
    # host value (a Python float, a CPU tensor such as an explained variance) beside its device tensors.
    device = compute_device()
    if per_micro_batch:
        values = torch.stack([torch.stack([torch.as_tensor(m[key]).to(device=device, dtype=torch.float32).reshape(())
                                           for key in keys]) for m in per_micro_batch]).mean(dim=0)
    else:
        values = torch.zeros(len(keys), device=device)
    if parallel_state.is_pipeline_last_stage():
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= parallel_state.get_data_parallel_world_size()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(values, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(keys, values.cpu().tolist()))


def _metrics_apart(output, loss_func):
    """The forward step's output with a loss function whose metrics do not share memory with the loss.

    megatron-core's schedule divides the returned loss by the number of micro-batches *in place*; a metric
    logged as ``loss.detach()`` is a view of the same storage and would be divided with it.
    """
    def loss_with_own_metrics(output_tensor):
        loss, metrics = loss_func(output_tensor)
        return loss, {name: value.clone() if torch.is_tensor(value) else value for name, value in metrics.items()}

    return output, loss_with_own_metrics


def train_step(model: list[torch.nn.Module], optimizer, scheduler, micro_batches: list,
               forward_step: ForwardStep, seq_length: int, micro_batch_size: int) -> dict[str, float]:
    """Forward + backward over ``micro_batches``, then one optimizer step. Returns reduced metrics.

    Micro-batches are padded to ``seq_length`` x ``micro_batch_size`` by the caller: the pipeline
    schedule communicates fixed-shape activations between stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in model:
        chunk.train()
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    per_micro_batch = get_forward_backward_func()(
        forward_step_func=lambda data_iterator, chunk: _metrics_apart(*forward_step(next(data_iterator), chunk)),
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    # Free per-parameter gradients (LocalGradients) before the next forward pass or rollout; with DDP's
    # buffer this only drops param.grad's alias of main_grad.
    optimizer.zero_grad(set_to_none=True)
    if update_successful:
        scheduler.step(increment=1)
    metrics = reduce_metrics(per_micro_batch)
    metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["update_skipped"] = float(not update_successful)
    return metrics

