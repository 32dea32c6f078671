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

megatron's MLP takes its activation from the layer spec (``MLPSubmodules.activation_func``) when the config's
``use_te_activation_func`` is set - the seam Transformer Engine's activation op uses. The MLP itself stays
megatron's own class, so a transformer layer still hands it its tensor-parallel group (a layer passes that only to
the MLP classes it knows). :func:`nemo_dvpo.models.builder.make_provider` sets the flag for the local spec where
:func:`lean_swiglu_applies`, and :func:`with_lean_swiglu` puts :class:`SwiGLU` into the spec wherever the flag is
set; a spec without it fails loudly (megatron would apply ``silu`` to both halves, and the second linear layer
refuses the doubled width).
"""

from __future__ import annotations

import copy

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

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return swiglu(y)


def _plain_swiglu(config) -> bool:
    return (config.gated_linear_unit and config.activation_func is F.silu
            and config.activation_func_clamp_value is None and not config.glu_linear_offset)


def lean_swiglu_applies(config) -> bool:
    """Whether the MLP of ``config`` is a plain SwiGLU (no clamp or offset) that megatron would run unfused:
    nothing for megatron's fused kernel or another spec-chosen activation to do."""
    return _plain_swiglu(config) and not config.bias_activation_fusion and not config.use_te_activation_func


def with_lean_swiglu(layer_spec, config):
    """``layer_spec``, or a copy whose dense MLP takes :class:`SwiGLU` as its activation when ``config`` asks for a
    spec-chosen one (``use_te_activation_func``) and its MLP is a plain SwiGLU."""
    mlp_spec = layer_spec.submodules.mlp
    if not (config.use_te_activation_func and _plain_swiglu(config) and getattr(mlp_spec, "module", None) is MLP
            and mlp_spec.submodules.activation_func is None):
        return layer_spec
    layer_spec = copy.deepcopy(layer_spec)
    layer_spec.submodules.mlp.submodules.activation_func = SwiGLU
    return layer_spec
