"""Time of one torch AdamW step over SmolLM2-135M-sized fp32 parameters on CPU, default vs fused (docs/benchmarks.md).

    python benchmarks/adam_step.py
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    # 28M (embedding) + 35 x 3M: about SmolLM2-135M's 134.5M parameters.
    params = [torch.nn.Parameter(torch.randn(n)) for n in [28_000_000] + [3_000_000] * 35]
    for param in params:
        param.grad = torch.randn_like(param)
    for fused in (False, True):
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=fused or None)
        optimizer.step()
        started = time.perf_counter()
        for _ in range(3):
            optimizer.step()
        print(f"AdamW {'fused' if fused else 'default'}: {(time.perf_counter() - started) / 3:.3f} s per step "
              f"(torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    from nemo_dvpo.utils.errors import run_and_exit

    run_and_exit(main)
