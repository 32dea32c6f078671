"""Print a model's completions for prompts given on the command line or in a JSONL file.

    python examples/generate.py prompts='["What is 2+2?","Name a colour."]'
    python examples/generate.py model=tiny prompts_file=prompts.jsonl sampling.greedy=false sampling.temperature=0.7
    torchrun --nproc-per-node 3 examples/generate.py parallel.tensor_model_parallel_size=3 checkpoint=DIR prompts=...
    python examples/generate.py checkpoint=DIR interactive=true     # multi-turn chat on the terminal

Every rank runs the same generation (model parallelism needs all of them); rank 0 prints.
"""

from __future__ import annotations

import hydra
import torch.distributed as dist
from omegaconf import DictConfig

from nemo_dvpo.data.prompts import read_prompts
from nemo_dvpo.inference.chat import apply_chat_template, encode_prompt
from nemo_dvpo.inference.completion import GenerateConfig
from nemo_dvpo.inference.generation import SamplingConfig, generate
from nemo_dvpo.inference.policy import load_policy
from nemo_dvpo.recipes.config import parse_recipe_config
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.distributed import destroy_distributed, is_rank_zero, print_rank_zero
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import CONF_DIR

# nemo_dvpo/conf/generate.yaml composes these defaults (one source: the dataclass) with the preset.
register_defaults("generate_defaults", GenerateConfig)


def load_prompts(config: GenerateConfig) -> list:
    if config.prompts_file is not None:
        return read_prompts(config.prompts_file)
    return config.prompts if isinstance(config.prompts, list) else [config.prompts]


def read_user_turn() -> str | None:
    """Rank 0 reads a line from the terminal; every rank gets it (model parallelism needs them all)."""
    line = [None]
    if is_rank_zero():
        try:
            line[0] = input("you> ")
        except EOFError:
            line[0] = None
    if dist.is_initialized():
        dist.broadcast_object_list(line, src=0)
    return line[0]


def chat(model, tokenizer, sampling: SamplingConfig, eos_token_ids) -> None:
    """A multi-turn chat: the whole conversation is re-encoded with the chat template each turn."""
    print_rank_zero("Chat with the model. /reset starts a new conversation, /exit (or Ctrl-D) quits.")
    history: list[dict] = []
    while True:
        turn = read_user_turn()
        if turn is None or turn.strip() in ("/exit", "/quit"):
            return
        if turn.strip() == "/reset":
            history = []
            continue
        if not turn.strip():
            continue
        history.append({"role": "user", "content": turn})
        output = generate(model, tokenizer, [apply_chat_template(tokenizer, history)], sampling,
                          eos_token_ids=eos_token_ids)
        history.append({"role": "assistant", "content": output.response_texts[0]})
        print_rank_zero(f"assistant> {output.response_texts[0]}")


@hydra.main(config_path=str(CONF_DIR), config_name="generate", version_base=None)
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    config = parse_recipe_config(cfg, GenerateConfig, "generate")
    prompts = None if config.interactive else load_prompts(config)
    sampling = config.sampling
    # The one policy loader: a checkpoint if given, else the (command-line composed) preset.
    policy = load_policy(config.checkpoint or config.model, config.parallel)
    model, tokenizer = policy.model, policy.tokenizer
    eos_token_ids = sampling.eos_token_ids or policy.eos_token_ids
    if config.interactive:
        chat(model, tokenizer, sampling, eos_token_ids or None)
        destroy_distributed()
        return
    prompt_token_ids = [encode_prompt(tokenizer, prompt, config.chat_template) for prompt in prompts]
    output = generate(model, tokenizer, prompt_token_ids, sampling, eos_token_ids=eos_token_ids or None)

    for index, (prompt, response) in enumerate(zip(prompts, output.response_texts)):
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        print_rank_zero(f"### [{index}] {shown}\n{response}\n")
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
