"""DPO (Rafailov et al. 2023): the policy learns the preferences of pairwise data directly, offline.

Two models take part: the policy (trains) and a frozen reference (a copy of the starting policy). The data
are the pairwise files of stage 1, read by the same readers with the policy's chat template. Per step,
``DPORecipe.train()``:

    1. the step's pairs (a function of the step, so a resumed run sees the same data);
    2. the reference's summed log-probability of every response, once;
    3. one optimizer step on the DPO loss over the step's pairs (micro-batches of whole pairs);
    4. periodically: the held-out pairs' preference accuracy of the implicit reward, metrics, a checkpoint.

Before the first step and after the last, the policy's greedy answers to held-out verifiable prompts are
scored as in the RL recipes, so the algorithms compare on the same footing. The loss is
:func:`nemo_dvpo.algorithms.dpo.dpo_loss`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from nemo_dvpo.algorithms.dpo import dpo_loss, sequence_logprobs
from nemo_dvpo.algorithms.reward import pair_rows
from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config
from nemo_dvpo.checkpointing.run_dir import check_resumed_model, prepare_run_dir
from nemo_dvpo.checkpointing.train_checkpoint import load_training_checkpoint, save_training_checkpoint
from nemo_dvpo.data.preference import PreferenceDataConfig, ValueBatch, collate_value_batch, load_preference_data
from nemo_dvpo.data.prompts import load_prompts
from nemo_dvpo.data.splits import EpochStream
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.checkpointing.conversion import export_model_to_hf
from nemo_dvpo.models.lora import LoRAConfig
from nemo_dvpo.models.forward import logits_for_positions, position_ids_for
from nemo_dvpo.models.logprobs import at_token_positions, response_logit_span, target_logprobs
from nemo_dvpo.models.sources import load_tokenizer
from nemo_dvpo.recipes.config import parse_recipe_config
from nemo_dvpo.rlhf.config import EvalConfig
from nemo_dvpo.rlhf.policy_run import (
    build_policy_and_reference,
    evaluate_policy,
    finalize_policy,
    reference_model,
    write_summary,
)
from nemo_dvpo.rlhf.rollout import token_logprobs
from nemo_dvpo.training.data_parallel import DataParallel
from nemo_dvpo.training.metrics import MetricsLogger, peak_memory_mib, progress_bar
from nemo_dvpo.training.optim import OptimConfig, build_optimizer
from nemo_dvpo.training.step import configure_for_training, train_step
from nemo_dvpo.training.stopping import GracefulStop, stopped_message
from nemo_dvpo.utils.distributed import ParallelConfig, compute_device, initialize_distributed, print_rank_zero
from nemo_dvpo.utils.errors import ConfigError, TrainingStopped


@dataclass
class DPOData:
    # Pairwise preference data (prompt / chosen / rejected); eval: held-out pairs (null: none).
    train: str = "data/smollm2_ifeval/pairs_train.jsonl"
    eval: Optional[str] = "data/smollm2_ifeval/pairs_heldout.jsonl"
    processing: PreferenceDataConfig = field(
        default_factory=lambda: PreferenceDataConfig(max_length=512, overlong="truncate_prompt"))
    # Held-out verifiable prompts whose greedy answers are scored before and after (null: none), as in the
    # RL recipes; prompts longer than max_prompt_tokens are skipped.
    eval_prompts: Optional[str] = "data/smollm2_ifeval/prompts_heldout.jsonl"
    max_prompt_tokens: int = 192


@dataclass
class DPOTrainConfig:
    steps: int = 100
    # Sequences per step over all data-parallel ranks (a pair is two) and per forward/backward on a rank.
    global_batch_size: int = 16
    micro_batch_size: int = 8
    # The implicit reward's scale (the KL-regularisation strength).
    beta: float = 0.1
    seed: int = 1234
    eval_every: int = 25
    save_every: int = 50
    keep_last: int = 2
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
    model: ModelConfig
    run_dir: str = "runs/dpo"
    resume: bool = False
    resume_from: Optional[str] = None
    overwrite: bool = False
    # A nemo_dvpo checkpoint to start the policy (and reference) from; null takes model.source.
    init_from: Optional[str] = None
    export_hf: bool = True
    data: DPOData = field(default_factory=DPOData)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_steps=0, decay_style="constant"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # LoRA adapters on the policy (lora.enabled=true): only they train; the reference is the policy with them off.
    lora: LoRAConfig = field(default_factory=LoRAConfig)


class DPORecipe:
    """Wires config -> policy, reference, pairs, optimizer; ``train()`` is the numbered loop of the docstring."""

    def __init__(self, cfg: DPORecipeConfig, stop: Optional[GracefulStop] = None):
        self.cfg, self.stop = cfg, stop or GracefulStop()
        train = cfg.train
        initialize_distributed(cfg.parallel, num_attention_heads=cfg.model.num_attention_heads,
                               num_query_groups=cfg.model.num_query_groups, num_layers=cfg.model.num_layers)
        checkpoint = prepare_run_dir(cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                                     resume_from=cfg.resume_from)
        self.data_parallel = DataParallel.from_parallel_state()
        per_rank, remainder = divmod(train.global_batch_size, self.data_parallel.size)
        if remainder or per_rank % train.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={train.global_batch_size} must split into data-parallel "
                              f"size {self.data_parallel.size} x micro-batches of train.micro_batch_size="
                              f"{train.micro_batch_size}")
        self.policy_cfg = cfg.model if cfg.init_from is None else dataclasses.replace(
            read_checkpoint_model_config(cfg.init_from), precision=cfg.model.precision)
        if checkpoint is not None:
            check_resumed_model(checkpoint, self.policy_cfg)
        self.tokenizer = load_tokenizer(self.policy_cfg.tokenizer_source)
        eos = self.policy_cfg.eos_token_id if self.policy_cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos

        # Data: pairs (the two responses of a pair adjacent in every epoch's order) and held-out prompts.
        self.train_data = load_preference_data(cfg.data.train, cfg.data.processing, self.tokenizer, eos_token_id=eos)
        if any(sample.pair_id is None for sample in self.train_data.samples):
            raise ConfigError(f"DPO learns from pairs, but {cfg.data.train} holds scored records: give pairwise "
                              "data (prompt / chosen / rejected)")
        self.stream = EpochStream(self.train_data.groups, train.seed)
        self.eval_pairs = [] if not cfg.data.eval else load_preference_data(
            cfg.data.eval, cfg.data.processing, self.tokenizer, eos_token_id=eos).samples[:2 * train.eval_max_pairs]
        self.eval_prompts = None
        if cfg.data.eval_prompts and (cfg.eval.before or cfg.eval.after):
            self.eval_prompts = load_prompts(cfg.data.eval_prompts, self.tokenizer, cfg.data.max_prompt_tokens,
                                             chat_template=cfg.data.processing.chat_template,
                                             limit=cfg.eval.num_prompts)

        seq_length = max(cfg.data.processing.max_length or 1024, cfg.data.max_prompt_tokens + cfg.eval.max_new_tokens)
        self.policy, self.reference, self.hf_config = build_policy_and_reference(
            self.policy_cfg, cfg.init_from, cfg.optim, seq_length, lora=cfg.lora)
        self.optimizer, self.scheduler = build_optimizer(self.policy, cfg.optim, train.steps)
        configure_for_training(self.policy, self.optimizer)
        self.vocab_size = len(self.tokenizer)

        self.start_step, self.eval_before, self.checkpoint = 0, None, checkpoint
        if checkpoint is not None:
            state = load_training_checkpoint(checkpoint, self.policy, self.optimizer, self.scheduler)
            self.start_step, self.eval_before = state["step"], state.get("eval_before")
            print_rank_zero(f"[dpo] resumed from {checkpoint} at step {self.start_step}")
        self.logger = MetricsLogger(cfg.run_dir, resume_step=self.start_step if checkpoint else None)

    # -- data and the loss -----------------------------------------------------------------------------------

    def step_batches(self, step: int) -> list[ValueBatch]:
        """This rank's micro-batches of the step's pairs (one padded length, for pipeline stages)."""
        size = self.cfg.train.global_batch_size
        samples = [self.train_data.samples[i]
                   for i in self.data_parallel.shard(self.stream.positions(step * size, (step + 1) * size))]
        pad_to = max(len(sample.input_ids) for sample in samples)
        micro = self.cfg.train.micro_batch_size
        return [collate_value_batch(samples[i:i + micro], self.pad_token_id, pad_to=pad_to)
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
        with self.stop:
            return self._train()

    def _train(self) -> dict:
        cfg, train = self.cfg, self.cfg.train
        if self.eval_before is None and cfg.eval.before:
            self.eval_before = self.evaluate("before", self.start_step)
        step_times: list[float] = []
        accuracy = float("nan")
        with progress_bar(train.steps, initial=self.start_step, description="dpo") as bar:
            for step in range(self.start_step, train.steps):
                started = time.perf_counter()
                # 1. the step's pairs
                batches = self.step_batches(step)
                # 2. the reference's log-probability of each response
                micro_batches = [(batch, self.reference_sums(batch)) for batch in batches]
                # 3. one optimizer step on the DPO loss
                metrics = train_step(self.policy, self.optimizer, self.scheduler, micro_batches, self.forward_step,
                                     seq_length=batches[0].tokens.shape[1], micro_batch_size=train.micro_batch_size)
                completed = step + 1
                # 4. held-out pairs, metrics, checkpoints
                if self.eval_pairs and (completed % train.eval_every == 0 or completed == train.steps):
                    accuracy = self.heldout_accuracy()
                    metrics["eval/pair_accuracy"] = accuracy
                step_times.append(time.perf_counter() - started)
                metrics |= {"step_time_s": step_times[-1], "peak_memory_mib": peak_memory_mib()}
                self.logger.log(completed, {name if "/" in name else f"train/{name}": value
                                            for name, value in metrics.items()})
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['pair_accuracy']:.2f}",
                                held_out=f"{accuracy:.3f}")
                checkpoint = self.save(completed) if completed % train.save_every == 0 and completed < train.steps \
                    else None
                if completed < train.steps and self.stop.should_stop():
                    raise TrainingStopped(stopped_message("dpo", self.stop.signal_name, completed, train.steps,
                                                          checkpoint or self.save(completed)))
        eval_after = self.evaluate("after", train.steps) if cfg.eval.after else None
        return self.finish(eval_after, step_times, accuracy)

    def heldout_accuracy(self) -> float:
        """The share of held-out pairs whose implicit reward prefers the chosen response."""
        correct, total = 0.0, 0
        size = self.cfg.train.micro_batch_size
        for start in range(0, len(self.eval_pairs), size):
            batch = collate_value_batch(self.eval_pairs[start:start + size], self.pad_token_id)
            policy, _ = token_logprobs(self.policy, batch.tokens, batch.response_mask, vocab_size=self.vocab_size)
            margin = self.cfg.train.beta * (sequence_logprobs(policy, batch.response_mask) - self.reference_sums(batch))
            chosen, rejected = pair_rows(batch.pair_ids, batch.is_chosen)
            correct += float((margin[chosen] > margin[rejected]).sum())
            total += len(chosen)
        return correct / max(total, 1)

    def evaluate(self, when: str, completed: int) -> Optional[dict]:
        return evaluate_policy(self.policy, self.tokenizer, self.eval_prompts, self.data_parallel, self.cfg.eval,
                               self.stop, "dpo", when, total_steps=self.cfg.train.steps,
                               on_stop=lambda: (completed, self.save(completed) if when == "after"
                                                else self.checkpoint))

    def save(self, step: int) -> Path:
        return save_training_checkpoint(self.cfg.run_dir, step, self.policy, self.optimizer, self.scheduler,
                                        self.policy_cfg, self.hf_config, self.tokenizer, kind="policy",
                                        trainer_state={"eval_before": self.eval_before},
                                        keep_last=self.cfg.train.keep_last)

    def finish(self, eval_after: Optional[dict], step_times: list[float], accuracy: float) -> dict:
        from nemo_dvpo.checkpointing.model_checkpoint import save_model_checkpoint

        run_dir = Path(self.cfg.run_dir)
        final = run_dir / "final"
        self.policy = finalize_policy(self.policy)
        save_model_checkpoint(self.policy, final, self.policy_cfg, self.hf_config, self.tokenizer, kind="policy",
                              extra={"step": self.cfg.train.steps, "algorithm": "dpo"})
        hf_dir = export_model_to_hf(self.policy, self.hf_config, self.tokenizer, run_dir / "hf",
                                    exported_from=str(final)) if self.cfg.export_hf else None
        return write_summary(run_dir, {"heldout_pair_accuracy": accuracy}, self.eval_before, eval_after, step_times,
                             final, hf_dir)

    def cleanup(self) -> None:
        self.logger.close()


def parse_config(cfg) -> DPORecipeConfig:
    return parse_recipe_config(cfg, DPORecipeConfig, "dpo")
