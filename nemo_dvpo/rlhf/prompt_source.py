"""Where an RL run's prompts come from: the training prompts of each step and the held-out prompts it is scored on."""

from __future__ import annotations

import dataclasses
from typing import Optional

from nemo_dvpo.data.prompts import PromptSet, load_prompts
from nemo_dvpo.data.splits import EpochStream
from nemo_dvpo.inference.generation import SamplingConfig
from nemo_dvpo.rlhf.config import EvalConfig, PromptDataConfig, RolloutConfig
from nemo_dvpo.training.data_parallel import DataParallel
from nemo_dvpo.utils.distributed import print_rank_zero
from nemo_dvpo.utils.seeding import derive_seed


class PromptSource:
    """The training prompts (an endless stream of seeded epochs) and the held-out ones (None: not evaluated).

    A step's prompts and its sampling seed are functions of the step alone, so a resumed run sees the same
    prompts and draws the same samples as an uninterrupted one.
    """

    def __init__(self, data: PromptDataConfig, rollout: RolloutConfig, evaluation: EvalConfig, tokenizer,
                 data_parallel: DataParallel, seed: int, tag: str):
        self.rollout, self.data_parallel, self.seed = rollout, data_parallel, seed
        self.train = load_prompts(data.train, tokenizer, data.max_prompt_tokens, split=data.train_split,
                                  chat_template=data.chat_template)
        print_rank_zero(f"[{tag}] {len(self.train)} training prompts from {data.train}"
                        + (f" (skipped {self.train.skipped})" if self.train.skipped else ""))
        self.stream = EpochStream([[i] for i in range(len(self.train))], seed)
        self.heldout: Optional[PromptSet] = None
        if data.eval and (evaluation.before or evaluation.after):
            self.heldout = load_prompts(data.eval, tokenizer, data.max_prompt_tokens, split=data.eval_split,
                                        chat_template=data.chat_template, limit=evaluation.num_prompts)

    def step_prompts(self, step: int) -> tuple[list[list[int]], list[dict]]:
        """This rank's prompts of ``step`` (each repeated ``samples_per_prompt`` times) and their records."""
        per_step, repeats = self.rollout.prompts_per_step, self.rollout.samples_per_prompt
        indices = self.data_parallel.shard(self.stream.positions(step * per_step, (step + 1) * per_step))
        return ([self.train.token_ids[i] for i in indices for _ in range(repeats)],
                [self.train.records[i] for i in indices for _ in range(repeats)])

    def sampling(self, step: int) -> SamplingConfig:
        """The rollout's sampling settings with the seed of ``step`` on this data-parallel rank."""
        return dataclasses.replace(self.rollout.sampling,
                                   seed=derive_seed(self.seed, "rollout", step, self.data_parallel.rank))
