"""Rollout throughput of the two engines on SmolLM2-135M-Instruct: Megatron's static batch vs vLLM.

The data builder's setting by default: 32 chat prompts of 47 tokens (benchmarks/generation_speed.py's) x 4
samples x 160 new tokens, top-k 50, no EOS stop, so both engines generate exactly the same number of tokens.
The vLLM engine runs in its own process with the vLLM environment (tools/setup_vllm_env.sh), starts with
random weights and is refitted from the Megatron policy (the refit time is printed too); a warm-up call
precedes each timed one. Prints one line per engine, plus the CPU and the command.

    python benchmarks/rollout_engines.py                      # both engines, the data builder's setting
    python benchmarks/rollout_engines.py --engines vllm --vllm-eager --batch 8 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import nemo_dvpo  # noqa: F401  (CPU compatibility layer first)
from nemo_dvpo.inference.chat import encode_prompt
from nemo_dvpo.inference.generation import SamplingConfig, generate
from nemo_dvpo.models.builder import build_gpt_model, resolve_hf_config
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.sources import hf_folder_for, load_tokenizer
from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed
from nemo_dvpo.utils.errors import run_and_exit

WORDS = ["cat", "dog", "river", "robot", "ship", "tree", "king", "bird"]


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="megatron,vllm", help="comma-separated: megatron, vllm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (faster start)")
    parser.add_argument("--vllm-threads", type=int, default=None,
                        help="OMP threads of the vLLM worker (default: torch's thread count here)")
    parser.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    unknown = set(engines) - {"megatron", "vllm"}
    if unknown:
        parser.error(f"--engines: unknown {sorted(unknown)}")

    print(f"# CPU: {cpu_model()} ({torch.get_num_threads()} torch threads)")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    model_cfg = load_model_config("smollm2_135m")
    tokenizer = load_tokenizer(model_cfg.tokenizer_source)
    prompts = [encode_prompt(tokenizer, f"Write a short story about a {WORDS[i % len(WORDS)]} in exactly three "
                                        "sentences, then list two facts.") for i in range(args.batch)]
    rows = [prompt for prompt in prompts for _ in range(args.samples_per_prompt)]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, top_k=args.top_k, stop_on_eos=False, seed=1)
    warm_up = SamplingConfig(max_new_tokens=4, top_k=args.top_k, stop_on_eos=False)
    tokens = len(rows) * args.max_new_tokens
    setting = (f"{args.batch} prompts x {args.samples_per_prompt} samples x {args.max_new_tokens} tokens "
               f"(top-k {args.top_k})")

    initialize_distributed(ParallelConfig(), num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    hf_config = resolve_hf_config(model_cfg)
    policy = build_gpt_model(model_cfg, hf_config=hf_config, seq_length=512)

    if "megatron" in engines:
        generate(policy, tokenizer, prompts[:2], warm_up)
        started = time.perf_counter()
        generate(policy, tokenizer, rows, sampling)
        elapsed = time.perf_counter() - started
        print(f"megatron: {setting} in {elapsed:.2f} s = {tokens / elapsed:.1f} tokens/s")

    if "vllm" in engines:
        from nemo_dvpo.inference.vllm_engine import VllmEngine, VllmEngineConfig, refit_from_policy

        log_file = Path(tempfile.gettempdir()) / "rollout_engines_vllm_worker.log"
        config = VllmEngineConfig(
            model=hf_folder_for(model_cfg.source).location, load_format="dummy", dtype=args.vllm_dtype,
            max_model_len=512, cpu_threads_bind="nobind", cpu_threads=args.vllm_threads or torch.get_num_threads(),
            log_file=str(log_file), engine_kwargs={"enforce_eager": True} if args.vllm_eager else {})
        started = time.perf_counter()
        with VllmEngine(config) as engine:
            start_seconds = time.perf_counter() - started
            refit = refit_from_policy(engine, policy, hf_config)
            eos = [tokenizer.eos_token_id]
            engine.generate(prompts[:2], warm_up, eos)
            started = time.perf_counter()
            result = engine.generate(rows, sampling, eos)
            elapsed = time.perf_counter() - started
            generated = sum(map(len, result.token_ids))
            assert generated == tokens, f"vLLM generated {generated} tokens, expected {tokens}"
            second = refit_from_policy(engine, policy, hf_config)
        mode = "eager" if args.vllm_eager else "torch.compile"
        print(f"vllm ({mode}, {args.vllm_dtype}, {config.cpu_threads} threads): {setting} in {elapsed:.2f} s "
              f"= {tokens / elapsed:.1f} tokens/s (worker's own time {result.seconds:.2f} s); engine start "
              f"{start_seconds:.1f} s; refit {refit.seconds:.2f} s ({refit.tensors} tensors, "
              f"{refit.bytes / 2**20:.0f} MiB in {refit.buckets} buckets, {refit.load_seconds:.2f} s in the engine), "
              f"a second refit {second.seconds:.2f} s")


if __name__ == "__main__":
    run_and_exit(main)
