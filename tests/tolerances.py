"""Tolerances derived from float rounding, for tests that compare two evaluations of the same arithmetic.

Fused and unfused kernels, TP=2 and TP=1, a row batched and alone, HF and Megatron: each sums the
same terms in another order (8 AVX2 lanes or 16 AVX-512 lanes, MKL's blocking for the CPU at hand,
blocked or online softmax, partial sums joined by an all-reduce), so their results differ by rounding,
by an amount that depends on the CPU. A tolerance fitted on one machine (``atol=1e-6``
fitted on AVX2 failed on AVX-512/AMX) says nothing about the next one; one derived from the number of
terms and their magnitude holds on both, and stays far below the effect of a real error.
"""

from __future__ import annotations

import math

import torch

# Higham and Mary's lambda: with independent roundings, the probabilistic bound below holds with
# probability at least 1 - 2 * terms * exp(-lam**2 / 2): 1 - 3e-3 for 1e5 terms at lam = 6.
LAMBDA = 6.0


def reduction_atol(magnitude: torch.Tensor | float, terms: int, dtype: torch.dtype = torch.float32,
                   lam: float = LAMBDA) -> float:
    """``min(terms, lam * sqrt(terms)) * eps(dtype) * magnitude``: how far two orders of the same sums may differ.

    A float sum of ``n`` terms ``x_i``, in any order, is within ``gamma_n * sum|x_i|`` of the exact sum,
    ``gamma_n = n*eps / (1 - n*eps) ~ n*eps`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
    section 4.2); Higham and Mary (SIAM J. Sci. Comput. 41(5), 2019) show that with roundings of random
    sign the error stays below ``lam * sqrt(n) * eps * sum|x_i|`` with high probability (see LAMBDA).
    Both bounds hold, so the smaller one is used: the worst case for short chains (n <= lam**2 = 36),
    the probabilistic one for long ones (a whole model, a 49152-word softmax), where the worst case,
    1e-3..1e-2 relative, would no longer catch a real error. Along a chain of reductions (a dot product,
    a softmax normaliser, a weighted sum, ...) first-order errors add, so ``terms`` is the number of
    terms accumulated along the chain the two computations order differently; the caller counts them
    (:func:`llama_terms` for a whole model) and writes the count down.

    ``magnitude`` is the largest absolute value of the *compared reference tensor* (a tensor is reduced
    to its ``abs().max()``), standing for ``sum|x_i|``; not each element's own value: an element whose
    terms cancel to about zero ("relative inf") carries the rounding of terms of the tensor's
    scale, so a per-element relative tolerance is wrong for it and callers use ``rtol=0``. For the
    normalised, well-scaled computations compared in this suite the terms are of the order of the
    largest result; measured on AVX-512 and AVX2 kernels alike, the suite's comparisons stay 2.4 (the
    attention gradients, worst of 200 seeds) to a few hundred times inside this tolerance.
    """
    if isinstance(magnitude, torch.Tensor):
        magnitude = magnitude.detach().abs().max().item()
    if terms < 1 or not magnitude >= 0:
        raise ValueError(f"need terms >= 1 and magnitude >= 0, got {terms} and {magnitude}")
    return min(terms, lam * math.sqrt(terms)) * torch.finfo(dtype).eps * float(magnitude)


def llama_terms(model_cfg, seq_len: int, tokens: int = 1, through: str = "logits") -> int:
    """Terms accumulated along a Llama-style model (``nemo_dvpo.models.config.ModelConfig``), for
    :func:`reduction_atol`: an upper count of the chain two layouts or implementations may order
    differently (TP and PP split or regroup every one of these sums; HF and Megatron use other kernels).

    through="logits": per layer the RMSNorm (h), the QKV projection (h), q.k (head_dim), the softmax
    normaliser and p.v (seq_len each), the output projection (h), RMSNorm (h), the gated MLP's
    fc1 (h) and fc2 (ffn); then the final RMSNorm and the output layer (or a value head) (h each).
    "loss": plus the log-softmax normaliser over the vocabulary and the mean over ``tokens``.
    "gradients": plus the backward: the output layer's input gradient (a sum over the vocabulary),
    per layer fc2 (h), fc1 (2 * ffn), RMSNorm (h), output projection (h), the attention backward
    (head_dim for dP, seq_len for the softmax row sum and dQ, seq_len per query head of a group for
    dK and dV), QKV (h + 2 * kv dim), RMSNorm (h); and the weight gradients' sum over ``tokens``.
    """
    if through not in ("logits", "loss", "gradients"):
        raise ValueError(f"through must be 'logits', 'loss' or 'gradients', got {through!r}")
    h, ffn, vocab = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.vocab_size
    head_dim = h // model_cfg.num_attention_heads
    groups = model_cfg.num_query_groups or model_cfg.num_attention_heads
    group_size = model_cfg.num_attention_heads // groups
    layer = h + h + head_dim + 2 * seq_len + h + h + h + ffn
    terms = model_cfg.num_layers * layer + 2 * h
    if through in ("loss", "gradients"):
        terms += vocab + tokens
    if through == "gradients":
        layer_backward = (h + 2 * ffn + h + h + head_dim + 2 * seq_len + 2 * seq_len * group_size
                          + h + 2 * groups * head_dim + h)
        terms += vocab + model_cfg.num_layers * layer_backward + tokens
    return terms
