"""Generation throughput of SmolLM2-135M-Instruct through nemo_dvpo's Megatron generation (docs/benchmarks.md).

Samples ``--max-new-tokens`` tokens (no EOS stop) for ``--batch`` chat prompts of 47 tokens, each
``--samples-per-prompt`` times (the data builder's setting: the engine prefills a repeated prompt once),
and prints generated tokens/s. ``--stock-attention`` builds the model with megatron-core's own local attention
modules instead of nemo_dvpo.models.attention's, for comparison. ``--hf`` times Hugging Face ``generate``
on the same prompts instead.

    python benchmarks/generation_speed.py --batch 8 --max-new-tokens 64 [--stock-attention | --hf]
    python benchmarks/generation_speed.py --batch 32 --samples-per-prompt 4 --max-new-tokens 160 --top-k 50
"""

from __future__ import annotations

import argparse
import time

import torch

import nemo_dvpo  # noqa: F401  (CPU compatibility layer first)
from nemo_dvpo.inference.chat import encode_prompt
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.sources import load_hf_model, load_tokenizer
from nemo_dvpo.utils.errors import run_and_exit

WORDS = ["cat", "dog", "river", "robot", "ship", "tree", "king", "bird"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=0, help="0: sample from the whole vocabulary")
    parser.add_argument("--stock-attention", action="store_true")
    parser.add_argument("--hf", action="store_true")
    args = parser.parse_args()
    model_cfg = load_model_config("smollm2_135m")
    tokenizer = load_tokenizer(model_cfg.tokenizer_source)
    prompts = [encode_prompt(tokenizer, f"Write a short story about a {WORDS[i % len(WORDS)]} in exactly three "
                                        "sentences, then list two facts.") for i in range(args.batch)]
    rows = [prompt for prompt in prompts for _ in range(args.samples_per_prompt)]
    if args.hf:
        model = load_hf_model(model_cfg.source).eval()
        ids = torch.tensor(rows)
        with torch.no_grad():
            model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), max_new_tokens=4, do_sample=True)
            started = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                           min_new_tokens=args.max_new_tokens, do_sample=True, top_k=args.top_k, top_p=1.0)
            elapsed = time.perf_counter() - started
    else:
        from nemo_dvpo.inference.generation import SamplingConfig, generate
        from nemo_dvpo.models import builder
        from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed

        if args.stock_attention:
            from nemo_dvpo.models.attention import _bridge_local_spec

            builder.local_layer_spec = _bridge_local_spec
        initialize_distributed(ParallelConfig(), num_attention_heads=model_cfg.num_attention_heads,
                               num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
        model = builder.build_gpt_model(model_cfg, seq_length=512)
        generate(model, tokenizer, prompts[:2], SamplingConfig(max_new_tokens=4))
        started = time.perf_counter()
        generate(model, tokenizer, rows, SamplingConfig(max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                                                        stop_on_eos=False, seed=1))
        elapsed = time.perf_counter() - started
    engine = "HF generate" if args.hf else ("megatron, stock attention" if args.stock_attention else "megatron")
    print(f"{engine}: {args.batch} prompts x {args.samples_per_prompt} samples x {args.max_new_tokens} tokens "
          f"(top-k {args.top_k}) in {elapsed:.2f} s = {len(rows) * args.max_new_tokens / elapsed:.1f} tokens/s "
          f"(torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    run_and_exit(main)
