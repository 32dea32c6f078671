"""Epochs of optimizer steps over shuffled mini-batches of a :class:`Trajectory` (PPO's inner loop).

A loss here is a function of the model's per-token outputs, one micro-batch of the trajectory and the
**global** number of response tokens in the mini-batch (over all micro-batches and data-parallel ranks),
as in NeMo-RL: it returns ``sum over its tokens / global count``, so the mini-batch's loss is an exact
token mean however the tokens fall into micro-batches and ranks. Megatron's pipeline schedule divides
each micro-batch's loss by their number and DDP averages gradients over ranks; this module undoes both
(:func:`minibatch_update`), so a loss function never has to know about them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from nemo_dvpo.rlhf.trajectory import Trajectory
from nemo_dvpo.training.data_parallel import DataParallel
from nemo_dvpo.utils.seeding import derive_seed

# loss(outputs, micro_batch, global_tokens) -> (loss, metrics to log); see the module docstring.
TokenLoss = Callable[[dict[str, torch.Tensor], Trajectory, torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class MiniBatchSchedule:
    epochs: int
    # Sequences per optimizer step, over all data-parallel ranks.
    mini_batch_size: int
    # Sequences per forward/backward pass on a rank (gradient accumulation over the rest).
    micro_batch_size: int


@dataclass(frozen=True)
class LogprobOutputs:
    """A GPT's outputs as the loss sees them: ``logprobs`` of the trajectory's tokens (and ``entropy``)."""

    vocab_size: int
    temperature: float = 1.0
    # "loss": the entropy with its gradient, every epoch; "log": without gradient, first epoch only.
    entropy: Literal["none", "log", "loss"] = "none"


@dataclass(frozen=True)
class ValueOutputs:
    """A value model's outputs as the loss sees them: ``values`` at every position."""


def _forward_step(outputs, scale: float, global_tokens: torch.Tensor, loss: TokenLoss, epoch: int):
    from nemo_dvpo.models.forward import logits_for_positions, position_ids_for
    from nemo_dvpo.models.logprobs import (
        at_token_positions,
        predictive_entropies,
        response_logit_span,
        target_logprobs,
    )
    from nemo_dvpo.utils.distributed import compute_device

    def forward_step(micro_batch: Trajectory, chunk):
        micro_batch = Trajectory(*(None if field is None else field.to(compute_device()) for field in micro_batch))
        tokens = micro_batch.tokens
        if isinstance(outputs, ValueOutputs):
            output = chunk(tokens, position_ids_for(tokens), attention_mask=None)

            def to_outputs(values: torch.Tensor) -> dict[str, torch.Tensor]:
                return {"values": values.squeeze(-1).float()}
        else:
            # Logits only where they predict response tokens; prompt positions need none.
            start, end = response_logit_span(micro_batch.response_mask)
            with logits_for_positions(chunk, start, end):
                output = chunk(tokens, position_ids_for(tokens), attention_mask=None)

            def to_outputs(logits: torch.Tensor) -> dict[str, torch.Tensor]:
                result = {}
                # Before the log-probs: megatron's cross entropy then reuses the logits' memory in place.
                if outputs.entropy == "loss":
                    result["entropy"] = at_token_positions(
                        predictive_entropies(logits, outputs.vocab_size, outputs.temperature), start)
                elif outputs.entropy == "log" and epoch == 0:
                    with torch.no_grad():
                        result["entropy"] = at_token_positions(
                            predictive_entropies(logits.detach(), outputs.vocab_size, outputs.temperature), start)
                result["logprobs"] = at_token_positions(
                    target_logprobs(logits, tokens[:, start + 1:], outputs.vocab_size, outputs.temperature,
                                    overwrite_logits=True), start)
                return result

        def loss_func(output_tensor: torch.Tensor):
            value, metrics = loss(to_outputs(output_tensor), micro_batch, global_tokens)
            # The schedule divides by the number of micro-batches and DDP averages over ranks: undo both.
            return value * scale, metrics

        return output, loss_func

    return forward_step


def minibatch_update(model: list[torch.nn.Module], optimizer, scheduler, trajectory: Trajectory, loss: TokenLoss,
                     *, outputs: LogprobOutputs | ValueOutputs, schedule: MiniBatchSchedule,
                     data_parallel: DataParallel, seed: tuple, pipelined: Optional[bool] = None) -> dict[str, float]:
    """``schedule.epochs`` passes of one optimizer step per mini-batch; returns metrics averaged over steps.

    Each rank shuffles its own rows (seeded by ``seed`` + epoch + rank) and takes ``mini_batch_size /
    data-parallel size`` of them per step. Without pipeline stages, each micro-batch is cut to the
    longest of its rows (causal attention makes trailing padding invisible to earlier tokens).
    """
    from megatron.core import parallel_state

    from nemo_dvpo.training.step import train_step

    if pipelined is None:
        pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    local_rows, seq_length = trajectory.tokens.shape
    per_rank = schedule.mini_batch_size // data_parallel.size
    num_micro = per_rank // schedule.micro_batch_size
    scale = float(num_micro * data_parallel.size)
    collected: list[dict[str, float]] = []
    for epoch in range(schedule.epochs):
        order = torch.randperm(local_rows, generator=torch.Generator().manual_seed(
            derive_seed(*seed, epoch, data_parallel.rank)))
        for start in range(0, local_rows, per_rank):
            mini = order[start:start + per_rank]
            global_tokens = data_parallel.sum(trajectory.response_mask[mini].sum().float())
            micro_batches = []
            for micro_start in range(0, per_rank, schedule.micro_batch_size):
                rows = mini[micro_start:micro_start + schedule.micro_batch_size]
                length = seq_length if pipelined else int(trajectory.sequence_lengths[rows].max())
                micro_batches.append(trajectory.rows(rows, length))
            collected.append(train_step(model, optimizer, scheduler, micro_batches,
                                        _forward_step(outputs, scale, global_tokens, loss, epoch),
                                        seq_length=seq_length, micro_batch_size=schedule.micro_batch_size))
    names = sorted({name for metrics in collected for name in metrics})
    return {name: sum(m[name] for m in collected if name in m) / sum(name in m for m in collected)
            for name in names}
