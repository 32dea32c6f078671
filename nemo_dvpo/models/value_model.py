"""The Global Value Model: a megatron-core GPT whose output layer is a per-token value head.

The trunk is the policy's architecture (any preset, any TP/PP); on the last pipeline stage the
vocabulary projection is replaced by a ``hidden -> 1`` linear head, so ``model(tokens, ...)``
returns values of shape (batch, seq, 1) where a GPT returns logits. The head

* computes in fp32 even when the trunk runs in bf16: its input, the final hidden state, is cast to fp32
  and so are its weights (the targets are small returns around +-1, and a bf16 output's 8-bit mantissa
  would quantise them). A frozen model keeps the head's parameters in fp32; a model being trained in
  bf16 holds them in bf16 like the trunk, with fp32 master weights in the optimizer (see
  :func:`attach_value_head` for why),
* is zero-initialised (every token starts at value 0, the midpoint of the +-1 labels), and
* is replicated across tensor-parallel ranks: its input, the final hidden state, is identical on
  every TP rank, so the head's gradients are too.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from nemo_dvpo.models.builder import build_gpt_model, params_dtype, unwrap_model
from nemo_dvpo.models.config import ModelConfig


# Checkpoint kinds that hold a trunk *and* a value head (a policy checkpoint holds a trunk with an LM head).
VALUE_MODEL_KINDS = ("gvm", "reward_model", "critic")


class ValueHead(torch.nn.Module):
    """Stands in for ``GPTModel.output_layer``: same call signature, one output per token.

    Its parameters are named ``weight`` and ``bias`` because megatron-core's language-model
    checkpointing expects ``output_layer.weight`` on the last stage.
    """

    # With LoRA the trunk is frozen but the head, new and tiny, trains fully (nemo_dvpo.models.lora).
    lora_trains_fully = True

    def __init__(self, hidden_size: int, tp_group=None, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        # The model's tensor-parallel group (checkpoint replica ids); None means the global one.
        self.tp_group = tp_group
        self.weight = torch.nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))

    def forward(self, hidden_states: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        # fp32 arithmetic whatever the parameters' dtype (``.float()`` is free on fp32 tensors); the
        # gradient of bf16 parameters is rounded to bf16 once, as the trunk's are.
        values = torch.nn.functional.linear(hidden_states.float(), self.weight.float(), self.bias.float())
        return values, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
        from megatron.core.utils import get_tensor_model_parallel_group_if_none

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        # Empty axis map: replicated across tensor-parallel ranks.
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                   sharded_offsets,
                                                   tp_group=get_tensor_model_parallel_group_if_none(self.tp_group),
                                                   dp_cp_group=metadata["dp_cp_group"])


def attach_value_head(model: list[torch.nn.Module], dtype: torch.dtype = torch.float32) -> list[torch.nn.Module]:
    """Replace the vocabulary projection of each last-stage chunk with a fresh :class:`ValueHead` whose
    parameters are ``dtype`` (its arithmetic is fp32 either way).

    A model that will be trained in bf16/fp16 takes the trunk's dtype for the head: megatron-core
    0.16.1's mixed-precision optimizers keep fp32 master weights for every half-precision parameter, but
    cannot checkpoint a model that mixes half-precision and fp32 parameters (the fp16/bf16 optimizer
    maps only its half-precision parameters to checkpoint keys, and the distributed optimizer's
    data-parallel-reshardable state assumes one buffer dtype). With one dtype both save and resume
    through megatron-core's own code, and the head is still updated in fp32 (its master weights) and
    computed in fp32; only the forward's copy of the weights is rounded, like the bf16 hidden state it
    multiplies. A frozen model keeps an fp32 head, so loading an fp32 head rounds nothing.
    """
    for chunk in model:
        gpt = unwrap_model(chunk)
        # Every stage must agree: with tied embeddings Megatron all-reduces the embedding gradient
        # between the first and last stage, and the last stage no longer holds an embedding copy.
        gpt.share_embeddings_and_output_weights = False
        if gpt.post_process:
            # On the trunk's device: a model built on the GPU is not moved again unless DDP wraps it (a frozen GVM
            # is not), and a head left on the CPU fails its first forward there.
            gpt.output_layer = ValueHead(gpt.config.hidden_size, tp_group=gpt.pg_collection.tp, dtype=dtype,
                                         device=next(gpt.parameters()).device)
    return model


def value_head(model: list[torch.nn.Module]) -> Optional[ValueHead]:
    """The value head on this rank (None on pipeline stages before the last)."""
    gpt = unwrap_model(model[-1])
    return gpt.output_layer if gpt.post_process else None


def build_value_model(model_cfg: ModelConfig, *, wrap_with_ddp: bool = False, ddp_config=None,
                      seq_length: Optional[int] = None, pg_collection=None, lora=None, hf_config=None,
                      load_weights: Optional[Callable[[list[torch.nn.Module]], None]] = None,
                      restores_head: bool = False) -> list[torch.nn.Module]:
    """A GVM at the current TP/PP layout, or on its own process groups when ``pg_collection`` is given.

    Its trunk comes from ``model_cfg.source`` (an HF folder, hub id or GGUF file) with a fresh (zero) head,
    unless ``load_weights`` fills the model from elsewhere (with ``hf_config``, the model's HF config): a
    trunk's weights before the head is attached, or trunk and head after it (``restores_head``). Loading
    from a nemo_dvpo checkpoint is :func:`nemo_dvpo.checkpointing.model_checkpoint.load_value_model`'s.
    An enabled ``lora`` (:class:`nemo_dvpo.models.lora.LoRAConfig`) adds adapters to the trunk after loading.
    A model wrapped for training (``wrap_with_ddp``) holds its head in ``model_cfg.precision``, a frozen one
    in fp32 (:func:`attach_value_head`).
    """
    head_dtype = params_dtype(model_cfg.precision) if wrap_with_ddp else torch.float32
    if load_weights is None:
        transform = lambda model: attach_value_head(model, head_dtype)  # noqa: E731
    elif restores_head:
        def transform(model):
            attach_value_head(model, head_dtype)
            load_weights(model)
            return model
    else:
        def transform(model):
            # The trunk's own output layer is loaded and then discarded by the head swap.
            load_weights(model)
            return attach_value_head(model, head_dtype)
    return build_gpt_model(model_cfg, hf_config=hf_config, load_weights=load_weights is None,
                           wrap_with_ddp=wrap_with_ddp, ddp_config=ddp_config, seq_length=seq_length,
                           transform=transform, pg_collection=pg_collection, lora=lora)


def token_values(model: list[torch.nn.Module], tokens: torch.Tensor,
                 micro_batch_size: Optional[int] = None, pg_collection=None) -> torch.Tensor:
    """Per-token values (batch, seq) in fp32 on every rank, without gradients.

    A model built on its own process groups (``pg_collection``) takes each rank's own ``tokens``.
    """
    from nemo_dvpo.models.forward import forward_only, forward_standalone

    def to_values(values: torch.Tensor, micro_tokens: torch.Tensor) -> torch.Tensor:
        return values.squeeze(-1).float()

    if pg_collection is not None:
        return forward_standalone(model, tokens, to_values, pg_collection.tp, micro_batch_size=micro_batch_size)
    return forward_only(model, tokens, to_values, tuple(tokens.shape), micro_batch_size=micro_batch_size)


def canonical_length(length: int, bucket: int) -> int:
    """The padded length a sequence of ``length`` tokens is always scored at: the next multiple of ``bucket``.

    It depends on nothing else - not on the model's own sequence length - so a GVM in this process and
    one behind a server score alike (build the model for a multiple of ``bucket``).
    """
    return -(-max(length, 1) // bucket) * bucket


def sequence_values(model: list[torch.nn.Module], tokens: torch.Tensor, lengths: torch.Tensor, *, rows: int = 8,
                    bucket: int = 64, pg_collection=None, pad_token_id: int = 0) -> torch.Tensor:
    """Per-token values (batch, seq) of right-padded sequences, each computed in a shape fixed by its length.

    Matrix kernels choose their arithmetic by shape, so the same sequence scored in batches of other
    sizes or lengths differs in the last bits. Here every sequence is scored in a micro-batch of exactly
    ``rows`` rows of :func:`canonical_length` tokens (filled with other sequences of that length class or
    with padding rows), so its values are bit-identical whatever it is batched with - alone, padded, or
    merged with other requests by the GVM server. Values past a row's length are 0.

    Collective like :func:`token_values`: every rank of the model's parallel group calls it (with the
    group's common ``tokens``; on a model with its own process groups, each rank with its own).
    """
    from nemo_dvpo.models.builder import unwrap_model

    if tokens.dim() != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"expected tokens (batch, seq) and lengths (batch,), got {tuple(tokens.shape)} and "
                         f"{tuple(lengths.shape)}")
    limit = unwrap_model(model[0]).max_sequence_length
    lengths = lengths.to(torch.long).cpu()
    longest = canonical_length(int(lengths.max()), bucket)
    if longest > limit:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens is scored at {longest}, beyond the {limit} "
                         f"the model was built for: build it for a multiple of {bucket} that covers it")
    if pg_collection is not None and pg_collection.tp.size() > 1:
        return _sequence_values_standalone(model, tokens, lengths, rows, bucket, pg_collection, pad_token_id)
    return _sequence_values_local(model, tokens, lengths, rows, bucket, pg_collection, pad_token_id)


def _canonical_batches(tokens: torch.Tensor, lengths: torch.Tensor, rows: int, bucket: int, pad_token_id: int):
    """``(row indices, (rows, canonical length) tokens)`` per micro-batch, in a deterministic order."""
    classes: dict[int, list[int]] = {}
    for index, length in enumerate(lengths.tolist()):
        classes.setdefault(canonical_length(int(length), bucket), []).append(index)
    for width in sorted(classes):
        members = classes[width]
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
            batch = torch.full((rows, width), pad_token_id, dtype=torch.long)
            for row, index in enumerate(chunk):
                length = min(int(lengths[index]), width)
                batch[row, :length] = tokens[index, :length].cpu()
            yield chunk, batch


def _assemble_values(shape, lengths, results) -> torch.Tensor:
    values = torch.zeros(shape, dtype=torch.float32)
    for chunk, batch_values in results:
        for row, index in enumerate(chunk):
            length = int(lengths[index])
            values[index, :length] = batch_values[row, :length]
    return values


def _sequence_values_local(model, tokens, lengths, rows, bucket, pg_collection, pad_token_id) -> torch.Tensor:
    results = [(chunk, token_values(model, batch, micro_batch_size=rows, pg_collection=pg_collection))
               for chunk, batch in _canonical_batches(tokens, lengths, rows, bucket, pad_token_id)]
    return _assemble_values(tokens.shape, lengths, results).to(tokens.device)


def _sequence_values_standalone(model, tokens, lengths, rows, bucket, pg_collection, pad_token_id) -> torch.Tensor:
    """A GVM on its own tensor-parallel groups: the group's members bring different rollouts, so they
    exchange them and all score every member's (distinct) batch, in the same order."""
    import torch.distributed as dist

    tp_group = pg_collection.tp
    payload = (tokens.cpu(), lengths)
    gathered: list = [None] * tp_group.size()
    dist.all_gather_object(gathered, payload, group=tp_group)
    distinct: list = []
    for member_tokens, member_lengths in gathered:
        if not any(t.shape == member_tokens.shape and torch.equal(t, member_tokens) and torch.equal(n, member_lengths)
                   for t, n in distinct):
            distinct.append((member_tokens, member_lengths))
    mine = None
    for member_tokens, member_lengths in distinct:
        results = [(chunk, token_values(model, batch, micro_batch_size=rows, pg_collection=pg_collection))
                   for chunk, batch in _canonical_batches(member_tokens, member_lengths, rows, bucket,
                                                          pad_token_id)]
        if member_tokens.shape == tokens.shape and torch.equal(member_tokens, tokens.cpu()) and \
                torch.equal(member_lengths, lengths):
            mine = _assemble_values(tokens.shape, lengths, results)
    return mine.to(tokens.device)
