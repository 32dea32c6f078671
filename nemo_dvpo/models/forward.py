"""Forward passes through Megatron GPT models at any tensor/pipeline-parallel layout.

With pipeline parallelism only the last stage holds the model's output; Megatron's pipeline
schedule (``get_forward_backward_func``) moves activations between stages. The helpers here run
that schedule forward-only and hand the result to every rank, so callers never branch on the stage.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


@contextmanager
def logits_for_positions(model_chunk: torch.nn.Module, start: int, end: int) -> Iterator[None]:
    """Within the context, ``model_chunk`` projects only positions ``start:end`` to the vocabulary.

    A GPT returns logits (batch, end - start, vocab/TP) then. RLHF losses need logits only where
    they predict response tokens; the output layer and everything computed from its logits
    (log-softmax, entropy, their backward) is the largest per-token cost of a small model with a
    large vocabulary, so skipping the prompt positions saves time and the largest activation.
    Positions are absolute (sequence parallelism, which would shard them, is off in nemo_dvpo).
    No effect on pipeline stages without the output layer.
    """
    from nemo_dvpo.models.builder import unwrap_model

    gpt = unwrap_model(model_chunk)
    if not gpt.post_process:
        yield
        return

    def keep_positions(module, args, kwargs):
        hidden_states = args[0]  # (seq, batch, hidden)
        return (hidden_states[start:end], *args[1:]), kwargs

    handle = gpt.output_layer.register_forward_pre_hook(keep_positions, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def broadcast_from_last_pipeline_stage(tensor: Optional[torch.Tensor], shape: tuple[int, ...],
                                       dtype: torch.dtype) -> torch.Tensor:
    """Give every pipeline stage the tensor that only the last stage computed."""
    from megatron.core import parallel_state

    from nemo_dvpo.utils.distributed import compute_device

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tensor
    if not parallel_state.is_pipeline_last_stage():
        tensor = torch.empty(shape, dtype=dtype, device=compute_device())
    dist.broadcast(tensor, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return tensor


def forward_only(model: list[torch.nn.Module], tokens: torch.Tensor,
                 reduce_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 output_shape: tuple[int, ...], output_dtype: torch.dtype = torch.float32,
                 micro_batch_size: Optional[int] = None,
                 logit_span: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Run ``model`` over ``tokens`` (batch, seq) without gradients through the pipeline schedule.

    ``reduce_output(model_output, micro_batch_tokens)`` turns the last stage's raw output (the
    vocab-parallel logits of a GPT, or the values of a value model) into the per-micro-batch result;
    results are concatenated along the batch and returned on every rank with ``output_shape``, on the
    device ``tokens`` came on (the model runs on :func:`compute_device`). With ``logit_span``
    ``(start, end)`` a GPT's output covers only those positions (:func:`logits_for_positions`).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_dvpo.utils.distributed import compute_device

    input_device = tokens.device
    tokens = tokens.to(compute_device())
    batch_size, seq_length = tokens.shape
    micro_batch_size = micro_batch_size or batch_size
    micro_batches = list(torch.split(tokens, micro_batch_size))
    batches = iter(micro_batches)

    def forward_step(data_iterator, module):
        micro_tokens = next(data_iterator)
        if logit_span is None:
            output = module(micro_tokens, position_ids_for(micro_tokens), attention_mask=None)
        else:
            with logits_for_positions(module, *logit_span):
                output = module(micro_tokens, position_ids_for(micro_tokens), attention_mask=None)

        def collect(output_tensor, non_loss_data=True):
            return reduce_output(output_tensor, micro_tokens)

        return output, collect

    was_training = [module.training for module in model]
    for module in model:
        module.eval()
    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=batches,
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    for module, training in zip(model, was_training):
        module.train(training)
    from megatron.core import parallel_state

    local = torch.cat(results, dim=0) if parallel_state.is_pipeline_last_stage() else None
    return broadcast_from_last_pipeline_stage(local, output_shape, output_dtype).to(input_device)


def forward_standalone(model: list[torch.nn.Module], tokens: torch.Tensor,
                       reduce_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       tp_group: dist.ProcessGroup, micro_batch_size: Optional[int] = None) -> torch.Tensor:
    """Forward without gradients through a one-stage model on its own process groups (no pipeline).

    Every rank brings its own ``tokens`` (batch, seq), e.g. the rollout of its policy data-parallel
    rank, but the ranks of one tensor-parallel group must run the model on the same input. So the
    group gathers its members' batches, runs each distinct batch once (members that share a policy
    data-parallel rank bring the same one) and every rank keeps the result for its own batch, on the
    device its ``tokens`` came on. ``reduce_output`` is as in :func:`forward_only`.
    """
    from nemo_dvpo.models.builder import unwrap_model
    from nemo_dvpo.utils.distributed import compute_device

    if len(model) != 1 or not (unwrap_model(model[0]).pre_process and unwrap_model(model[0]).post_process):
        raise ValueError("forward_standalone needs a model with a single pipeline stage")
    module = model[0]
    input_device = tokens.device
    device = compute_device()
    tokens = tokens.to(device)
    group_size = tp_group.size()
    if group_size > 1:
        # Batches may differ in size between ranks: exchange shapes, then the batches padded to the largest.
        shapes = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(group_size)]
        dist.all_gather(shapes, torch.tensor(tokens.shape, dtype=torch.long, device=device), group=tp_group)
        shapes = [tuple(int(size) for size in shape) for shape in shapes]
        padded = torch.zeros(max(s[0] for s in shapes), max(s[1] for s in shapes), dtype=tokens.dtype, device=device)
        padded[:tokens.shape[0], :tokens.shape[1]] = tokens
        gathered = [torch.empty_like(padded) for _ in range(group_size)]
        dist.all_gather(gathered, padded, group=tp_group)
        batches = [batch[:rows, :columns] for batch, (rows, columns) in zip(gathered, shapes)]
    else:
        batches = [tokens]
    distinct: list[torch.Tensor] = []
    owner: list[int] = []
    for batch in batches:
        match = next((index for index, seen in enumerate(distinct)
                      if seen.shape == batch.shape and torch.equal(seen, batch)), None)
        if match is None:
            match = len(distinct)
            distinct.append(batch)
        owner.append(match)

    was_training = module.training
    module.eval()
    results = []
    with torch.no_grad():
        # Every member loops over the same distinct batches in the same order, so the
        # tensor-parallel collectives inside the model line up.
        for batch in distinct:
            outputs = [reduce_output(module(micro, position_ids_for(micro), attention_mask=None), micro)
                       for micro in torch.split(batch, micro_batch_size or batch.shape[0])]
            results.append(torch.cat(outputs, dim=0))
    module.train(was_training)
    return results[owner[tp_group.rank()]].to(input_device)


def full_logits(model: list[torch.nn.Module], tokens: torch.Tensor, vocab_size: Optional[int] = None,
                micro_batch_size: Optional[int] = None) -> torch.Tensor:
    """Full-vocabulary logits (batch, seq, vocab) in fp32 on every rank, for checks and evaluation.

    Training code should not use this: gathering the vocabulary dimension costs memory that the
    vocab-parallel log-prob functions avoid.
    """
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from nemo_dvpo.models.builder import padded_vocab_size

    padded = padded_vocab_size(model)
    vocab_size = vocab_size or padded

    def gather(logits: torch.Tensor, micro_tokens: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_model_parallel_region(logits.float())[..., :vocab_size]

    return forward_only(model, tokens, gather, (tokens.shape[0], tokens.shape[1], vocab_size),
                        micro_batch_size=micro_batch_size)
