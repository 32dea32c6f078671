"""Attention modules for the local (non-Transformer-Engine) layer spec, used on CPU.

megatron-core 0.16's local ``DotProductAttention`` and its static-batch KV cache are written for
correctness, not speed, and dominate CPU decoding (py-spy: about 55% of each decode step):

* grouped-query attention materialises ``repeat_interleave`` copies of the *whole* key and value
  cache on every step and layer;
* with static batching the cache stores keys *before* RoPE, so every decode step re-rotates the
  whole key cache.

The two modules here keep megatron's interfaces and numerics and remove that waste:
:class:`SDPACoreAttention` computes the same softmax attention with
``torch.nn.functional.scaled_dot_product_attention`` (fused, GQA without copies), and
:class:`RotatedKeyCacheSelfAttention` rotates each key once, before it enters the static cache.
:func:`local_layer_spec` is megatron-bridge's local spec with these two swapped in, and with the MLP of
:mod:`nemo_dvpo.models.mlp`. The TE spec (GPU) is left untouched: TE brings its own fused attention.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_dvpo.models.mlp import with_lean_swiglu
from nemo_dvpo.utils import cpu_compat


class SDPACoreAttention(DotProductAttention):
    """``DotProductAttention`` computed by PyTorch's fused scaled-dot-product attention.

    softmax(q k^T * scale + mask) v with the same scale, mask convention (megatron's boolean mask is
    True where attention is *forbidden*) and causal alignment as megatron's: a causal mask with
    ``sq == sk`` is the usual lower triangle; ``sq == 1`` (a decode step) attends to every cached
    position. Configurations this does not cover (sliding windows, non-vanilla softmax, fp16/bf16
    with query-key layer scaling, attention dropout) fall back to megatron's implementation.
    """

    def _sdpa_supported(self) -> bool:
        return (
            self.softmax_offset is None
            and self.scale_mask_softmax.window_size is None
            and self.scale_mask_softmax.scale is None
            and (self.attention_dropout.p == 0.0 or not self.training)
        )

    def forward(self, query, key, value, attention_mask, attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None or not self._sdpa_supported():
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, batch, sk = query.size(0), query.size(1), key.size(0)
        # [s, b, heads, dim] -> [b, heads, s, dim]
        query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed_mask, is_causal = None, False
        if attention_mask is not None:
            allowed_mask = ~attention_mask
        elif (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise ValueError(f"a causal mask needs sq == sk without an explicit mask, got {sq} and {sk}")
            is_causal = True
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed_mask, is_causal=is_causal, scale=self.softmax_scale,
            enable_gqa=query.size(1) != key.size(1),
        )
        # [b, heads, sq, dim] -> [sq, b, heads * dim]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)


class RotatedKeyCacheSelfAttention(SelfAttention):
    """``SelfAttention`` whose static-batch KV cache holds keys already rotated by RoPE.

    megatron caches raw keys and rotates ``key_cache[:end]`` with ``k_pos_emb[:end]`` on every step;
    rotating the new keys with ``k_pos_emb[start:end]`` before caching gives the same keys (RoPE acts
    position-wise) at a cost independent of the cache length.
    """

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *args, **kwargs):
        rotates_cache = (
            inference_context is not None
            and inference_context.is_static_batching()
            and isinstance(rotary_pos_emb, tuple)
            and rotary_pos_emb[1] is not None
            and rotary_pos_cos is None
            and not self.config.flash_decode
        )
        if rotates_cache:
            start = inference_context.sequence_len_offset
            key = apply_rotary_pos_emb(
                key, rotary_pos_emb[1][start:start + key.size(0)], config=self.config,
                mscale=_yarn_get_concentration_factor_from_config(self.config), cp_group=self.pg_collection.cp,
            )
        query, key, value, rotary_pos_emb, attn_mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
            rotary_pos_cos_sin, sequence_len_offset, *args, **kwargs,
        )
        if rotates_cache:
            rotary_pos_emb = (rotary_pos_emb[0], None)
        return query, key, value, rotary_pos_emb, attn_mask_type, block_table


def with_fast_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of ``layer_spec`` with megatron's local self-attention and core attention replaced."""
    layer_spec = copy.deepcopy(layer_spec)
    attention_spec = layer_spec.submodules.self_attention
    if attention_spec.module is SelfAttention:
        attention_spec.module = RotatedKeyCacheSelfAttention
    if attention_spec.submodules.core_attention is DotProductAttention:
        attention_spec.submodules.core_attention = SDPACoreAttention
    return layer_spec


def _bridge_local_spec(config) -> ModuleSpec:
    cpu_compat.import_megatron_bridge()
    from megatron.bridge.models.gpt_provider import local_layer_spec as bridge_local_layer_spec

    return bridge_local_layer_spec(config)


def local_layer_spec(config) -> ModuleSpec:
    """megatron-bridge's local (non-TE) GPT layer spec with the attention modules above and the SwiGLU MLP that
    saves only its input (:mod:`nemo_dvpo.models.mlp`)."""
    return with_lean_swiglu(with_fast_attention(_bridge_local_spec(config)), config)
