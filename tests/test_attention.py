"""The fast local attention modules against megatron-core's own implementations.

``SDPACoreAttention`` must equal ``DotProductAttention`` for every mask form megatron passes
(causal training forward, the inference engine's explicit masks, a one-token decode step) with
grouped-query attention; ``RotatedKeyCacheSelfAttention`` must leave generation token-for-token
unchanged, since it only moves where RoPE is applied to cached keys.
"""

from __future__ import annotations

import copy

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dvpo.inference.generation import SamplingConfig, generate
from nemo_dvpo.models import attention, builder
from nemo_dvpo.models.attention import RotatedKeyCacheSelfAttention, SDPACoreAttention
from nemo_dvpo.models.builder import build_gpt_model, unwrap_model
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.sources import load_tokenizer

HEADS, GROUPS, HEAD_DIM, BATCH = 4, 2, 8, 3


@pytest.fixture(scope="module")
def core_attention_pair(megatron_single_rank):
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, attention_dropout=0.0, masked_softmax_fusion=False,
                               use_cpu_initialization=True)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return DotProductAttention(**kwargs), SDPACoreAttention(**kwargs)


def _qkv(sq: int, sk: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(sq, BATCH, HEADS, HEAD_DIM, generator=generator)
    key = torch.randn(sk, BATCH, GROUPS, HEAD_DIM, generator=generator)
    value = torch.randn(sk, BATCH, GROUPS, HEAD_DIM, generator=generator)
    return query, key, value


def _causal_mask(sq: int, sk: int) -> torch.Tensor:
    """megatron's convention: True where attention is forbidden, query i sits at position sk - sq + i."""
    query_positions = torch.arange(sk - sq, sk).unsqueeze(1)
    return (torch.arange(sk).unsqueeze(0) > query_positions).view(1, 1, sq, sk)


@pytest.mark.parametrize("sq, sk, mask", [
    (7, 7, None),                      # training forward: causal, no explicit mask
    (7, 7, "causal"),                  # inference prefill: the engine's explicit lower-triangular mask
    (1, 9, None),                      # decode step: one query attends to the whole cache
    (1, 9, "causal"),                  # decode step with the engine's (all-allowed) mask row
    (3, 9, "causal"),                  # a chunk after cached positions
])
def test_sdpa_core_attention_equals_megatron_dot_product_attention(core_attention_pair, sq, sk, mask):
    reference_module, sdpa_module = core_attention_pair
    query, key, value = _qkv(sq, sk)
    attention_mask = _causal_mask(sq, sk) if mask == "causal" else None
    expected = reference_module(query, key, value, attention_mask)
    actual = sdpa_module(query, key, value, attention_mask)
    assert actual.shape == expected.shape == (sq, BATCH, HEADS * HEAD_DIM)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_sdpa_core_attention_gradients_equal_megatron(core_attention_pair):
    reference_module, sdpa_module = core_attention_pair
    grads = []
    for module in core_attention_pair:
        query, key, value = (t.requires_grad_() for t in _qkv(6, 6, seed=1))
        module(query, key, value, None).pow(2).sum().backward()
        grads.append((query.grad, key.grad, value.grad))
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_fast_spec_replaces_only_the_two_attention_modules(megatron_single_rank):
    layer = unwrap_model(build_gpt_model(load_model_config("tiny"))[0]).decoder.layers[0]
    assert type(layer.self_attention) is RotatedKeyCacheSelfAttention
    assert type(layer.self_attention.core_attention) is SDPACoreAttention


def test_generation_is_unchanged_by_the_fast_attention_modules(megatron_single_rank, monkeypatch):
    """Sampled tokens and their log-probs equal those of megatron's stock local spec (KV cache, GQA)."""
    model_cfg = load_model_config("tiny")
    tokenizer = load_tokenizer(model_cfg.tokenizer_source)
    fast_model = build_gpt_model(model_cfg)
    stock_spec = lambda config: copy.deepcopy(attention._bridge_local_spec(config))  # noqa: E731
    monkeypatch.setattr(builder, "local_layer_spec", stock_spec)
    stock_model = build_gpt_model(model_cfg)
    stock_model[0].load_state_dict(fast_model[0].state_dict())
    assert type(unwrap_model(stock_model[0]).decoder.layers[0].self_attention.core_attention) is DotProductAttention

    prompts = [[1, 520, 9531, 198], [1, 2, 4093, 198, 6004, 17, 4237, 346, 1834], [1, 9690, 198]]
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, seed=7, stop_on_eos=False)
    fast, stock = (generate(model, tokenizer, prompts, sampling) for model in (fast_model, stock_model))
    assert torch.equal(fast.tokens, stock.tokens)
    torch.testing.assert_close(fast.logprobs, stock.logprobs, rtol=1e-4, atol=1e-5)
