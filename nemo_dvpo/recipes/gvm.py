"""Stage 1 of DVPO: train a Global Value Model (GVM) on preference data with a TD(lambda) loss - or, with
``train.objective=bradley_terry``, a reward model on the same data and readers (examples/train_reward_model.py).

    python examples/train_gvm.py                                     # SmolLM2 on the shipped preference set
    python examples/train_gvm.py run_dir=runs/gvm resume=true        # continue a killed run
    torchrun --nproc-per-node 8 examples/train_gvm.py model=llama3_8b model.source=/models/Meta-Llama-3-8B \
        data.train=/data/uf_value.jsonl data.eval=/data/uf_test.jsonl parallel.tensor_model_parallel_size=4

The loop, per step:
    1. take the step's global batch (a function of the step, so a resumed run sees the same data);
    2. TD(lambda) targets from the GVM's own values (no gradient) - in the same forward pass, or
       from a separate no-grad pass when each batch is used for several updates;
    3. one optimizer step per pass on 0.5 * masked MSE(V, R) over response tokens;
    4. periodically: held-out pairwise accuracy, metrics, an atomic checkpoint.
At the end the GVM is saved with the value statistics of its training data, ready for stage 2.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from omegaconf import DictConfig

from nemo_dvpo.algorithms.gvm import gvm_loss, lambda_returns, last_response_index, terminal_rewards
from nemo_dvpo.algorithms.reward import bradley_terry_loss, pair_rows
from nemo_dvpo.checkpointing.model_checkpoint import load_value_model, read_checkpoint_model_config, save_model_checkpoint
from nemo_dvpo.checkpointing.run_dir import check_resumed_model, prepare_run_dir
from nemo_dvpo.checkpointing.train_checkpoint import load_training_checkpoint, save_training_checkpoint
from nemo_dvpo.data.preference import (
    PreferenceDataConfig,
    ValueBatch,
    collate_value_batch,
    load_preference_data,
)
from nemo_dvpo.data.splits import EpochStream
from nemo_dvpo.evaluation.value_accuracy import evaluate_pairs, value_statistics
from nemo_dvpo.models.builder import resolve_hf_config
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.recipes.config import parse_recipe_config
from nemo_dvpo.models.forward import position_ids_for
from nemo_dvpo.models.sources import load_tokenizer
from nemo_dvpo.models.lora import LoRAConfig, has_adapters, merge_adapters
from nemo_dvpo.models.value_model import token_values
from nemo_dvpo.training.metrics import MetricsLogger, peak_memory_mib, progress_bar
from nemo_dvpo.training.data_parallel import DataParallel
from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for
from nemo_dvpo.training.step import configure_for_training, train_step
from nemo_dvpo.training.stopping import GracefulStop, stopped_message
from nemo_dvpo.utils.distributed import (
    ParallelConfig,
    compute_device,
    destroy_distributed,
    initialize_distributed,
    print_rank_zero,
)
from nemo_dvpo.utils.errors import ConfigError, TrainingStopped


@dataclass
class GVMTrainConfig:
    # "td_lambda": the GVM's per-token regression onto the return of the final label (DVPO's stage 1);
    # "bradley_terry": a reward model, -log sigmoid(r_chosen - r_rejected) on the value at each response's last
    # token (pairwise data; a pair's two sequences always share a micro-batch).
    objective: Literal["td_lambda", "bradley_terry"] = "td_lambda"
    steps: int = 200
    # Sequences per step over all data-parallel ranks; a pair contributes two sequences.
    global_batch_size: int = 32
    micro_batch_size: int = 8
    # Optimizer steps per batch against fixed targets (the authors' code uses 2); 1 computes the
    # targets in the same forward pass, saving a forward.
    passes_per_batch: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    seed: int = 1234
    eval_every: int = 50
    save_every: int = 50
    keep_last: int = 2
    eval_max_pairs: int = 1000
    eval_micro_batch_size: int = 16
    # Training sequences whose value statistics are stored with the final GVM.
    value_stats_samples: int = 512

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "passes_per_batch", "eval_every",
                     "save_every", "eval_micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.objective == "bradley_terry" and (self.micro_batch_size % 2 or self.passes_per_batch != 1):
            raise ConfigError("train.objective=bradley_terry needs an even train.micro_batch_size (whole pairs) and "
                              "train.passes_per_batch=1")

    @property
    def kind(self) -> str:
        """What the trained model is, as its checkpoints say."""
        return "reward_model" if self.objective == "bradley_terry" else "gvm"


@dataclass
class DataSplits:
    # Pairwise or scored preference data (nemo_dvpo.data.preference); eval: held-out pairs (null: none).
    train: str = "data/smollm2_ifeval/pairs_train.jsonl"
    eval: Optional[str] = "data/smollm2_ifeval/pairs_heldout.jsonl"
    # How records become sequences; a GVM trains on prompt + response of up to 512 tokens, prompts cut
    # from the left when longer (the response, which carries the label, is never cut).
    processing: PreferenceDataConfig = field(
        default_factory=lambda: PreferenceDataConfig(max_length=512, overlong="truncate_prompt"))


@dataclass
class GVMRecipeConfig:
    model: ModelConfig
    run_dir: str = "runs/gvm"
    # Continue from run_dir/checkpoints/latest (same data order, optimizer and schedule state).
    resume: bool = False
    # Continue from this checkpoint of the run instead of the latest (e.g. when the latest is damaged).
    resume_from: Optional[str] = None
    # Start over in a run_dir that already holds a run, removing that run's own files (nothing else).
    overwrite: bool = False
    # A nemo_dvpo checkpoint for the trunk (e.g. an SFT policy); null takes model.source.
    init_from: Optional[str] = None
    data: DataSplits = field(default_factory=DataSplits)
    train: GVMTrainConfig = field(default_factory=GVMTrainConfig)
    # Peak lr 1e-5 with 10 warm-up steps, cosine decay to 1e-6.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=10))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # LoRA adapters on the trunk (lora.enabled=true): they and the value head train, the trunk stays frozen.
    lora: LoRAConfig = field(default_factory=LoRAConfig)


def parse_config(cfg: DictConfig) -> GVMRecipeConfig:
    return parse_recipe_config(cfg, GVMRecipeConfig, "gvm")


def bradley_terry_loss_and_metrics(values: torch.Tensor, batch: ValueBatch):
    """A reward model's loss on a micro-batch of whole pairs: the value at each response's last token is its
    reward (:mod:`nemo_dvpo.algorithms.reward`)."""
    chosen, rejected = pair_rows(batch.pair_ids.cpu(), batch.is_chosen.cpu())
    rewards = values.gather(1, last_response_index(batch.response_mask)[:, None]).squeeze(1)
    result = bradley_terry_loss(rewards[chosen.to(values.device)], rewards[rejected.to(values.device)])
    return result.loss, {"loss": result.loss.detach(), "pair_accuracy": result.accuracy, "reward_margin": result.margin,
                         "reward_mean": rewards.detach().mean()}


class GVMRecipe:
    """Wires config -> model, data, optimizer; ``train()`` is the numbered loop of the docstring."""

    def __init__(self, cfg: GVMRecipeConfig, stop: Optional[GracefulStop] = None):
        self.cfg = cfg
        self.stop = stop or GracefulStop()
        model_cfg = cfg.model
        initialize_distributed(cfg.parallel, num_attention_heads=model_cfg.num_attention_heads,
                               num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
        if cfg.init_from is not None:
            # The trunk's shape is the checkpoint's; the config chooses how it runs.
            model_cfg = read_checkpoint_model_config(cfg.init_from, run_as=model_cfg)
        self.model_cfg = model_cfg
        checkpoint = prepare_run_dir(cfg.run_dir, resume=cfg.resume, overwrite=cfg.overwrite,
                                     resume_from=cfg.resume_from)
        if checkpoint is not None:
            check_resumed_model(checkpoint, model_cfg)
        self.data_parallel = DataParallel.from_parallel_state()
        self.dp_size = self.data_parallel.size
        train = cfg.train
        per_rank, remainder = divmod(train.global_batch_size, self.dp_size)
        if remainder or per_rank % train.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size} must split into data-parallel size "
                f"{self.dp_size} x micro-batches of train.micro_batch_size={train.micro_batch_size}")

        # Data: the policy's tokenizer and chat template, so GVM and policy see identical tokens.
        self.tokenizer = load_tokenizer(model_cfg.tokenizer_source)
        self.eos_token_id = model_cfg.eos_token_id if model_cfg.eos_token_id is not None else \
            self.tokenizer.eos_token_id
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.eos_token_id
        self.train_data = load_preference_data(cfg.data.train, cfg.data.processing, self.tokenizer,
                                               eos_token_id=self.eos_token_id)
        print_rank_zero(f"[gvm] training data: {self.train_data.stats}")
        if train.objective == "bradley_terry" and any(sample.pair_id is None for sample in self.train_data.samples):
            raise ConfigError(f"train.objective=bradley_terry learns from pairs, but {cfg.data.train} holds scored "
                              "records (prompt / response / score): give pairwise data (prompt / chosen / rejected)")
        self.eval_pairs = self._eval_pairs() if cfg.data.eval else []
        self.sample_stream = EpochStream(self.train_data.groups, cfg.train.seed)

        # Model, optimizer, schedule.
        self.hf_config = resolve_hf_config(model_cfg) if cfg.init_from is None else None
        self.model = load_value_model(model_cfg, init_from=cfg.init_from, wrap_with_ddp=True,
                                       ddp_config=ddp_config_for(cfg.optim), seq_length=cfg.data.processing.max_length,
                                       lora=cfg.lora)
        if self.hf_config is None:
            from nemo_dvpo.checkpointing.model_checkpoint import load_hf_config_from_checkpoint
            self.hf_config = load_hf_config_from_checkpoint(cfg.init_from)
        total_updates = train.steps * train.passes_per_batch
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, total_updates)
        configure_for_training(self.model, self.optimizer)

        self.start_step = 0
        self.last_accuracy: Optional[dict[str, float]] = None
        if cfg.resume and checkpoint is None:
            print_rank_zero(f"[gvm] resume=true but {cfg.run_dir} has no checkpoint yet: starting fresh")
        if checkpoint is not None:
            state = load_training_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
            self.start_step = state["step"]
            print_rank_zero(f"[gvm] resumed from {checkpoint} at step {self.start_step}")
        self.logger = MetricsLogger(cfg.run_dir, resume_step=self.start_step if checkpoint else None)

    @property
    def headline_accuracy(self) -> str:
        """The held-out accuracy shown while training: a reward model is read at the last token."""
        return "last" if self.cfg.train.objective == "bradley_terry" else "mean"

    # -- data -------------------------------------------------------------------------------------

    def _eval_pairs(self) -> list[tuple]:
        data = load_preference_data(self.cfg.data.eval, self.cfg.data.processing, self.tokenizer,
                                    eos_token_id=self.eos_token_id)
        by_pair: dict[int, dict[bool, object]] = {}
        for sample in data.samples:
            if sample.pair_id is not None:
                by_pair.setdefault(sample.pair_id, {})[bool(sample.is_chosen)] = sample
        pairs = [(p[True], p[False]) for _, p in sorted(by_pair.items()) if True in p and False in p]
        print_rank_zero(f"[gvm] held-out pairs: {len(pairs)} (evaluating on up to {self.cfg.train.eval_max_pairs})")
        return pairs[: self.cfg.train.eval_max_pairs]

    def step_samples(self, step: int) -> list:
        """This data-parallel rank's share of the step's global batch.

        The global batch is the slice ``[step * B, (step + 1) * B)`` of an endless stream of epochs, each
        a seeded permutation that keeps a pair's two sequences together: the data position is a function
        of the step alone.
        """
        batch_size = self.cfg.train.global_batch_size
        indices = self.data_parallel.shard(self.sample_stream.positions(step * batch_size, (step + 1) * batch_size))
        return [self.train_data.samples[index] for index in indices]

    def micro_batches(self, samples: list) -> list[tuple[ValueBatch, Optional[torch.Tensor]]]:
        """``(batch, fixed_returns)`` micro-batches; returns stay None when computed in the forward."""
        # One padded length per step: the pipeline schedule exchanges fixed-shape activations.
        pad_to = max(len(sample.input_ids) for sample in samples)
        size = self.cfg.train.micro_batch_size
        return [(collate_value_batch(samples[i:i + size], self.pad_token_id, pad_to=pad_to), None)
                for i in range(0, len(samples), size)]

    # -- loss -------------------------------------------------------------------------------------

    def forward_step(self, micro_batch: tuple[ValueBatch, Optional[torch.Tensor]], chunk):
        """Megatron forward step: values on the last stage, TD(lambda) loss against fixed targets."""
        train = self.cfg.train
        batch, fixed_returns = micro_batch
        device = compute_device()
        batch = batch.to(device)
        fixed_returns = fixed_returns.to(device) if fixed_returns is not None else None
        output = chunk(batch.tokens, position_ids_for(batch.tokens), attention_mask=None)

        def loss_func(values: torch.Tensor):
            values = values.squeeze(-1).float()
            if train.objective == "bradley_terry":
                return bradley_terry_loss_and_metrics(values, batch)
            returns = fixed_returns if fixed_returns is not None else lambda_returns(
                values, terminal_rewards(batch.labels, batch.response_mask), batch.response_mask,
                train.gamma, train.lam)
            loss = gvm_loss(values, returns, batch.response_mask)
            response_values = values.detach()[batch.response_mask]
            return loss, {"loss": loss.detach(), "value_mean": response_values.mean(),
                          "value_std": response_values.std(unbiased=False),
                          "return_mean": returns[batch.response_mask].mean()}

        return output, loss_func

    def with_fixed_targets(self, micro_batches: list) -> list:
        """Targets from a no-grad pass, held fixed over the batch's several updates."""
        train = self.cfg.train
        fixed = []
        for batch, _ in micro_batches:
            values = token_values(self.model, batch.tokens)
            fixed.append((batch, lambda_returns(values, terminal_rewards(batch.labels, batch.response_mask),
                                                batch.response_mask, train.gamma, train.lam)))
        return fixed

    # -- loop -------------------------------------------------------------------------------------

    def train(self) -> None:
        with self.stop:
            self._train()

    def _train(self) -> None:
        train = self.cfg.train
        shown_accuracy = float("nan")
        with progress_bar(train.steps, initial=self.start_step, description="gvm") as bar:
            for step in range(self.start_step, train.steps):
                started = time.perf_counter()
                # step 1. the step's batch
                micro_batches = self.micro_batches(self.step_samples(step))
                seq_length = micro_batches[0][0].tokens.shape[1]
                # step 2. TD(lambda) targets (a separate no-grad pass only when the batch is reused)
                if train.passes_per_batch > 1:
                    micro_batches = self.with_fixed_targets(micro_batches)
                # step 3. optimizer step(s)
                for _ in range(train.passes_per_batch):
                    metrics = train_step(self.model, self.optimizer, self.scheduler, micro_batches, self.forward_step,
                                         seq_length=seq_length, micro_batch_size=train.micro_batch_size)
                elapsed = time.perf_counter() - started
                tokens = sum(int(batch.tokens.numel()) for batch, _ in micro_batches) * self.dp_size
                metrics.update({"tokens_per_s": tokens * train.passes_per_batch / elapsed, "step_time_s": elapsed,
                                "peak_memory_mib": peak_memory_mib()})
                completed = step + 1
                # step 4. evaluation, logging, checkpoints
                if self.eval_pairs and (completed % train.eval_every == 0 or completed == train.steps):
                    self.last_accuracy = self.evaluate()
                    metrics.update({f"eval/accuracy_{name}": value for name, value in self.last_accuracy.items()})
                    shown_accuracy = metrics[f"eval/accuracy_{self.headline_accuracy}"]
                self.logger.log(completed, {name if "/" in name else f"train/{name}": value
                                            for name, value in metrics.items()})
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", held_out_acc=f"{shown_accuracy:.3f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                checkpoint = None
                if completed % train.save_every == 0 and completed < train.steps:
                    checkpoint = self.save_training(completed)
                # Every rank asks at the same point, so one rank's signal stops all of them after this step.
                if completed < train.steps and self.stop.should_stop():
                    raise TrainingStopped(stopped_message("gvm", self.stop.signal_name, completed, train.steps,
                                                          checkpoint or self.save_training(completed)))
        if self.last_accuracy is None and self.eval_pairs:
            self.last_accuracy = self.evaluate()
        self.save_final(self.last_accuracy)

    def evaluate(self) -> dict[str, float]:
        size = self.cfg.train.eval_micro_batch_size
        chosen = [pair[0] for pair in self.eval_pairs]
        rejected = [pair[1] for pair in self.eval_pairs]
        batch = lambda samples: [collate_value_batch(samples[i:i + size], self.pad_token_id)  # noqa: E731
                                 for i in range(0, len(samples), size)]
        accuracy, _, _ = evaluate_pairs(self.model, batch(chosen), batch(rejected))
        return accuracy

    def save_training(self, step: int) -> Path:
        return save_training_checkpoint(self.cfg.run_dir, step, self.model, self.optimizer, self.scheduler,
                                        self.model_cfg, self.hf_config, self.tokenizer, kind=self.cfg.train.kind,
                                        trainer_state={}, metadata={"gvm": self._gvm_metadata()},
                                        keep_last=self.cfg.train.keep_last)

    def _gvm_metadata(self, value_stats: Optional[dict] = None) -> dict:
        train = self.cfg.train
        return {"gamma": train.gamma, "lam": train.lam, "value_stats": value_stats,
                "chat_template": self.cfg.data.processing.chat_template}

    def save_final(self, eval_accuracy: Optional[dict[str, float]] = None) -> None:
        """The final GVM, with the mean/std of its values over training responses for stage 2."""
        samples = self.train_data.samples[: self.cfg.train.value_stats_samples]
        size = self.cfg.train.eval_micro_batch_size
        values, masks = [], []
        for start in range(0, len(samples), size):
            batch = collate_value_batch(samples[start:start + size], self.pad_token_id)
            values.append(token_values(self.model, batch.tokens)[batch.response_mask])
            masks.append(torch.ones_like(values[-1], dtype=torch.bool))
        stats = value_statistics(torch.cat(values), torch.cat(masks))
        final = Path(self.cfg.run_dir) / "final"
        # A plain value model for the policy recipes, scorers and servers: adapters merged into the trunk.
        if has_adapters(self.model):
            merge_adapters(self.model)
        save_model_checkpoint(self.model, final, self.model_cfg, self.hf_config, self.tokenizer,
                              kind=self.cfg.train.kind,
                              extra={"gvm": {**self._gvm_metadata(stats), "eval_accuracy": eval_accuracy and {
                                  **eval_accuracy, "pairs": len(self.eval_pairs)}},
                                     "step": self.cfg.train.steps})
        print_rank_zero(f"[gvm] saved the {self.cfg.train.kind} {final} (value mean {stats['mean']:+.4f}, "
                        f"std {stats['std']:.4f})")

    def cleanup(self) -> None:
        self.logger.close()
        destroy_distributed()

