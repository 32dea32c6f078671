"""The GVM's value head: zero-initialised fp32, TP=2 equals TP=1, values equal the HF trunk + head."""

from __future__ import annotations

import torch

from tests.conftest import run_torchrun


def test_value_head_at_tp2_equals_tp1_and_the_hf_reference(tmp_path, smollm2_hf_folder):
    run_torchrun("value_head_tp.py", 1, "--tp", "1", "--out", str(tmp_path / "tp1.pt"), tmp_path=tmp_path)
    run_torchrun("value_head_tp.py", 2, "--tp", "2", "--out", str(tmp_path / "tp2.pt"), tmp_path=tmp_path)
    tp1, tp2 = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")

    assert tp1["values"].shape == (3, 12)
    assert tp1["values"].std() > 1e-3, "values should vary across tokens"
    torch.testing.assert_close(tp1["values"], tp1["reference_values"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tp2["values"], tp1["values"], atol=1e-5, rtol=1e-4)
    assert abs(tp2["loss"] - tp1["loss"]) < 1e-6
    assert tp1["head_gradient"].abs().max() > 0
    torch.testing.assert_close(tp2["head_gradient"], tp1["head_gradient"], atol=1e-6, rtol=1e-4)
    assert abs(tp2["embedding_gradient_norm"] - tp1["embedding_gradient_norm"]) < 1e-5 * tp1["embedding_gradient_norm"]
