"""The GVM's value head: zero-initialised fp32, TP=2 equals TP=1, values equal the HF trunk + head."""

from __future__ import annotations

import pytest
import torch

from nemo_dvpo.models.config import load_model_config
from tests.conftest import run_torchrun
from tests.tolerances import llama_terms, reduction_atol

pytestmark = pytest.mark.slow  # torchrun at TP=1 and TP=2 on SmolLM2 (see pyproject.toml)


def test_value_head_at_tp2_equals_tp1_and_the_hf_reference(tmp_path, smollm2_hf_folder):
    run_torchrun("value_head_tp.py", 1, "--tp", "1", "--out", str(tmp_path / "tp1.pt"), tmp_path=tmp_path)
    run_torchrun("value_head_tp.py", 2, "--tp", "2", "--out", str(tmp_path / "tp2.pt"), tmp_path=tmp_path)
    tp1, tp2 = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")

    assert tp1["values"].shape == (3, 12)
    assert tp1["values"].std() > 1e-3, "values should vary across tokens"
    torch.testing.assert_close(tp1["values"], tp1["reference_values"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tp2["values"], tp1["values"], atol=1e-5, rtol=1e-4)
    # value_head_tp.py: the tiny GVM on 3 x 12 tokens, 12 of them response tokens. The values' chain is
    # llama_terms "logits" at seq 12 (2272, the head summing over the hidden size like an output layer);
    # the GVM loss adds the lambda-returns and the mean over 12 response tokens, the head's gradient the
    # sum over 36 tokens: 2272 + 24 + 36 = 2332 terms, 6 sqrt(n) = 290 eps * magnitude. Loss ~0.563: atol
    # ~1.9e-5, observed 2.4e-7 (AVX-512), 6e-8 (AVX2 kernels); was 1e-6, 24% used. Head gradient,
    # max ~1.93: atol ~6.7e-5 with rtol=0, observed 7.2e-7 (3.1 eps * max); was atol=1e-6, rtol=1e-4, 17%
    # used on its elements near zero.
    terms = llama_terms(load_model_config("tiny"), seq_len=12) + 24 + 36
    assert abs(tp2["loss"] - tp1["loss"]) < reduction_atol(tp1["loss"], terms)
    assert tp1["head_gradient"].abs().max() > 0
    torch.testing.assert_close(tp2["head_gradient"], tp1["head_gradient"], rtol=0,
                               atol=reduction_atol(tp1["head_gradient"], terms))
    assert abs(tp2["embedding_gradient_norm"] - tp1["embedding_gradient_norm"]) < 1e-5 * tp1["embedding_gradient_norm"]


def test_the_value_head_is_made_on_the_trunks_device(megatron_single_rank):
    """A model built on the GPU is not moved again unless DDP wraps it, and a frozen GVM is not wrapped: a head
    created on the CPU beside a CUDA trunk failed DVPO's first scoring pass on the first device (2026-12-04).
    The meta device stands in for CUDA here."""
    from nemo_dvpo.models.builder import build_gpt_model, unwrap_model
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.value_model import attach_value_head, value_head

    model = build_gpt_model(load_model_config("tiny"), seq_length=32)
    model[0].to("meta")
    head = value_head(attach_value_head(model))
    assert head.weight.device.type == "meta" and head.bias.device.type == "meta"
    assert unwrap_model(model[0]).output_layer is head
