"""DPO (Rafailov et al. 2023): the policy learns the preferences of pairwise data directly, offline.

Two models take part: the policy (trains) and a frozen reference (a copy of the starting policy). The data
are the pairwise files of stage 1, read by the same readers with the policy's chat template. Per step,
``DPORecipe.train()``:

    1. the step's pairs (a function of the step, so a resumed run sees the same data);
    2. the reference's summed log-probability of every response, once;
    3. one optimizer step on the DPO loss over the step's pairs (micro-batches of whole pairs);
    4. periodically: the held-out pairs' preference accuracy of the implicit reward; metrics (a checkpoint,
       or a stop, follows the step).

Before the first step and after the last, the policy's greedy answers to held-out verifiable prompts are
scored as in the RL recipes, so the algorithms compare on the same footing. The loss is
:func:`nemo_dvpo.algorithms.dpo.dpo_loss`; the run's lifecycle :class:`~nemo_dvpo.training.run.Run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from nemo_dvpo.algorithms.dpo import dpo_loss, sequence_logprobs
from nemo_dvpo.algorithms.reward import pair_rows
from nemo_dvpo.checkpointing.train_checkpoint import TrainedModel
from nemo_dvpo.data.preference import PreferenceDataConfig, ValueBatch, collate_value_batch, load_preference_data
from nemo_dvpo.data.prompts import load_prompts
from nemo_dvpo.data.splits import EpochStream
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.forward import logits_for_positions, position_ids_for
from nemo_dvpo.models.logprobs import at_token_positions, response_logit_span, target_logprobs
from nemo_dvpo.models.lora import LoRAConfig
from nemo_dvpo.recipes.config import parse_recipe_config
from nemo_dvpo.rlhf.config import EvalConfig
from nemo_dvpo.rlhf.policy import build_policy_and_reference, finalize_policy, reference_model
from nemo_dvpo.rlhf.report import HeldOutEvaluation, policy_summary
from nemo_dvpo.rlhf.rollout import token_logprobs
from nemo_dvpo.training.optim import OptimConfig, build_optimizer
from nemo_dvpo.training.run import Run, check_global_batch
from nemo_dvpo.training.step import configure_for_training, train_step
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.distributed import ParallelConfig, compute_device
from nemo_dvpo.utils.errors import ConfigError


@dataclass
class DPOData:
    # Pairwise preference data (prompt / chosen / rejected).
    train: str = "data/smollm2_ifeval/pairs_train.jsonl"
    # Held-out pairs: DPO's pairwise accuracy and loss during training (null: none).
    eval: Optional[str] = "data/smollm2_ifeval/pairs_heldout.jsonl"
    # How records become sequences (up to 512 tokens, prompts cut from the left when longer).
    processing: PreferenceDataConfig = field(
        default_factory=lambda: PreferenceDataConfig(max_length=512, overlong="truncate_prompt"))
    # Held-out verifiable prompts whose greedy answers are scored before and after (null: none), as in the
    # RL recipes; prompts longer than max_prompt_tokens are skipped.
    eval_prompts: Optional[str] = "data/smollm2_ifeval/prompts_heldout.jsonl"
    # The longest held-out prompt scored, in tokens after the chat template.
    max_prompt_tokens: int = 192


@dataclass
class DPOTrainConfig:
    # Optimizer steps of the run.
    steps: int = 100
    # Sequences per step over all data-parallel ranks (a pair is two).
    global_batch_size: int = 16
    # Sequences per forward/backward pass on a rank (even: a pair's two responses share a micro-batch).
    micro_batch_size: int = 8
    # The implicit reward's scale (the KL-regularisation strength).
    beta: float = 0.1
    # Seeds the data order.
    seed: int = 1234
    # Measure the held-out pairs every N steps (and at the end).
    eval_every: int = 25
    # Checkpoint every N steps (and at the end).
    save_every: int = 50
    # Checkpoints kept: the newest N.
    keep_last: int = 2
    # Held-out pairs evaluated (the first N of data.eval).
    eval_max_pairs: int = 1000

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size % 2:
            raise ConfigError("train.micro_batch_size must be even: a pair's two responses share a micro-batch")
        if self.beta <= 0:
            raise ConfigError(f"train.beta must be > 0, got {self.beta}")


@dataclass
class DPORecipeConfig:
    # The model: a preset (model=<name>, nemo_dvpo/conf/model/) whose fields model.<field>=... override.
    model: ModelConfig
    # Checkpoints, final/ (policy), hf/ (export), summary.json, metrics.jsonl, tensorboard/ go here.
    run_dir: str = "runs/dpo"
    # Continue from run_dir/checkpoints/latest (same data order, optimizer and schedule state).
    resume: bool = False
    # Continue from this checkpoint instead (e.g. when the latest is damaged).
    resume_from: Optional[str] = None
    # Start over in a run_dir that already holds a run, removing only that run's own files.
    overwrite: bool = False
    # A nemo_dvpo checkpoint to start the policy (and reference) from; null takes model.source.
    init_from: Optional[str] = None
    # Export the final policy as a Hugging Face folder (run_dir/hf).
    export_hf: bool = True
    data: DPOData = field(default_factory=DPOData)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, decay_style="constant"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # LoRA adapters on the policy (lora.enabled=true): only they train; the reference is the policy with them off.
    lora: LoRAConfig = field(default_factory=LoRAConfig)


class DPORecipe:
    """Wires config -> run, policy, reference, pairs, optimizer; ``train()`` is the numbered loop above."""

    def __init__(self, cfg: DPORecipeConfig, stop: Optional[GracefulStop] = None):
        self.cfg = cfg
        self.run = run = Run(cfg, "dpo", stop)
        train = cfg.train
        check_global_batch(train.global_batch_size, train.micro_batch_size, run.data_parallel.size)
        # Data: pairs (the two responses of a pair adjacent in every epoch's order) and held-out prompts.
        self.train_data = load_preference_data(cfg.data.train, cfg.data.processing, run.tokenizer,
                                               eos_token_id=run.eos_token_id)
        if any(sample.pair_id is None for sample in self.train_data.samples):
            raise ConfigError(f"DPO learns from pairs, but {cfg.data.train} holds scored records: give pairwise "
                              "data (prompt / chosen / rejected)")
        self.stream = EpochStream(self.train_data.groups, train.seed)
        self.eval_pairs = [] if not cfg.data.eval else load_preference_data(
            cfg.data.eval, cfg.data.processing, run.tokenizer,
            eos_token_id=run.eos_token_id).samples[:2 * train.eval_max_pairs]
        eval_prompts = None
        if cfg.data.eval_prompts and (cfg.eval.before or cfg.eval.after):
            eval_prompts = load_prompts(cfg.data.eval_prompts, run.tokenizer, cfg.data.max_prompt_tokens,
                                        chat_template=cfg.data.processing.chat_template, limit=cfg.eval.num_prompts)
        self.evaluation = HeldOutEvaluation(run, eval_prompts, cfg.eval)
        # The policy (trains) and the frozen reference, both from the starting weights.
        seq_length = max(cfg.data.processing.max_length or 1024, cfg.data.max_prompt_tokens + cfg.eval.max_new_tokens)
        self.policy, self.reference, hf_config = build_policy_and_reference(run.model_cfg, cfg.init_from, cfg.optim,
                                                                            seq_length, lora=cfg.lora)
        optimizer, scheduler = build_optimizer(self.policy, cfg.optim, train.steps)
        configure_for_training(self.policy, optimizer)
        self.trained = TrainedModel(self.policy, optimizer, scheduler, run.model_cfg, hf_config, "policy")
        self.vocab_size = len(run.tokenizer)
        self.heldout_accuracy = float("nan")
        run.track(self.trained, state=lambda: {"eval_before": self.evaluation.before})
        self.evaluation.before = run.resume().get("eval_before")

    # -- data and the loss -----------------------------------------------------------------------------------

    def step_batches(self, step: int) -> list[ValueBatch]:
        """This rank's micro-batches of the step's pairs (one padded length, for pipeline stages)."""
        size = self.cfg.train.global_batch_size
        samples = [self.train_data.samples[i]
                   for i in self.run.data_parallel.shard(self.stream.positions(step * size, (step + 1) * size))]
        pad_to = max(len(sample.input_ids) for sample in samples)
        micro = self.cfg.train.micro_batch_size
        return [collate_value_batch(samples[i:i + micro], self.run.pad_token_id, pad_to=pad_to)
                for i in range(0, len(samples), micro)]

    def reference_sums(self, batch: ValueBatch) -> torch.Tensor:
        with reference_model(self.reference, self.policy) as reference:
            logprobs, _ = token_logprobs(reference, batch.tokens, batch.response_mask, vocab_size=self.vocab_size,
                                         micro_batch_size=batch.tokens.shape[0])
        return sequence_logprobs(logprobs, batch.response_mask)

    def forward_step(self, micro_batch: tuple[ValueBatch, torch.Tensor], chunk):
        batch, reference = micro_batch
        batch, reference = batch.to(compute_device()), reference.to(compute_device())
        start, end = response_logit_span(batch.response_mask)
        with logits_for_positions(chunk, start, end):
            output = chunk(batch.tokens, position_ids_for(batch.tokens), attention_mask=None)

        def loss_func(logits: torch.Tensor):
            logprobs = at_token_positions(target_logprobs(logits, batch.tokens[:, start + 1:], self.vocab_size,
                                                          overwrite_logits=True), start)
            policy = sequence_logprobs(logprobs, batch.response_mask)
            chosen, rejected = (rows.to(policy.device) for rows in pair_rows(batch.pair_ids.cpu(),
                                                                             batch.is_chosen.cpu()))
            result = dpo_loss(policy[chosen], policy[rejected], reference[chosen], reference[rejected],
                              self.cfg.train.beta)
            return result.loss, {"loss": result.loss.detach(), "pair_accuracy": result.accuracy,
                                 "chosen_reward": result.chosen_rewards.mean(),
                                 "rejected_reward": result.rejected_rewards.mean()}

        return output, loss_func

    # -- the loop ------------------------------------------------------------------------------------------

    def train(self) -> dict:
        run, train = self.run, self.cfg.train
        with run.stopping():
            self.evaluation.score_before(self.policy)
            for step in run.steps(show=("train/loss", "train/pair_accuracy", "eval/pair_accuracy")):
                timer = run.phase_timer()
                # 1. the step's pairs
                batches = self.step_batches(step)
                # 2. the reference's log-probability of each response
                with timer("reference_forward"):
                    micro_batches = [(batch, self.reference_sums(batch)) for batch in batches]
                # 3. one optimizer step on the DPO loss
                with timer("update"):
                    update = train_step(self.policy, self.trained.optimizer, self.trained.scheduler, micro_batches,
                                        self.forward_step, seq_length=batches[0].tokens.shape[1],
                                        micro_batch_size=train.micro_batch_size)
                metrics = {f"train/{name}": value for name, value in update.items()} | timer.metrics()
                # 4. periodically the held-out pairs; metrics (a checkpoint, or a stop, follows the step)
                completed = step + 1
                if self.eval_pairs and (completed % train.eval_every == 0 or completed == train.steps):
                    self.heldout_accuracy = metrics["eval/pair_accuracy"] = self.pair_accuracy()
                run.log(step, metrics)
            self.evaluation.score_after(self.policy)
            final, hf_dir = run.save_final(finalize_policy(self.policy), extra={"algorithm": "dpo"},
                                           export_hf=self.cfg.export_hf)
            return policy_summary(run, {"heldout_pair_accuracy": self.heldout_accuracy}, self.evaluation, final,
                                  hf_dir)

    def pair_accuracy(self) -> float:
        """The share of held-out pairs whose implicit reward prefers the chosen response."""
        correct, total = 0.0, 0
        size = self.cfg.train.micro_batch_size
        for start in range(0, len(self.eval_pairs), size):
            batch = collate_value_batch(self.eval_pairs[start:start + size], self.run.pad_token_id)
            policy, _ = token_logprobs(self.policy, batch.tokens, batch.response_mask, vocab_size=self.vocab_size)
            margin = self.cfg.train.beta * (sequence_logprobs(policy, batch.response_mask) - self.reference_sums(batch))
            chosen, rejected = pair_rows(batch.pair_ids, batch.is_chosen)
            correct += float((margin[chosen] > margin[rejected]).sum())
            total += len(chosen)
        return correct / max(total, 1)

    def cleanup(self) -> None:
        self.run.cleanup()


def parse_config(cfg) -> DPORecipeConfig:
    return parse_recipe_config(cfg, DPORecipeConfig, "dpo")
