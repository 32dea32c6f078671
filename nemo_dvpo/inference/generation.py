"""Batched sampling from a Megatron GPT model with megatron-core's static-batch inference loop.

The loop, KV cache and parallel forward are megatron-core's: ``GPTInferenceWrapper`` over a
``StaticInferenceContext`` (the KV cache), driven by
``TextGenerationController.generate_all_output_tokens_static_batch`` - the loop that
``StaticInferenceEngine(legacy=True)`` runs. That loop prefills every prompt up to the shortest
prompt's length, then decodes one position per step, a longer prompt keeping its own tokens until it
is consumed. With the local layer spec (CPU) prompts are left-padded to the longest instead, under a
mask that hides the padding, so the whole batch is prefilled at once (``_LeftPaddedGPTWrapper``);
with Transformer Engine's attention, which takes no per-row mask here, the loop runs as is. The dynamic
engine (the non-legacy ``StaticInferenceEngine`` path) needs flash-attn and cannot run on CPU.

We call the controller rather than ``StaticInferenceEngine.generate`` because the engine adds
nothing we use (a request scheduler and a progress bar) and resets torch's *global* RNG to a fixed
seed on every call, which would silently re-seed a trainer's data order and dropout at each rollout.

Two hooks of the controller are replaced (see :class:`_SamplingController`), because its own
sampler draws from the padded vocabulary (and clamps into it), refuses top-k together with top-p,
reports log-probs of the *raw* logits rather than of the distribution actually sampled from, and
stops on a single termination id without counting it in the response.

Every rank of a model-parallel group runs :func:`generate` with the same prompts. TP ranks see the
same gathered logits and PP stages receive the last stage's logits, and all ranks seed an identical
sampling generator, so every rank draws the same tokens and returns the same output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.inference_request import InferenceRequest
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
from megatron.core.inference.sampling_params import SamplingParams
from megatron.core.inference.text_generation_controllers.text_generation_controller import (
    TextGenerationController,
)
from megatron.core.utils import get_model_config

from nemo_dvpo.models.builder import unwrap_model, without_data_parallel
from nemo_dvpo.utils.distributed import compute_device
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError


@dataclass
class SamplingConfig:
    """How responses are drawn. ``greedy`` (or ``temperature == 0``) takes the arg-max token.

    ``top_k == 0`` and ``top_p == 1`` disable those filters; with both set, top-k is applied first.
    ``seed`` seeds the sampling generator of each call: vary it per rollout (and per data-parallel
    rank) to draw different responses, keep it to reproduce them.
    """

    # The longest response in tokens.
    max_new_tokens: int = 64
    # Softmax temperature (0: greedy).
    temperature: float = 1.0
    # Sample among the k likeliest tokens only (0: no top-k filter).
    top_k: int = 0
    # Sample among the smallest set of tokens whose probability reaches p (1: no top-p filter).
    top_p: float = 1.0
    # Take the arg-max token instead of sampling.
    greedy: bool = False
    # Seeds the sampling generator of each call (the recipes vary it per step and data-parallel rank).
    seed: int = 0
    # End a response at an end-of-sequence token (false: always max_new_tokens).
    stop_on_eos: bool = True
    # Token ids that end a response; null means the tokenizer's eos_token_id.
    eos_token_ids: Optional[list[int]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"sampling.temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if self.eos_token_ids is not None and (
            not self.eos_token_ids or any(not isinstance(i, int) or i < 0 for i in self.eos_token_ids)
        ):
            raise ConfigError(
                f"sampling.eos_token_ids must be a non-empty list of token ids or null, got {self.eos_token_ids!r}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


@dataclass
class GenerationOutput:
    """One batch of prompts and their responses, laid out for training.

    Rows are left-aligned: ``tokens[b, :prompt_lengths[b]]`` is prompt ``b``, its response follows
    immediately at ``tokens[b, prompt_lengths[b] : prompt_lengths[b] + response_lengths[b]]``, and
    the rest of the row is right padding with the pad id (the EOS id where the tokenizer has no pad).
    A response that stopped on EOS includes that EOS token; one cut at ``max_new_tokens`` does not.

    ``logprobs[b, t]`` is ``log p(tokens[b, t] | tokens[b, :t])`` under the distribution the token
    was drawn from (after temperature, top-k and top-p; for greedy decoding, the model's own
    softmax), at the token's own position; 0 outside ``response_mask``. A training step that
    computes log-probs from ``logits[:, t - 1]`` must shift by one to compare. Tensors are on the
    CPU; ``response_texts`` are decoded without special tokens.
    """

    tokens: torch.Tensor  # (batch, seq) int64
    prompt_mask: torch.Tensor  # (batch, seq) bool
    response_mask: torch.Tensor  # (batch, seq) bool
    logprobs: torch.Tensor  # (batch, seq) float32
    prompt_lengths: torch.Tensor  # (batch,) int64
    response_lengths: torch.Tensor  # (batch,) int64
    response_texts: list[str]

    def response_token_ids(self, index: int) -> list[int]:
        start = int(self.prompt_lengths[index])
        return self.tokens[index, start:start + int(self.response_lengths[index])].tolist()


def sampling_logits(logits: torch.Tensor, sampling: SamplingConfig, vocab_size: int) -> torch.Tensor:
    """The float32 logits of the distribution tokens are drawn from; filtered ids get ``-inf``.

    Columns past ``vocab_size`` are dropped: a model's output layer may be padded beyond the
    tokenizer's vocabulary (for tensor-parallel divisibility), and those ids decode to nothing.
    Greedy decoding keeps the model's logits unchanged, so their log-softmax is the policy's own
    log-probability - the quantity a policy-gradient update compares against.
    """
    logits = logits[..., :vocab_size].float()
    if sampling.is_greedy:
        return logits
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < vocab_size:
        kth_largest = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays while the mass
        # strictly before it is below top_p, so the most likely token always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, sorted_ids, mass_before >= sampling.top_p)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sampling_log_probs(logits: torch.Tensor, token_ids: torch.Tensor, sampling: SamplingConfig,
                       vocab_size: int) -> torch.Tensor:
    """``log p(token_ids)`` under :func:`sampling_logits`; ``logits`` has one more (vocab) dimension."""
    log_probs = torch.log_softmax(sampling_logits(logits, sampling, vocab_size), dim=-1)
    return log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


class _EngineTokenizer:
    """The slice of megatron's tokenizer interface the static loop touches: it pads with ``eod``
    and detokenizes each finished request. Prompts arrive already tokenized."""

    def __init__(self, tokenizer, pad_token_id: int):
        self._tokenizer = tokenizer
        self.eod = pad_token_id

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


# ``on_step(rows, tokens)``: after a decoding step, the rows that drew a token and the tokens they drew.
StepCallback = Callable[[list[int], list[int]], None]


class _SamplingController(TextGenerationController):
    """The static-batch controller with our sampler and stop rule, recording each response.

    The loop calls ``sample_from_logits`` once per step for every row, then
    ``update_generation_status``, which sees the token written at the current position. A row
    takes part once its prompt is consumed (``generation_started``) and until it is done; the loop
    ends when every row is done or the longest prompt has ``max_new_tokens`` new tokens.
    """

    def __init__(self, inference_wrapped_model, tokenizer, sampling: SamplingConfig, vocab_size: int,
                 eos_token_ids: list[int], batch_size: int, on_step: Optional[StepCallback] = None):
        super().__init__(inference_wrapped_model, tokenizer)
        self.sampling = sampling
        self.on_step = on_step
        self.vocab_size = vocab_size
        self.sampling_rng.manual_seed(sampling.seed)
        device = compute_device()
        self.eos_token_ids = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
        self.response_tokens = torch.zeros(batch_size, sampling.max_new_tokens, dtype=torch.long, device=device)
        self.response_logprobs = torch.zeros(batch_size, sampling.max_new_tokens, device=device)
        self.response_lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._step_logprobs: Optional[torch.Tensor] = None

    def sample_from_logits(self, last_token_logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        logits = sampling_logits(last_token_logits, self.sampling, self.vocab_size)
        if self.sampling.is_greedy:
            sampled = logits.argmax(dim=-1)
        elif 0 < self.sampling.top_k < logits.shape[-1]:
            # Every token outside the top k has probability 0: draw among the k candidates only
            # (the same distribution; drawing over the whole vocabulary costs a random number per
            # vocabulary entry, about a tenth of a CPU decode step).
            candidate_logits, candidates = torch.topk(logits, self.sampling.top_k, dim=-1)
            choice = torch.multinomial(candidate_logits.softmax(dim=-1), 1, generator=self.sampling_rng)
            sampled = candidates.gather(-1, choice).squeeze(-1)
        else:
            sampled = torch.multinomial(logits.softmax(dim=-1), 1, generator=self.sampling_rng).squeeze(-1)
        self._step_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        return sampled

    def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                 is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
        new_tokens = updated_prompts_tokens[:, current_context_end_position]
        active = generation_started & ~is_generation_done_tensor
        rows = active.nonzero().squeeze(-1)
        columns = self.response_lengths[rows]
        self.response_tokens[rows, columns] = new_tokens[rows]
        self.response_logprobs[rows, columns] = self._step_logprobs[rows]
        self.response_lengths[rows] += 1
        if self.on_step is not None:
            self.on_step(rows.tolist(), new_tokens[rows].tolist())
        finished = self.response_lengths >= self.sampling.max_new_tokens
        if self.sampling.stop_on_eos:
            finished |= active & torch.isin(new_tokens, self.eos_token_ids)
        return is_generation_done_tensor | finished, self.response_lengths.int()


class _SharedPrefillMixin:
    """Prefill each distinct prompt once when a batch repeats prompts (several samples per prompt).

    The prefill step runs the model over the distinct rows only; the static KV cache then copies each
    distinct row's keys and values to every row that repeats it, and the logits are expanded the same
    way. Decoding is unchanged. Prompts dominate the cost on CPU (a 170-token prompt with 120-token
    responses is 60% of the work), so k samples per prompt prefill k times less.
    ``repeat_of[row]`` is the first row holding the same prompt; None turns this off.
    """

    repeat_of: Optional[torch.Tensor] = None

    def run_one_forward_step(self, inference_input, *args, **kwargs):
        context = self.inference_context
        if self.repeat_of is None or context.is_decode_only() or context.sequence_len_offset != 0:
            return super().run_one_forward_step(inference_input, *args, **kwargs)
        distinct, slot_of_row = torch.unique(self.repeat_of, return_inverse=True)
        distinct = distinct.to(inference_input["tokens"].device)
        subset = {}
        for name, value in inference_input.items():
            rows_first = torch.is_tensor(value) and value.dim() >= 2 and value.size(0) == len(self.repeat_of)
            subset[name] = value.index_select(0, distinct) if rows_first else value
        logits = super().run_one_forward_step(subset, *args, **kwargs)
        # The distinct rows were cached in slots 0..len(distinct)-1; every row takes its prompt's slot.
        slots = torch.arange(context.max_batch_size)
        slots[:len(slot_of_row)] = slot_of_row
        context.swap_key_value_dict(slots.to(inference_input["tokens"].device))
        if logits is not None:
            logits = logits.index_select(0, slot_of_row.to(logits.device))
        return logits


class _SharedPrefillGPTWrapper(_SharedPrefillMixin, GPTInferenceWrapper):
    pass


class _LeftPaddedGPTWrapper(_SharedPrefillMixin, GPTInferenceWrapper):
    """GPT inference wrapper for a batch whose prompts are left-padded to one length.

    megatron's static loop prefills only up to the *shortest* prompt and then feeds the longer prompts
    one token per step, so a batch with prompt lengths 30..190 spends 160 extra decode steps. With
    every prompt left-padded to the longest, the whole batch is prefilled at once. Padding keys are
    masked for every query (a padding query sees only itself, which keeps its activations finite), and
    RoPE's scores depend only on relative positions, so a shifted prompt computes what it would alone.
    Needs attention that honours an explicit mask: the local layer spec (nemo_dvpo.models.attention).
    """

    def __init__(self, *args, left_pad_lengths: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.left_pad_lengths = left_pad_lengths

    def _build_attention_mask_and_position_ids(self, prompts_tokens: torch.Tensor):
        _, position_ids = super()._build_attention_mask_and_position_ids(prompts_tokens)
        seq_length = prompts_tokens.size(1)
        positions = torch.arange(seq_length, device=prompts_tokens.device)
        future = positions.view(1, 1, seq_length, 1) < positions.view(1, 1, 1, seq_length)
        padding_key = positions.view(1, 1, 1, seq_length) < self.left_pad_lengths.to(prompts_tokens.device).view(
            -1, 1, 1, 1)
        diagonal = torch.eye(seq_length, dtype=torch.bool, device=prompts_tokens.device).view(1, 1, seq_length,
                                                                                               seq_length)
        return future | (padding_key & ~diagonal), position_ids


def _single_module(model) -> torch.nn.Module:
    """The model's one module without its data-parallel wrapper: generation needs none."""
    model = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(model) != 1:
        raise NemoDvpoError("generation does not support virtual (interleaved) pipeline stages")
    return without_data_parallel(model)[0]


