"""Gradients in ``param.grad`` for a model trained on one rank, behind Megatron DDP's interface.

Megatron's ``DistributedDataParallel`` keeps every gradient in one contiguous buffer (``main_grad``), allocated
when the model is wrapped and resident from then on: through each forward pass of an update, where the
activations peak, and through every rollout. Its point is to reduce gradients across ranks in buckets. When
the model lives on a single rank (tensor, pipeline, context and data parallel sizes all 1) there is nothing
to reduce, and the buffer only adds its size (a full copy of the trained parameters in fp32) to the peak.

:class:`LocalGradients` is megatron-core's DDP template (``_BaseDataParallel``, the base of its DDP and FSDP
wrappers) for that case: autograd writes each parameter's gradient to ``param.grad`` as backward reaches it, so
gradients grow while activations are freed, and the optimizer's ``zero_grad`` frees them after each step (as
Hugging Face / TRL trainers do). Megatron's optimizer and ``finalize_model_grads`` read the same interface
(``ddp_config``, ``finish_grad_sync``, ``scale_gradients``), and ``FP32Optimizer`` steps on ``param.grad`` when a
parameter has no ``main_grad``. The update is the same arithmetic: one micro-batch's gradient is stored as
computed, later ones are summed in fp32 by autograd instead of by DDP's hooks (tests/test_local_gradients.py).
"""

from __future__ import annotations

import torch
from megatron.core.distributed.data_parallel_base import _BaseDataParallel


class LocalGradients(_BaseDataParallel):
    """A one-rank model whose gradients live in ``param.grad`` (see the module docstring)."""

    def __init__(self, config, ddp_config, module: torch.nn.Module):
        super().__init__(config=config, module=module)
        # Read by megatron-core's optimizer factory and finalize_model_grads (no FSDP, no bucketing).
        self.ddp_config = ddp_config

    def _trained_parameters(self):
        return (param for param in self.module.parameters() if param.requires_grad)

    def zero_grad_buffer(self) -> None:
        """Free the gradients (there is no buffer to zero)."""
        for param in self._trained_parameters():
            param.grad = None

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        """One rank: no other replica's gradients to wait for or reduce with."""

    def scale_gradients(self, scaling_factor: float) -> None:
        """Scale every gradient by ``scaling_factor`` (finalize_model_grads' per-token loss normalisation)."""
        for param in self._trained_parameters():
            if param.grad is not None:
                param.grad.mul_(scaling_factor)


def trains_on_one_rank() -> bool:
    """True when the tensor, pipeline, context and data parallel groups (the global parallel state, which
    trained models use) are all of size 1."""
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1
            and parallel_state.get_data_parallel_world_size(with_context_parallel=True) == 1)
