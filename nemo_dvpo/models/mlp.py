"""A SwiGLU MLP for the local (non-Transformer-Engine) layer spec that saves only its input for backward.

megatron-core's MLP, unfused (the local spec on CPU: its fused SwiGLU is a ``torch.compile`` kernel), computes
``silu(a) * b`` from the first linear layer's output ``y = [a, b]`` in two autograd steps, which keep ``y`` *and*
``silu(a)`` until backward. The fused SwiGLU that megatron runs on GPUs (and Transformer Engine's) keeps only ``y``
and recomputes the rest. :class:`SwiGLU` does the same in plain torch, so the local spec holds one tensor of
``tokens x ffn/TP`` less per layer: 45 MiB for SmolLM2-135M's 30 layers at 2 x 128 tokens in fp32.

With ``s = sigmoid(a)``::

    forward:   out    = a * s * b
    backward:  d_a    = d_out * b * s * (1 + a * (1 - s))
               d_b    = d_out * a * s

megatron's MLP takes its activation from the layer spec (``MLPSubmodules.activation_func``) when
``use_te_activation_func`` is set - the seam Transformer Engine's activation op uses. :class:`LeanSwiGLUMLP` sets
it on a copy of its own config, so the flag never reaches modules that were not built with the activation.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(y, 2, dim=-1)
        ctx.save_for_backward(y)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        a, b = torch.chunk(y, 2, dim=-1)
        grad_y = torch.empty_like(y)
        grad_a, grad_b = torch.chunk(grad_y, 2, dim=-1)
        # ATen's silu_backward is d_x * s * (1 + x (1 - s)) in one kernel, and both halves are written in place
        # (no concatenation): about the time of autograd's own backward of the two steps (measured: 0.84-0.88
        # against 0.83 ms for 2 x 128 tokens x 1536, forward and backward; 1.28 ms written as the formulas).
        torch.ops.aten.silu_backward.grad_input(grad_out * b, a, grad_input=grad_a)
        torch.mul(grad_out, F.silu(a), out=grad_b)
        return grad_y


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` for ``y = [a, b]`` split in halves along the last dimension; saves only ``y``."""
    return _SwiGLUFunction.apply(y)


class SwiGLU(MegatronModule):
    """:func:`swiglu` as the module megatron's MLP builds from ``MLPSubmodules.activation_func`` (a
    MegatronModule: the MLP's checkpoint asks each submodule for its sharded state, here none)."""

    def __init__(self, config):
        super().__init__(config=config)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return swiglu(y)


def lean_swiglu_applies(config) -> bool:
    """Whether the MLP of ``config`` is a plain SwiGLU that megatron would run unfused (nothing for TE or
    megatron's fused kernel to do, no clamp or offset)."""
    return (config.gated_linear_unit and config.activation_func is F.silu and not config.bias_activation_fusion
            and not config.use_te_activation_func and config.activation_func_clamp_value is None
            and not config.glu_linear_offset)


class LeanSwiGLUMLP(MLP):
    """megatron-core's MLP with :class:`SwiGLU` as its activation where :func:`lean_swiglu_applies`; megatron's
    own MLP, unchanged, otherwise."""

    def __init__(self, config, submodules, *args, **kwargs):
        if lean_swiglu_applies(config) and submodules.activation_func is None:
            config = copy.copy(config)
            config.use_te_activation_func = True
            submodules = dataclasses.replace(submodules, activation_func=SwiGLU)
        super().__init__(config, submodules, *args, **kwargs)


def with_lean_swiglu(layer_spec):
    """A copy of ``layer_spec`` whose dense MLP is :class:`LeanSwiGLUMLP`."""
    layer_spec = copy.deepcopy(layer_spec)
    mlp_spec = layer_spec.submodules.mlp
    if getattr(mlp_spec, "module", None) is MLP:
        mlp_spec.module = LeanSwiGLUMLP
    return layer_spec
