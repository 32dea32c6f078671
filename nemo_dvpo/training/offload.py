"""Keep frozen models (reference, GVM) in CPU memory except while they run, to free GPU memory.

Only the policy needs to stay on the GPU across a DVPO step: the reference and the GVM each run one
forward pass per rollout. Moving their parameters over PCIe costs far less than their share of GPU
memory is worth at 8B scale. Without CUDA everything already lives in CPU memory and this is a no-op.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def move_parameters(model: list[torch.nn.Module], device: str) -> None:
    """Move parameters and buffers of every chunk in place (``.data`` swap keeps module references valid)."""
    with torch.no_grad():
        for module in model:
            for tensor in (*module.parameters(), *module.buffers()):
                tensor.data = tensor.data.to(device, non_blocking=True)
    if device == "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def offload_enabled(enabled: bool) -> bool:
    return enabled and torch.cuda.is_available()


@contextmanager
def offloaded(model: list[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Inside the block the model is on the GPU; outside it (when enabled) in CPU memory."""
    if not offload_enabled(enabled):
        yield
        return
    move_parameters(model, f"cuda:{torch.cuda.current_device()}")
    try:
        yield
    finally:
        move_parameters(model, "cpu")
