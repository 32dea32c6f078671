"""Stage 1 of DVPO: train a Global Value Model (GVM) on preference data with a TD(lambda) loss - or, with
``train.objective=bradley_terry``, a reward model on the same data and readers (examples/train_reward_model.py,
the objective in :mod:`nemo_dvpo.recipes.reward_model`).

    python examples/train_gvm.py                                     # SmolLM2 on the shipped preference set
    python examples/train_gvm.py run_dir=runs/gvm resume=true        # continue a killed run
    torchrun --nproc-per-node 8 examples/train_gvm.py model=llama3_8b model.source=/models/Meta-Llama-3-8B \
        data.train=/data/uf_value.jsonl data.eval=/data/uf_test.jsonl parallel.tensor_model_parallel_size=4

``GVMRecipe.train()``, per step:
    1. the step's global batch (a function of the step, so a resumed run sees the same data);
    2. TD(lambda) targets from the GVM's own values (no gradient) - in the same forward pass, or
       from a separate no-grad pass when each batch is used for several updates;
    3. one optimizer step per pass on 0.5 * masked MSE(V, R) over response tokens;
    4. periodically: held-out pairwise accuracy; metrics (a checkpoint, or a stop, follows the step);
    5. at the end, the GVM saved with the value statistics of its training data, ready for stage 2.
The run's lifecycle is :class:`~nemo_dvpo.training.run.Run`; the losses are :mod:`nemo_dvpo.algorithms.gvm` and
:mod:`nemo_dvpo.algorithms.reward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from omegaconf import DictConfig

from nemo_dvpo.algorithms.gvm import gvm_loss, lambda_returns, terminal_rewards
from nemo_dvpo.checkpointing.model_checkpoint import load_hf_config_from_checkpoint, load_value_model
from nemo_dvpo.checkpointing.train_checkpoint import TrainedModel
from nemo_dvpo.data.preference import (
    PreferenceDataConfig,
    TokenizedPreferenceData,
    ValueBatch,
    collate_value_batch,
    load_preference_data,
)
from nemo_dvpo.data.splits import EpochStream
from nemo_dvpo.evaluation.value_accuracy import evaluate_pairs, value_statistics
from nemo_dvpo.models.builder import resolve_hf_config
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.models.forward import position_ids_for
from nemo_dvpo.models.lora import LoRAConfig, has_adapters, merge_adapters
from nemo_dvpo.models.value_model import token_values
from nemo_dvpo.recipes.config import parse_recipe_config
from nemo_dvpo.recipes.reward_model import BradleyTerryObjective
from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for
from nemo_dvpo.training.run import Run, check_global_batch
from nemo_dvpo.training.step import configure_for_training, train_step
from nemo_dvpo.training.stopping import GracefulStop
from nemo_dvpo.utils.distributed import ParallelConfig, compute_device, print_rank_zero
from nemo_dvpo.utils.errors import ConfigError


@dataclass
class GVMTrainConfig:
    # "td_lambda": the GVM's per-token regression onto the return of the final label (DVPO's stage 1);
    # "bradley_terry": a reward model, -log sigmoid(r_chosen - r_rejected) on the value at each response's last
    # token (pairwise data; a pair's two sequences always share a micro-batch).
    objective: Literal["td_lambda", "bradley_terry"] = "td_lambda"
    # Optimizer steps of the run (the learning-rate schedule spans them).
    steps: int = 200
    # Sequences per step over all data-parallel ranks; a pair contributes two sequences.
    global_batch_size: int = 32
    # Sequences per forward/backward pass on a rank (gradients accumulate over the step's micro-batches).
    micro_batch_size: int = 8
    # Optimizer steps per batch against fixed targets (the authors' code uses 2); 1 computes the
    # targets in the same forward pass, saving a forward.
    passes_per_batch: int = 1
    # TD(lambda)'s discount of the final label over the response's tokens (1: none, as the paper).
    gamma: float = 1.0
    # TD(lambda)'s lambda: how far each token's target looks ahead towards the final label.
    lam: float = 0.95
    # Seeds the data order and the value head's initialisation.
    seed: int = 1234
    # Measure held-out pairwise accuracy every N steps (and at the end).
    eval_every: int = 50
    # Checkpoint every N steps (and at the end).
    save_every: int = 50
    # Checkpoints kept: the newest N.
    keep_last: int = 2
    # Held-out pairs evaluated (the first N of data.eval).
    eval_max_pairs: int = 1000
    # Sequences per forward pass when evaluating.
    eval_micro_batch_size: int = 16
    # Training sequences whose value statistics are stored with the final GVM.
    value_stats_samples: int = 512

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "passes_per_batch", "eval_every",
                     "save_every", "eval_micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        # The objective's own constraints (a reward model's whole pairs) are checked here, at parse time.
        OBJECTIVES[self.objective](self)


@dataclass
class DataSplits:
    # Pairwise or scored preference data (nemo_dvpo.data.preference: a file, a folder or a hub id).
    train: str = "data/smollm2_ifeval/pairs_train.jsonl"
    # Held-out pairs whose pairwise accuracy is measured during training (null: none).
    eval: Optional[str] = "data/smollm2_ifeval/pairs_heldout.jsonl"
    # How records become sequences; a GVM trains on prompt + response of up to 512 tokens, prompts cut
    # from the left when longer (the response, which carries the label, is never cut).
    processing: PreferenceDataConfig = field(
        default_factory=lambda: PreferenceDataConfig(max_length=512, overlong="truncate_prompt"))


@dataclass
class GVMRecipeConfig:
    # The model: a preset (model=<name>, nemo_dvpo/conf/model/) whose fields model.<field>=... override.
    model: ModelConfig
    # Checkpoints, final/ (the model), metrics.jsonl, tensorboard/ and the summary go here.
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


class TDLambdaObjective:
    """DVPO's stage 1: every response token's value regresses onto the lambda-return of the final label,
    ``0.5 * masked MSE(V, R)`` (:func:`~nemo_dvpo.algorithms.gvm.gvm_loss`)."""

    kind = "gvm"
    # The held-out accuracy shown while training: the mean over response tokens.
    headline_accuracy = "mean"

    def __init__(self, train: GVMTrainConfig):
        self.gamma, self.lam, self.passes = train.gamma, train.lam, train.passes_per_batch

    def check_data(self, data: TokenizedPreferenceData, path: str) -> None:
        """Nothing to refuse: pairs (+1 / -1) and scored records alike give every response the final label
        whose return-to-go the values regress onto (the reward model, by contrast, needs pairs)."""

    def returns(self, values: torch.Tensor, batch: ValueBatch) -> torch.Tensor:
        return lambda_returns(values, terminal_rewards(batch.labels, batch.response_mask), batch.response_mask,
                              self.gamma, self.lam)

    def with_targets(self, model, micro_batches: list) -> list:
        """Targets from a no-grad pass, held fixed over a batch's several updates; with one pass they come from
        the training forward itself (None here), saving a forward."""
        if self.passes == 1:
            return micro_batches
        return [(batch, self.returns(token_values(model, batch.tokens), batch)) for batch, _ in micro_batches]

    def loss(self, values: torch.Tensor, batch: ValueBatch, fixed_returns: Optional[torch.Tensor]):
        returns = fixed_returns if fixed_returns is not None else self.returns(values, batch)
        loss = gvm_loss(values, returns, batch.response_mask)
        response_values = values.detach()[batch.response_mask]
        return loss, {"loss": loss.detach(), "value_mean": response_values.mean(),
                      "value_std": response_values.std(unbiased=False),
                      "return_mean": returns[batch.response_mask].mean()}


# ``train.objective`` -> what the value model learns.
OBJECTIVES = {"td_lambda": TDLambdaObjective, "bradley_terry": BradleyTerryObjective}


class GVMRecipe:
    """``__init__`` wires config -> run, data, value model, optimizer; ``train()`` is the numbered loop above."""

    def __init__(self, cfg: GVMRecipeConfig, stop: Optional[GracefulStop] = None):
        self.cfg = cfg
        self.objective = objective = OBJECTIVES[cfg.train.objective](cfg.train)
        self.run = run = Run(cfg, objective.kind, stop)
        train = cfg.train
        check_global_batch(train.global_batch_size, train.micro_batch_size, run.data_parallel.size)
        # Data: the policy's tokenizer and chat template, so GVM and policy see identical tokens.
        self.train_data = load_preference_data(cfg.data.train, cfg.data.processing, run.tokenizer,
                                               eos_token_id=run.eos_token_id)
        print_rank_zero(f"[{run.tag}] training data: {self.train_data.stats}")
        objective.check_data(self.train_data, cfg.data.train)
        self.eval_pairs = self.heldout_pairs() if cfg.data.eval else []
        self.sample_stream = EpochStream(self.train_data.groups, train.seed)
        # Model, optimizer, schedule.
        model_cfg = run.model_cfg
        hf_config = resolve_hf_config(model_cfg) if cfg.init_from is None else \
            load_hf_config_from_checkpoint(cfg.init_from)
        self.model = load_value_model(model_cfg, init_from=cfg.init_from, wrap_with_ddp=True,
                                       ddp_config=ddp_config_for(cfg.optim), seq_length=cfg.data.processing.max_length,
                                       lora=cfg.lora)
        optimizer, scheduler = build_optimizer(self.model, cfg.optim, train.steps * train.passes_per_batch)
        configure_for_training(self.model, optimizer)
        self.trained = TrainedModel(self.model, optimizer, scheduler, model_cfg, hf_config, objective.kind)
        run.track(self.trained, metadata={"gvm": self.gvm_metadata()})
        run.resume()
        self.last_accuracy: Optional[dict[str, float]] = None

    # -- data -------------------------------------------------------------------------------------

    def heldout_pairs(self) -> list[tuple]:
        data = load_preference_data(self.cfg.data.eval, self.cfg.data.processing, self.run.tokenizer,
                                    eos_token_id=self.run.eos_token_id)
        by_pair: dict[int, dict[bool, object]] = {}
        for sample in data.samples:
            if sample.pair_id is not None:
                by_pair.setdefault(sample.pair_id, {})[bool(sample.is_chosen)] = sample
        pairs = [(p[True], p[False]) for _, p in sorted(by_pair.items()) if True in p and False in p]
        print_rank_zero(f"[{self.run.tag}] held-out pairs: {len(pairs)} (evaluating on up to "
                        f"{self.cfg.train.eval_max_pairs})")
        return pairs[: self.cfg.train.eval_max_pairs]

    def step_samples(self, step: int) -> list:
        """This data-parallel rank's share of the step's global batch.

        The global batch is the slice ``[step * B, (step + 1) * B)`` of an endless stream of epochs, each
        a seeded permutation that keeps a pair's two sequences together: the data position is a function
        of the step alone.
        """
        batch_size = self.cfg.train.global_batch_size
        indices = self.run.data_parallel.shard(self.sample_stream.positions(step * batch_size,
                                                                            (step + 1) * batch_size))
        return [self.train_data.samples[index] for index in indices]

    def micro_batches(self, samples: list) -> list[tuple[ValueBatch, Optional[torch.Tensor]]]:
        """``(batch, fixed_targets)`` micro-batches; targets stay None until the objective fixes them."""
        # One padded length per step: the pipeline schedule exchanges fixed-shape activations.
        pad_to = max(len(sample.input_ids) for sample in samples)
        size = self.cfg.train.micro_batch_size
        return [(collate_value_batch(samples[i:i + size], self.run.pad_token_id, pad_to=pad_to), None)
                for i in range(0, len(samples), size)]

    def forward_step(self, micro_batch: tuple[ValueBatch, Optional[torch.Tensor]], chunk):
        """Megatron forward step: values on the last stage, the objective's loss."""
        batch, fixed_targets = micro_batch
        device = compute_device()
        batch = batch.to(device)
        fixed_targets = fixed_targets.to(device) if fixed_targets is not None else None
        output = chunk(batch.tokens, position_ids_for(batch.tokens), attention_mask=None)
        return output, lambda values: self.objective.loss(values.squeeze(-1).float(), batch, fixed_targets)

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> dict:
        run, train = self.run, self.cfg.train
        shown = ("train/loss", f"eval/accuracy_{self.objective.headline_accuracy}", "perf/tokens_per_s")
        with run.stopping():
            for step in run.steps(show=shown):
                timer = run.phase_timer()
                # 1. the step's batch
                micro_batches = self.micro_batches(self.step_samples(step))
                seq_length = micro_batches[0][0].tokens.shape[1]
                # 2. TD(lambda) targets (a separate no-grad pass only when the batch is reused)
                with timer("targets"):
                    micro_batches = self.objective.with_targets(self.model, micro_batches)
                # 3. optimizer step(s)
                with timer("update"):
                    for _ in range(train.passes_per_batch):
                        update = train_step(self.model, self.trained.optimizer, self.trained.scheduler, micro_batches,
                                            self.forward_step, seq_length=seq_length,
                                            micro_batch_size=train.micro_batch_size)
                tokens = sum(int(batch.tokens.numel()) for batch, _ in micro_batches) * run.data_parallel.size
                metrics = {f"train/{name}": value for name, value in update.items()} | timer.metrics()
                metrics["perf/tokens_per_s"] = tokens * train.passes_per_batch / metrics["time/step_s"]
                # 4. periodically the held-out accuracy; metrics (a checkpoint, or a stop, follows the step)
                completed = step + 1
                if self.eval_pairs and (completed % train.eval_every == 0 or completed == train.steps):
                    self.last_accuracy = self.evaluate()
                    metrics |= {f"eval/accuracy_{name}": value for name, value in self.last_accuracy.items()}
                run.log(step, metrics)
            # 5. the final model, with the value statistics of its training data
            if self.last_accuracy is None and self.eval_pairs:
                self.last_accuracy = self.evaluate()
            return self.finish()

    def evaluate(self) -> dict[str, float]:
        size = self.cfg.train.eval_micro_batch_size
        chosen = [pair[0] for pair in self.eval_pairs]
        rejected = [pair[1] for pair in self.eval_pairs]
        batch = lambda samples: [collate_value_batch(samples[i:i + size], self.run.pad_token_id)  # noqa: E731
                                 for i in range(0, len(samples), size)]
        accuracy, _, _ = evaluate_pairs(self.model, batch(chosen), batch(rejected))
        return accuracy

    def gvm_metadata(self, value_stats: Optional[dict] = None) -> dict:
        """What stage 2 reads of a GVM besides its weights (the checkpoint's ``gvm`` entry)."""
        train = self.cfg.train
        return {"gamma": train.gamma, "lam": train.lam, "value_stats": value_stats,
                "chat_template": self.cfg.data.processing.chat_template}

    def value_statistics(self) -> dict[str, float]:
        """The mean/std of the model's values over training responses (stage 2 may normalise by them)."""
        samples = self.train_data.samples[: self.cfg.train.value_stats_samples]
        size = self.cfg.train.eval_micro_batch_size
        values = []
        for start in range(0, len(samples), size):
            batch = collate_value_batch(samples[start:start + size], self.run.pad_token_id)
            values.append(token_values(self.model, batch.tokens)[batch.response_mask])
        values = torch.cat(values)
        return value_statistics(values, torch.ones_like(values, dtype=torch.bool))

    def finish(self) -> dict:
        """The final model - a plain value model for the policy recipes, scorers and servers (adapters merged
        into the trunk) - and ``summary.json``."""
        run, kind = self.run, self.objective.kind
        stats = self.value_statistics()
        if has_adapters(self.model):
            merge_adapters(self.model)
        accuracy = self.last_accuracy and {**self.last_accuracy, "pairs": len(self.eval_pairs)}
        final, _ = run.save_final(self.model, extra={"gvm": {**self.gvm_metadata(stats), "eval_accuracy": accuracy}})
        print_rank_zero(f"[{run.tag}] saved the {kind} {final} (value mean {stats['mean']:+.4f}, "
                        f"std {stats['std']:.4f})")
        return run.write_summary({"kind": kind, "checkpoint": str(final), "heldout_accuracy": accuracy,
                                  "value_stats": stats})

    def cleanup(self) -> None:
        self.run.cleanup()
