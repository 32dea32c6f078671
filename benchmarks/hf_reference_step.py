"""A DVPO step written directly on Hugging Face transformers, for side-by-side timing (docs/benchmarks.md).

The peer figures (../shared/notes/peer-figures.md) time the authors' TRL-based code, which cannot be
installed offline. This script does what such a step must do, with the same models and setting as
``benchmarks/dvpo_step_time.py``, in plain transformers + torch (what TRL's PPOTrainer runs on):
left-padded HF ``generate`` of 8 x 64 tokens, one reference forward, one value-model forward
(trunk + linear head), then 4 epochs x 4 mini-batches of 2 of policy forward + backward + AdamW.
It times the phases only: advantages are random and no result is kept. Run it on the same machine
state as the Megatron benchmark and compare.

    python benchmarks/hf_reference_step.py [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import nemo_dvpo  # noqa: F401
from nemo_dvpo.data.prompts import load_prompts
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.sources import load_hf_model, load_tokenizer
from nemo_dvpo.training.metrics import peak_memory_mib
from nemo_dvpo.utils.errors import run_and_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    model_cfg = load_model_config("smollm2_135m")
    tokenizer = load_tokenizer(model_cfg.tokenizer_source)
    prompts = load_prompts("data/smollm2_ifeval/prompts.jsonl", tokenizer, max_prompt_tokens=64, split="train")
    policy = load_hf_model(model_cfg.source)
    reference = load_hf_model(model_cfg.source).eval().requires_grad_(False)
    value_trunk = load_hf_model(model_cfg.source).model.eval().requires_grad_(False)
    value_head = torch.nn.Linear(value_trunk.config.hidden_size, 1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-6)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    timings: list[dict[str, float]] = []
    for step in range(args.steps + 1):
        batch = [prompts.token_ids[(step * 8 + i) % len(prompts)] for i in range(8)]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        phase: dict[str, float] = {}
        started = time.perf_counter()
        with torch.no_grad():
            sequences = policy.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, top_k=0,
                                        top_p=1.0, max_new_tokens=64, min_new_tokens=64, pad_token_id=pad)
        phase["generation"] = time.perf_counter() - started
        full_attention = torch.cat([attention, torch.ones(8, 64, dtype=attention.dtype)], dim=1)
        started = time.perf_counter()
        with torch.no_grad():
            ref_logits = reference(sequences, attention_mask=full_attention).logits
            ref_logprobs = torch.log_softmax(ref_logits[:, width - 1:-1].float(), -1).gather(
                -1, sequences[:, width:, None]).squeeze(-1)
        phase["reference_forward"] = time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad():
            values = value_head(value_trunk(sequences, attention_mask=full_attention).last_hidden_state).squeeze(-1)
        phase["value_forward"] = time.perf_counter() - started
        advantages = torch.randn(8, 64)
        started = time.perf_counter()
        for _ in range(4):
            for rows in torch.randperm(8).split(2):
                logits = policy(sequences[rows], attention_mask=full_attention[rows]).logits
                logprobs = torch.log_softmax(logits[:, width - 1:-1].float(), -1).gather(
                    -1, sequences[rows, width:, None]).squeeze(-1)
                ratio = torch.exp(logprobs - ref_logprobs[rows])
                loss = -torch.minimum(ratio * advantages[rows], ratio.clamp(0.8, 1.2) * advantages[rows]).mean()
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                optimizer.step()
        phase["update"] = time.perf_counter() - started
        phase["step"] = sum(phase.values())
        del values
        if step > 0:  # step 0 is the warm-up
            timings.append(phase)
        print(f"step {step}: " + ", ".join(f"{k} {v:.2f}s" for k, v in phase.items()), flush=True)
    print(f"\nHF reference DVPO step, median of {len(timings)} steps after a warm-up:")
    for name in ("step", "generation", "reference_forward", "value_forward", "update"):
        print(f"  {name:20s} {statistics.median(t[name] for t in timings):8.2f} s")
    print(f"  peak memory          {peak_memory_mib():8.0f} MiB")


if __name__ == "__main__":
    run_and_exit(main)