def generate(model, tokenizer, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
             eos_token_ids: Optional[Sequence[int]] = None, on_step: Optional[StepCallback] = None) -> GenerationOutput:
    """Generate a response for every prompt; call collectively on all ranks of the model-parallel group.

    ``model`` is what :func:`nemo_dvpo.models.builder.build_gpt_model` returns (or its one module).
    ``eos_token_ids`` overrides ``sampling.eos_token_ids``; with neither, the tokenizer's EOS id ends a
    response. All prompts form one static batch (the KV cache holds batch x (longest prompt +
    ``max_new_tokens``) positions). The model is left in the train/eval mode it came in.
    ``on_step(rows, tokens)``, if given, is called after each decoding step with the rows that drew a token and
    those tokens (a server streams replies from it).
    """
    module = _single_module(model)
    prompts = [list(map(int, prompt)) for prompt in prompt_token_ids]
    if not prompts:
        raise NemoDvpoError("no prompts to generate from")
    if any(len(prompt) == 0 for prompt in prompts):
        raise NemoDvpoError("every prompt needs at least one token")
    gpt_model = unwrap_model(module)
    max_length = max(map(len, prompts)) + sampling.max_new_tokens
    if max_length > gpt_model.max_sequence_length:
        raise NemoDvpoError(
            f"the longest prompt ({max(map(len, prompts))} tokens) plus sampling.max_new_tokens="
            f"{sampling.max_new_tokens} exceeds the sequence length the model was built for "
            f"({gpt_model.max_sequence_length}; see build_gpt_model's seq_length)"
        )
    eos_ids = [i for i in (eos_token_ids or sampling.eos_token_ids or [tokenizer.eos_token_id]) if i is not None]
    if sampling.stop_on_eos and not eos_ids:
        raise ConfigError("the tokenizer has no eos_token_id; set sampling.eos_token_ids")
    pad_token_id = next(i for i in (tokenizer.pad_token_id, *eos_ids, 0) if i is not None)
    padded_vocab_size = gpt_model.vocab_size
    vocab_size = min(len(tokenizer), padded_vocab_size)

    model_config = get_model_config(module)
    wrapper_config = InferenceWrapperConfig(
        hidden_size=model_config.hidden_size,
        params_dtype=model_config.params_dtype,
        fp32_residual_connection=model_config.fp32_residual_connection,
        # -1: one pipeline pass per step for the whole batch (no micro-batching by size).
        inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=padded_vocab_size,
        inference_max_requests=len(prompts),
        inference_max_seq_length=max_length,
    )
    context = StaticInferenceContext.from_config(wrapper_config)
    from nemo_dvpo.models.builder import use_transformer_engine

    longest = max(map(len, prompts))
    if use_transformer_engine() or all(len(prompt) == longest for prompt in prompts):
        engine_prompts = prompts
        wrapper = _SharedPrefillGPTWrapper(module, wrapper_config, context)
    else:
        engine_prompts = [[pad_token_id] * (longest - len(prompt)) + prompt for prompt in prompts]
        left_pad_lengths = torch.tensor([longest - len(prompt) for prompt in prompts], dtype=torch.long)
        wrapper = _LeftPaddedGPTWrapper(module, wrapper_config, context, left_pad_lengths=left_pad_lengths)
    first_row = {}
    repeat_of = [first_row.setdefault(tuple(prompt), row) for row, prompt in enumerate(prompts)]
    if len(first_row) < len(prompts):
        wrapper.repeat_of = torch.tensor(repeat_of, dtype=torch.long)
    controller = _SamplingController(wrapper, _EngineTokenizer(tokenizer, pad_token_id), sampling, vocab_size,
                                     eos_ids, len(prompts), on_step=on_step)
    # Only the length matters to the loop: sampling and stopping happen in the controller above.
    params = SamplingParams(num_tokens_to_generate=sampling.max_new_tokens)
    requests = {index: InferenceRequest(request_id=index, prompt="", prompt_tokens=prompt, sampling_params=params)
                for index, prompt in enumerate(engine_prompts)}
    was_training = module.training
    try:
        controller.generate_all_output_tokens_static_batch(requests)
    finally:
        module.train(was_training)
        _forget_inference_rotary_tables()

    return assemble_output(prompts, controller.response_tokens.cpu(), controller.response_logprobs.cpu(),
                     controller.response_lengths.cpu(), pad_token_id, tokenizer)


