"""The CPU compatibility layer for megatron-core."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import nemo_dvpo  # noqa: F401  (applies the layer)
from nemo_dvpo.utils import cpu_compat
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer only acts without CUDA")


def test_layer_is_active_without_cuda():
    assert cpu_compat.is_applied()


def test_cuda_allocations_land_on_cpu():
    tensor = torch.zeros(3, device="cuda")
    assert tensor.device.type == "cpu"
    assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert tensor.cuda() is tensor
    assert tensor.to("cuda").device.type == "cpu"
    # megatron-core's clip_grads asserts on the CUDA type name.
    assert tensor.type() == "torch.cuda.FloatTensor"
    # A requested conversion still converts.
    assert tensor.type(torch.float64).dtype == torch.float64


def test_cuda_events_measure_wall_time():
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    sum(range(100000))
    end.record()
    torch.cuda.synchronize()
    assert start.elapsed_time(end) > 0


def test_megatron_rng_tracker_forks_a_separate_reproducible_stream(megatron_single_rank):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123)
    tracker = get_cuda_rng_tracker()
    outside_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    # Forking must not advance the default stream...
    assert torch.equal(torch.get_rng_state(), outside_before)
    with tracker.fork():
        second = torch.rand(4)
    # ...and the forked stream continues rather than restarting.
    assert not torch.equal(first, second)
    model_parallel_cuda_manual_seed(123)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), first)


def test_layer_is_a_no_op_when_cuda_exists():
    script = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        original_current_device = torch.cuda.current_device
        import nemo_dvpo
        from nemo_dvpo.utils import cpu_compat
        assert not cpu_compat.is_applied()
        assert cpu_compat.apply() is False
        assert torch.cuda.current_device is original_current_device
        from torch.overrides import _get_current_function_mode_stack
        assert not _get_current_function_mode_stack()
        print("ok")
    """)
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().endswith("ok")


def test_transformer_engine_placeholder_is_transient():
    cpu_compat.import_megatron_bridge()
    assert "transformer_engine" not in sys.modules
    assert not cpu_compat.transformer_engine_available()
    from megatron.core.models.gpt import gpt_layer_specs

    assert gpt_layer_specs.HAVE_TE is False
    from megatron.bridge.peft import lora_layers

    with pytest.raises(RuntimeError, match="Transformer Engine is not installed"):
        lora_layers.te.Linear(4, 4)


@pytest.mark.slow
def test_gloo_scatter_of_non_contiguous_chunks(tmp_path):
    from tests.conftest import run_torchrun

    result = run_torchrun("scatter_chunks.py", 2, tmp_path=tmp_path)
    assert result["received_equals_sent"], result
