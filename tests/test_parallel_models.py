"""Megatron models against independent references: Hugging Face logits and gradients, TP=1 vs TP>1."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_torchrun


@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_logits_match_hf(tp, tmp_path, smollm2_hf_folder):
    result = run_torchrun("logits_vs_hf.py", tp, "--model", "smollm2_135m", "--tp", str(tp), tmp_path=tmp_path)
    assert result["shape"][-1] == 49152
    assert result["max_abs_diff"] <= 1e-4, result
    assert result["argmax_equal"]


@pytest.mark.parametrize("layout", [("--tp", "2"), ("--pp", "2")], ids=["tp2", "pp2"])
def test_tiny_gqa_llama_matches_hf_at_tp2_and_pp2(layout, tmp_path, smollm2_hf_folder):
    result = run_torchrun("logits_vs_hf.py", 2, "--model", "tiny", *layout, tmp_path=tmp_path)
    # Random weights with initializer_range 0.08 give logits of order 1; fp32 noise is ~1e-6.
    assert result["logit_scale"] > 0.5
    assert result["max_abs_diff"] <= 1e-4, result


def test_tp2_forward_and_backward_equal_tp1_and_hf(tmp_path, smollm2_hf_folder):
    run_torchrun("tp_forward_backward.py", 1, "--tp", "1", "--out", str(tmp_path / "tp1.pt"), tmp_path=tmp_path)
    run_torchrun("tp_forward_backward.py", 2, "--tp", "2", "--out", str(tmp_path / "tp2.pt"), tmp_path=tmp_path)
    tp1 = torch.load(tmp_path / "tp1.pt")
    tp2 = torch.load(tmp_path / "tp2.pt")

    assert tp2["loss"] == pytest.approx(tp1["loss"], abs=1e-6)
    assert tp1["loss"] == pytest.approx(tp1["hf_loss"], abs=1e-5)
    assert set(tp1["gradients"]) == set(tp2["gradients"]) == set(tp1["hf_gradients"])
    for name, gradient in tp1["gradients"].items():
        assert gradient.abs().max() > 0, f"{name} received no gradient"
        torch.testing.assert_close(tp2["gradients"][name], gradient, atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(gradient, tp1["hf_gradients"][name], atol=1e-5, rtol=1e-3, msg=name)
