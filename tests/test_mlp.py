"""The SwiGLU that saves only its input (nemo_dvpo/models/mlp.py) against autograd's and megatron's own.

Its backward is hand-written, so it is checked three ways: against numerical derivatives (float64 gradcheck),
against the exact float64 derivative of the same float32 inputs within the rounding of its few operations, and
inside a whole model against megatron's stock MLP (same weights, gradients within the model's rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from nemo_dvpo.models import attention, builder
from nemo_dvpo.models.builder import build_gpt_model, unwrap_model
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.mlp import SwiGLU, lean_swiglu_applies, swiglu
from tests.tolerances import llama_terms, reduction_atol


def _reference(y: torch.Tensor) -> torch.Tensor:
    a, b = torch.chunk(y, 2, dim=-1)
    return F.silu(a) * b


def test_gradients_match_numerical_derivatives():
    y = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (y,))


def test_float32_gradients_are_the_exact_derivative_within_rounding():
    generator = torch.Generator().manual_seed(0)
    y = (4 * torch.randn(64, 2 * 96, generator=generator)).requires_grad_()
    grad_out = torch.randn(64, 96, generator=generator)
    out = swiglu(y)
    (grad,) = torch.autograd.grad(out, y, grad_out)

    exact_y = y.detach().double().requires_grad_()
    exact_out = _reference(exact_y)
    (exact_grad,) = torch.autograd.grad(exact_out, exact_y, grad_out.double())
    assert torch.equal(out, _reference(y))  # the forward is the stock one, operation for operation
    # d_a = g * b * s * (1 + a (1 - s)) and d_b = g * a * s: each a product of at most 6 rounded factors and
    # sums, so within 8 roundings of the size of the terms (not of the result, which may cancel to ~0).
    a, b = (half.detach().double() for half in torch.chunk(y, 2, dim=-1))
    g = grad_out.double()
    s = torch.sigmoid(a)
    terms = torch.cat([g.abs() * b.abs() * s * (1 + a.abs() * (1 - s)), g.abs() * a.abs() * s], dim=-1)
    error = (grad.double() - exact_grad).abs()
    assert (error <= 8 * torch.finfo(torch.float32).eps * terms).all(), (error / terms).max()


def _saved_bytes(fn, y: torch.Tensor) -> int:
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(y)
    return sum(storages.values())


def test_only_the_input_is_kept_for_backward():
    y = torch.randn(256, 2 * 1536, requires_grad=True)
    assert _saved_bytes(swiglu, y) == y.numel() * 4
    # Autograd's two steps keep the input and silu(a) (half the input's size).
    assert _saved_bytes(_reference, y) == y.numel() * 4 * 3 // 2


def test_only_a_plain_swiglu_is_replaced(megatron_single_rank):
    from megatron.core.transformer.transformer_config import TransformerConfig

    swiglu_config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, gated_linear_unit=True,
                                      activation_func=F.silu)
    assert lean_swiglu_applies(swiglu_config)
    for change in ({"gated_linear_unit": False}, {"activation_func": F.gelu},
                   {"activation_func_clamp_value": 7.0}, {"glu_linear_offset": 1.0}):
        assert not lean_swiglu_applies(_replaced(swiglu_config, change)), change


def _replaced(config, change):
    config = copy.copy(config)
    for name, value in change.items():
        setattr(config, name, value)
    return config


def test_the_mlp_runs_on_the_tensor_parallel_group_its_model_is_built_on(megatron_single_rank):
    # A GVM on process groups of its own (standalone_model_groups) hands each layer its groups; megatron's layer
    # passes the TP group only to MLP classes it knows, so the MLP stays megatron's own class.
    from nemo_dvpo.utils.distributed import standalone_model_groups

    groups = standalone_model_groups(1)
    layer = unwrap_model(build_gpt_model(load_model_config("tiny"), pg_collection=groups)[0]).decoder.layers[0]
    assert isinstance(layer.mlp.activation_func, SwiGLU)
    assert layer.mlp.tp_group is groups.tp and layer.mlp.linear_fc1.tp_group is groups.tp


def test_a_model_with_the_lean_mlp_has_the_stock_models_gradients(megatron_single_rank, monkeypatch):
    model_cfg = load_model_config("tiny")
    lean_model = build_gpt_model(model_cfg)
    layer = unwrap_model(lean_model[0]).decoder.layers[0]
    assert type(layer.mlp) is MLP and isinstance(layer.mlp.activation_func, SwiGLU)
    stock_spec = lambda config: attention.with_fast_attention(attention._bridge_local_spec(config))  # noqa: E731
    monkeypatch.setattr(builder, "local_layer_spec", stock_spec)
    stock_model = build_gpt_model(model_cfg)
    stock_mlp = unwrap_model(stock_model[0]).decoder.layers[0].mlp
    assert type(stock_mlp) is MLP and stock_mlp.activation_func is F.silu
    stock_model[0].load_state_dict(lean_model[0].state_dict())

    tokens = torch.randint(0, model_cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    results = []
    for model in (lean_model, stock_model):
        model[0].zero_grad()
        logits = model[0](tokens, positions, attention_mask=None)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        results.append((logits.detach(), {name: p.grad.clone() for name, p in model[0].named_parameters()
                                          if p.grad is not None}))
    (lean_logits, lean_grads), (stock_logits, stock_grads) = results
    assert torch.equal(lean_logits, stock_logits)  # same forward operations
    assert lean_grads.keys() == stock_grads.keys() and len(lean_grads) > 0
    terms = llama_terms(model_cfg, seq_len=24, tokens=2 * 23, through="gradients")
    for name, expected in stock_grads.items():
        torch.testing.assert_close(lean_grads[name], expected, rtol=0, atol=reduction_atol(expected, terms),
                                   msg=name)
