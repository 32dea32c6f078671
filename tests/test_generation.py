"""Generation with megatron-core's static inference loop, against independent references.

SmolLM2 greedy output must equal Hugging Face ``generate`` token for token (TP=1 in process, TP=3
and PP=2 under torchrun). The random-weight ``tiny`` preset covers what needs no real model: the
output layout, log-probs against a full forward pass with a reference sampling filter written here
independently, EOS handling, seeding, and the padded vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

from nemo_dvpo.checkpointing.model_checkpoint import save_model_checkpoint
from nemo_dvpo.data.prompts import read_prompts
from nemo_dvpo.inference.chat import apply_chat_template
from nemo_dvpo.inference.generation import SamplingConfig, generate
from nemo_dvpo.models.builder import build_gpt_model, padded_vocab_size, resolve_hf_config, unwrap_model
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.forward import full_logits
from nemo_dvpo.models.sources import load_hf_model, load_tokenizer
from nemo_dvpo.utils.config import from_dict
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError
from tests.conftest import REPO_ROOT, SMOLLM2_SOURCE, run_torchrun
from tests.tolerances import llama_terms, reduction_atol

MAX_NEW_TOKENS = 20
# Chat prompts of different lengths (31 to 44 tokens with the template), batched together.
CHAT_PROMPTS = ["What is 2+2?", "Name a colour.", "Write a haiku about the sea and the wind in the evening.", "Hi"]
TINY_PROMPTS = [[1, 520, 9531, 198], [1, 2, 4093, 198, 6004, 17, 4237, 346, 1834], [1, 9690, 198, 2683, 359]]
GREEDY_UNSTOPPED = SamplingConfig(max_new_tokens=8, greedy=True, stop_on_eos=False)


@pytest.fixture(scope="module")
def tiny(megatron_single_rank):
    model_cfg = load_model_config("tiny")
    return build_gpt_model(model_cfg), load_tokenizer(model_cfg.tokenizer_source)


@pytest.fixture(scope="module")
def smollm2_chat_prompts(smollm2_hf_folder):
    tokenizer = load_tokenizer(SMOLLM2_SOURCE)
    return tokenizer, [apply_chat_template(tokenizer, prompt) for prompt in CHAT_PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy_responses(smollm2_chat_prompts):
    """HF greedy responses, one prompt at a time so that no padding enters the reference."""
    tokenizer, prompts = smollm2_chat_prompts
    hf_model = load_hf_model(SMOLLM2_SOURCE)
    responses = []
    with torch.no_grad():
        for prompt in prompts:
            tokens = torch.tensor([prompt])
            output = hf_model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                       max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id)
            responses.append(output[0, len(prompt):].tolist())
    return responses


def reference_log_prob(logits: torch.Tensor, token: int, sampling: SamplingConfig, vocab_size: int) -> float:
    """log p(token) after temperature, then top-k, then top-p (smallest set reaching top_p), in float64."""
    logits = logits[:vocab_size].double()
    if sampling.is_greedy:
        return torch.log_softmax(logits, -1)[token].item()
    logits = logits / sampling.temperature
    kept = torch.argsort(logits, descending=True)
    if sampling.top_k:
        kept = kept[:sampling.top_k]
    if sampling.top_p < 1:
        cumulative = torch.softmax(logits[kept], -1).cumsum(-1)
        kept = kept[:int((cumulative < sampling.top_p).sum()) + 1]
    if token not in kept.tolist():
        return -math.inf
    return torch.log_softmax(logits[kept], -1)[kept.tolist().index(token)].item()


# --- configuration and prompts -------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("temperature", -0.5), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
    ("eos_token_ids", []), ("eos_token_ids", [-3]),
])
def test_sampling_config_names_the_bad_field(field, value):
    with pytest.raises(ConfigError, match=f"sampling.{field}"):
        SamplingConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"sampling.{field}"):
        from_dict(SamplingConfig, {field: value}, "sampling")


def test_temperature_zero_means_greedy():
    assert SamplingConfig(temperature=0).is_greedy
    assert SamplingConfig(greedy=True, temperature=0.7).is_greedy
    assert not SamplingConfig(temperature=0.7).is_greedy


def test_apply_chat_template_wraps_a_string_as_one_user_turn(smollm2_chat_prompts):
    tokenizer, _ = smollm2_chat_prompts
    token_ids = apply_chat_template(tokenizer, "Name a colour.")
    assert token_ids == apply_chat_template(tokenizer, [{"role": "user", "content": "Name a colour."}])
    assert tokenizer.decode(token_ids).endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(NemoDvpoError, match="no chat template"):
        apply_chat_template(types.SimpleNamespace(chat_template=None), "hi")


def test_read_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hi"}\n\n{"messages": [{"role": "user", "content": "Yo"}]}\n')
    assert read_prompts(path) == ["Hi", [{"role": "user", "content": "Yo"}]]
    path.write_text('{"prompt": "Hi"}\n{"text": "no"}\n')
    with pytest.raises(NemoDvpoError, match="prompts.jsonl:2"):
        read_prompts(path)


# --- the tiny random model: layout, log-probs, stopping, seeding, vocabulary ----------------------


def test_layout_and_masks_for_prompts_of_different_lengths(tiny):
    model, tokenizer = tiny
    output = generate(model, tokenizer, TINY_PROMPTS, SamplingConfig(max_new_tokens=6, seed=1, stop_on_eos=False))

    prompt_lengths = [len(prompt) for prompt in TINY_PROMPTS]
    assert output.prompt_lengths.tolist() == prompt_lengths
    assert output.response_lengths.tolist() == [6, 6, 6]
    assert output.tokens.shape == output.logprobs.shape == (3, max(prompt_lengths) + 6)
    for row, prompt in enumerate(TINY_PROMPTS):
        start, end = len(prompt), len(prompt) + 6
        assert output.tokens[row, :start].tolist() == prompt
        assert output.prompt_mask[row].tolist() == [t < start for t in range(output.tokens.shape[1])]
        assert output.response_mask[row].tolist() == [start <= t < end for t in range(output.tokens.shape[1])]
        assert (output.tokens[row, end:] == tokenizer.pad_token_id).all()
        assert (output.logprobs[row, start:end] < 0).all()
        assert output.response_texts[row] == tokenizer.decode(output.tokens[row, start:end].tolist(),
                                                              skip_special_tokens=True)
    assert (output.logprobs[~output.response_mask] == 0).all()
    assert not (output.prompt_mask & output.response_mask).any()


@pytest.mark.parametrize("sampling", [
    SamplingConfig(max_new_tokens=8, greedy=True),
    SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=50, top_p=0.8, seed=5),
    SamplingConfig(max_new_tokens=8, temperature=1.3, top_p=0.95, seed=6),
], ids=["greedy", "temperature_topk_topp", "temperature_topp"])
def test_logprobs_equal_full_forward_under_the_sampling_distribution(tiny, sampling):
    model, tokenizer = tiny
    output = generate(model, tokenizer, TINY_PROMPTS, dataclasses.replace(sampling, stop_on_eos=False))
    logits = full_logits(model, output.tokens)

    # The sampler's log-prob (incremental decoding, KV cache) against a full forward's: the whole model's chain
    # of sums plus the vocabulary's log-softmax normaliser, at the log-probs' own scale (tests/tolerances.py).
    expected = {}
    for row, position in output.response_mask.nonzero().tolist():
        token = int(output.tokens[row, position])
        expected[row, position] = reference_log_prob(logits[row, position - 1], token, sampling, len(tokenizer))
    terms = llama_terms(load_model_config("tiny"), seq_len=output.tokens.shape[1], through="loss")
    tolerance = reduction_atol(max(abs(value) for value in expected.values()), terms)
    for (row, position), value in expected.items():
        assert output.logprobs[row, position].item() == pytest.approx(value, abs=tolerance), (row, position)


def test_stops_on_eos_and_keeps_the_eos_token(tiny):
    model, tokenizer = tiny
    eos = generate(model, tokenizer, TINY_PROMPTS, GREEDY_UNSTOPPED).response_token_ids(0)[2]
    # Row 1's prompt contains the stop id: only generated tokens may end a response.
    prompts = [TINY_PROMPTS[0], TINY_PROMPTS[1] + [eos], TINY_PROMPTS[2]]
    free_run = generate(model, tokenizer, prompts, GREEDY_UNSTOPPED)
    stopped = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=8, greedy=True), eos_token_ids=[eos])

    for row in range(len(prompts)):
        unstopped = free_run.response_token_ids(row)
        expected = unstopped[:unstopped.index(eos) + 1] if eos in unstopped else unstopped
        assert stopped.response_token_ids(row) == expected
        end = len(prompts[row]) + len(expected)
        assert stopped.response_mask[row].nonzero().squeeze(-1).tolist() == list(range(len(prompts[row]), end))
        assert (stopped.tokens[row, end:] == tokenizer.pad_token_id).all()
    assert stopped.response_token_ids(0)[-1] == eos
    # eos_token_ids in the config does the same as the argument.
    configured = generate(model, tokenizer, prompts, dataclasses.replace(GREEDY_UNSTOPPED, stop_on_eos=True,
                                                                         eos_token_ids=[eos]))
    assert torch.equal(configured.tokens, stopped.tokens)


def test_top_k_1_sampling_equals_greedy(tiny):
    model, tokenizer = tiny
    greedy = generate(model, tokenizer, TINY_PROMPTS, GREEDY_UNSTOPPED)
    top_1_sampling = dataclasses.replace(GREEDY_UNSTOPPED, greedy=False, top_k=1, seed=3)
    top_1 = generate(model, tokenizer, TINY_PROMPTS, top_1_sampling)
    assert torch.equal(top_1.tokens, greedy.tokens)
    # A single-token support: the sampled token had probability one.
    assert (top_1.logprobs[top_1.response_mask] == 0).all()


def test_sampling_with_a_fixed_seed_is_reproducible(tiny):
    model, tokenizer = tiny

    def sample(seed):
        return generate(model, tokenizer, TINY_PROMPTS, SamplingConfig(max_new_tokens=8, seed=seed, stop_on_eos=False))

    first, again, other = sample(11), sample(11), sample(12)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.tokens, other.tokens)


def test_never_samples_padded_vocabulary_ids(megatron_single_rank):
    model_cfg = load_model_config("tiny", vocab_size=49152 + 128)
    model = build_gpt_model(model_cfg)
    tokenizer = load_tokenizer(model_cfg.tokenizer_source)
    assert padded_vocab_size(model) > len(tokenizer) == 49152

    def favour_padded_ids(module, inputs, output):
        output[0][..., len(tokenizer):] = 1e4

    unwrap_model(model[0]).output_layer.register_forward_hook(favour_padded_ids)
    for sampling in (SamplingConfig(max_new_tokens=6, greedy=True), SamplingConfig(max_new_tokens=6, seed=2)):
        output = generate(model, tokenizer, TINY_PROMPTS, dataclasses.replace(sampling, stop_on_eos=False))
        assert output.tokens[output.response_mask].max() < len(tokenizer)
        assert torch.isfinite(output.logprobs).all()


# --- SmolLM2 against Hugging Face --------------------------------------------------------------


@pytest.mark.slow
def test_greedy_equals_hf_generate_at_tp1(megatron_single_rank, smollm2_chat_prompts, hf_greedy_responses):
    tokenizer, prompts = smollm2_chat_prompts
    assert len({len(prompt) for prompt in prompts}) == len(prompts)
    model = build_gpt_model(load_model_config("smollm2_135m"))
    output = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, greedy=True))

    assert [output.response_token_ids(row) for row in range(len(prompts))] == hf_greedy_responses
    # The references cover both ends: some responses stop on EOS, some run to max_new_tokens.
    assert any(response[-1] == tokenizer.eos_token_id for response in hf_greedy_responses)
    assert any(len(response) == MAX_NEW_TOKENS for response in hf_greedy_responses)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [(3, ("--tp", "3")), (2, ("--pp", "2"))], ids=["tp3", "pp2"])
def test_greedy_equals_hf_generate_across_ranks(nproc, layout, tmp_path, hf_greedy_responses):
    result = run_torchrun("generation_vs_hf.py", nproc, *layout, "--max-new-tokens", str(MAX_NEW_TOKENS),
                          "--prompts", json.dumps(CHAT_PROMPTS), tmp_path=tmp_path)
    assert result["greedy_responses"] == hf_greedy_responses
    assert result["identical_on_all_ranks"], "ranks returned different tokens or log-probs"
    assert result["sampled_logprob_max_diff"] < 1e-3


# --- the command-line example ---------------------------------------------------------------------


@pytest.mark.slow
def test_generate_example_from_a_checkpoint_and_a_jsonl_file(tiny, tmp_path):
    model, tokenizer = tiny
    model_cfg = load_model_config("tiny")
    save_model_checkpoint(model, tmp_path / "checkpoint", model_cfg, resolve_hf_config(model_cfg), tokenizer)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "Name a colour."}) + "\n"
                            + json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"}]}) + "\n")
    expected = generate(model, tokenizer, [apply_chat_template(tokenizer, "Name a colour.")],
                        SamplingConfig(max_new_tokens=5, greedy=True))

    workdir = tmp_path / "workdir"
    workdir.mkdir()
    # This process's own rendezvous port is taken: the example must pick a free one.
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "generate.py"), f"checkpoint={tmp_path / 'checkpoint'}",
         f"prompts_file={prompts_file}", "sampling.max_new_tokens=5"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert f"### [0] Name a colour.\n{expected.response_texts[0]}\n" in completed.stdout
    assert "### [1] What is 2+2?" in completed.stdout
    assert list(workdir.iterdir()) == [], "the example must not create output folders"

    no_prompts = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "generate.py"), "model=tiny"],
                                cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert no_prompts.returncode == 2 and "error: give exactly one of prompts" in no_prompts.stderr


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny, monkeypatch):
    """Prompts of different lengths, left-padded into one batch, equal each prompt generated alone."""
    from nemo_dvpo.inference import generation

    model, tokenizer = tiny
    calls = []
    wrapper_class = generation._LeftPaddedGPTWrapper

    class RecordingWrapper(wrapper_class):
        def __init__(self, *args, **kwargs):
            calls.append(kwargs["left_pad_lengths"].tolist())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generation, "_LeftPaddedGPTWrapper", RecordingWrapper)
    batched = generate(model, tokenizer, TINY_PROMPTS, GREEDY_UNSTOPPED)
    assert calls == [[5, 0, 4]], "the batch was not left-padded"
    for row, prompt in enumerate(TINY_PROMPTS):
        alone = generate(model, tokenizer, [prompt], GREEDY_UNSTOPPED)
        assert batched.response_token_ids(row) == alone.response_token_ids(0)
        length = len(prompt) + GREEDY_UNSTOPPED.max_new_tokens
        torch.testing.assert_close(batched.logprobs[row, :length], alone.logprobs[0, :length], rtol=1e-4, atol=1e-5)



def test_repeated_prompts_are_prefilled_once_and_generate_what_each_generates_alone(tiny, monkeypatch):
    """Several samples of one prompt share its prefill: the model sees each distinct prompt once, and
    every row then decodes exactly as it would alone (greedy tokens, log-probs)."""
    from nemo_dvpo.inference import generation

    model, tokenizer = tiny
    prefill_rows = []
    original = generation._SharedPrefillMixin.run_one_forward_step

    def recording(self, inference_input, *args, **kwargs):
        if self.inference_context.sequence_len_offset == 0:
            prefill_rows.append(None if self.repeat_of is None else self.repeat_of.tolist())
        return original(self, inference_input, *args, **kwargs)

    monkeypatch.setattr(generation._SharedPrefillMixin, "run_one_forward_step", recording)
    rows = [TINY_PROMPTS[0], TINY_PROMPTS[1], TINY_PROMPTS[0], TINY_PROMPTS[2], TINY_PROMPTS[1]]
    batched = generate(model, tokenizer, rows, GREEDY_UNSTOPPED)
    assert prefill_rows == [[0, 1, 0, 3, 1]]
    for row, prompt in enumerate(rows):
        alone = generate(model, tokenizer, [prompt], GREEDY_UNSTOPPED)
        assert batched.response_token_ids(row) == alone.response_token_ids(0)
        length = len(prompt) + GREEDY_UNSTOPPED.max_new_tokens
        torch.testing.assert_close(batched.logprobs[row, :length], alone.logprobs[0, :length], rtol=1e-4, atol=1e-5)
    # Sampling: the repeated rows draw their own tokens from identical distributions.
    sampled = generate(model, tokenizer, [TINY_PROMPTS[0]] * 4, SamplingConfig(max_new_tokens=6, seed=3,
                                                                                 stop_on_eos=False))
    assert len({tuple(sampled.response_token_ids(row)) for row in range(4)}) > 1


def test_top_k_sampling_draws_only_among_the_k_most_likely_tokens(tiny):
    model, tokenizer = tiny
    sampling = SamplingConfig(max_new_tokens=6, top_k=3, temperature=1.5, seed=11, stop_on_eos=False)
    output = generate(model, tokenizer, TINY_PROMPTS * 3, sampling)
    logits = full_logits(model, output.tokens)[..., :len(tokenizer)]
    for row in range(output.tokens.shape[0]):
        start = int(output.prompt_lengths[row])
        for position in range(start, start + int(output.response_lengths[row])):
            top3 = torch.topk(logits[row, position - 1], 3).indices.tolist()
            assert int(output.tokens[row, position]) in top3


def test_a_reply_generated_in_slices_is_the_reply_generated_at_once(tiny):
    """What the policy server does with a long reply (``complete(..., slice_tokens)``, continued from the reply
    so far) against one ``complete`` call: the same greedy tokens, or a first divergence at a near-tie.

    A slice boundary re-prefills prompt and reply instead of decoding from the KV cache, so the logits there are
    the same sums in another order: float32 rounding of O(10) logits over a 64-wide hidden state, far below
    1e-3. Where the two paths pick different tokens, the full forward's logits of the two must lie within that.
    """
    from nemo_dvpo.inference.completion import CompletionRequest, complete

    model, tokenizer = tiny
    policy = types.SimpleNamespace(model=model, engine=None, tokenizer=tokenizer, max_length=256,
                                   eos_token_ids=[tokenizer.eos_token_id])
    greedy, limit = SamplingConfig(greedy=True), 30
    whole = complete(policy, [CompletionRequest(prompt, limit) for prompt in TINY_PROMPTS], greedy)
    sliced = [None] * len(TINY_PROMPTS)
    calls = 0
    while unfinished := [i for i, reply in enumerate(sliced) if reply is None or reply.finish_reason is None]:
        rows = [CompletionRequest(TINY_PROMPTS[i], limit, reply_ids=sliced[i].token_ids if sliced[i] else [])
                for i in unfinished]
        for i, reply in zip(unfinished, complete(policy, rows, greedy, slice_tokens=7)):
            sliced[i] = reply
        calls += 1
    assert calls == math.ceil(limit / 7)
    for prompt, once, in_slices in zip(TINY_PROMPTS, whole, sliced):
        assert (in_slices.finish_reason, in_slices.completion_tokens) == (once.finish_reason, once.completion_tokens)
        if in_slices.token_ids == once.token_ids:
            assert in_slices.text == once.text
            continue
        position = next(p for p, (a, b) in enumerate(zip(once.token_ids, in_slices.token_ids)) if a != b)
        logits = full_logits(model, torch.tensor([prompt + once.token_ids[:position]]), vocab_size=len(tokenizer))
        last = logits[0, -1]
        gap = abs(float(last[once.token_ids[position]] - last[in_slices.token_ids[position]]))
        assert gap < 1e-3, f"the sliced reply diverged at token {position} where the logits differ by {gap}"


def test_a_slice_continues_the_reply_and_stops_at_its_own_limit(tiny):
    from nemo_dvpo.inference.completion import CompletionRequest, complete

    model, tokenizer = tiny
    policy = types.SimpleNamespace(model=model, engine=None, tokenizer=tokenizer, max_length=256, eos_token_ids=[-1])
    first = complete(policy, [CompletionRequest(TINY_PROMPTS[0], 10)], GREEDY_UNSTOPPED, slice_tokens=6)[0]
    assert first.finish_reason is None and len(first.token_ids) == 6 == first.completion_tokens
    second = complete(policy, [CompletionRequest(TINY_PROMPTS[0], 10, reply_ids=first.token_ids)], GREEDY_UNSTOPPED,
                      slice_tokens=6)[0]
    assert second.finish_reason == "length" and second.token_ids[:6] == first.token_ids and len(second.token_ids) == 10
    assert second.text == tokenizer.decode(second.token_ids, skip_special_tokens=True)
    unsliced = complete(policy, [CompletionRequest(TINY_PROMPTS[0], 10)], GREEDY_UNSTOPPED)[0]
    assert unsliced.finish_reason == "length"  # without slices, a reply cut by the call's budget ends as before
