"""A training run saved and reloaded continues exactly as if it had never stopped."""

from __future__ import annotations

import pytest

from tests.conftest import run_torchrun

pytestmark = pytest.mark.slow  # every test here trains, converts or launches ranks (see pyproject.toml)


@pytest.mark.parametrize("nproc,extra", [(1, ()), (2, ("--distributed-optimizer",))],
                         ids=["dp1-adam", "dp2-distributed-optimizer"])
def test_resume_reproduces_the_uninterrupted_losses(nproc, extra, tmp_path, smollm2_hf_folder):
    result = run_torchrun("train_resume.py", nproc, "--run-dir", str(tmp_path / "run"), *extra, tmp_path=tmp_path)
    assert result["world_size"] == nproc
    assert result["step"] == 3 and result["note"] == "test"
    # Training actually moves the loss, so equality below is not trivially met by a frozen model.
    assert result["uninterrupted"][-1] != result["first"][0]
    assert result["resumed"] == result["uninterrupted"]
