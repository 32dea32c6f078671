"""Greedy and seeded sampled generation from SmolLM2 at a TP/PP layout, as every rank saw it.

    torchrun --nproc-per-node N generation_vs_hf.py --tp T --pp P --max-new-tokens K --prompts '["Hi", ...]'

Rank 0 reports its greedy responses (the test compares them with Hugging Face ``generate``),
whether all ranks returned identical outputs, and how far the sampled tokens' log-probs are from
a full (no KV cache) forward pass at the same layout.
"""

import argparse
import json

import common  # the script's own folder is on sys.path when torchrun runs it


def main() -> None:
    import torch
    import torch.distributed as dist

    from nemo_dvpo.inference.chat import apply_chat_template
    from nemo_dvpo.inference.generation import SamplingConfig, generate, sampling_log_probs
    from nemo_dvpo.models.builder import build_gpt_model
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.forward import full_logits
    from nemo_dvpo.models.sources import load_tokenizer
    from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--prompts", type=json.loads, required=True, help="JSON list of chat prompts")
    args = parser.parse_args()

    model_cfg = load_model_config("smollm2_135m")
    initialize_distributed(ParallelConfig(args.tp, args.pp), num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    model = build_gpt_model(model_cfg)
    tokenizer = load_tokenizer(model_cfg.tokenizer_source)
    prompts = [apply_chat_template(tokenizer, prompt) for prompt in args.prompts]

    greedy = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=True))
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.9, seed=3)
    sampled = generate(model, tokenizer, prompts, sampling)

    logits = full_logits(model, sampled.tokens, vocab_size=len(tokenizer))
    reference = torch.zeros_like(sampled.logprobs)
    reference[:, 1:] = sampling_log_probs(logits[:, :-1], sampled.tokens[:, 1:], sampling, len(tokenizer))
    mask = sampled.response_mask
    summary = [[output.tokens.tolist(), output.logprobs.tolist(), output.response_mask.tolist()]
               for output in (greedy, sampled)]
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, summary)
    common.write_result({
        "greedy_responses": [greedy.response_token_ids(index) for index in range(len(prompts))],
        "sampled_response_lengths": sampled.response_lengths.tolist(),
        "identical_on_all_ranks": all(rank_summary == summary for rank_summary in every_rank),
        "sampled_logprob_max_diff": (sampled.logprobs[mask] - reference[mask]).abs().max().item(),
    })
    # Every rank leaves the process group together: a rank that exits while gloo's threads still serve
    # another one aborted once under load ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from nemo_dvpo.utils.errors import run_and_exit

    run_and_exit(main)