def _forget_inference_rotary_tables() -> None:
    """Drop the rotary-embedding tables megatron-core cached while generating.

    ``RotaryEmbedding.forward`` is an ``lru_cache`` shared by every model, and megatron's generation loop
    runs under ``torch.inference_mode``: the tables it caches are inference tensors, which a later training
    forward pass of the same length would reuse - and activation recomputation saves them for backward,
    which autograd refuses. Rebuilding a table costs microseconds.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding.forward.cache_clear()


def assemble_output(prompts: list[list[int]], response_tokens: torch.Tensor, response_logprobs: torch.Tensor,
                    response_lengths: torch.Tensor, pad_token_id: int, tokenizer) -> GenerationOutput:
    """The :class:`GenerationOutput` of prompts and each row's response tokens and log-probs (any engine's)."""
    prompt_lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long)
    total_lengths = prompt_lengths + response_lengths
    batch_size, seq_length = len(prompts), int(total_lengths.max())
    tokens = torch.full((batch_size, seq_length), pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(batch_size, seq_length)
    positions = torch.arange(seq_length).unsqueeze(0)
    prompt_mask = positions < prompt_lengths.unsqueeze(1)
    response_mask = ~prompt_mask & (positions < total_lengths.unsqueeze(1))
    response_texts = []
    for row, prompt in enumerate(prompts):
        start, length = len(prompt), int(response_lengths[row])
        tokens[row, :start] = torch.tensor(prompt)
        tokens[row, start:start + length] = response_tokens[row, :length]
        logprobs[row, start:start + length] = response_logprobs[row, :length]
        response_texts.append(tokenizer.decode(response_tokens[row, :length].tolist(), skip_special_tokens=True))
    return GenerationOutput(tokens=tokens, prompt_mask=prompt_mask, response_mask=response_mask, logprobs=logprobs,
                            prompt_lengths=prompt_lengths, response_lengths=response_lengths.clone(),
                            response_texts=response_texts)
