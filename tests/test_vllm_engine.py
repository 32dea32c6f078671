"""The vLLM rollout engine: its own environment and process, refitted from a Megatron policy.

The engine tests need the vLLM environment (``tools/setup_vllm_env.sh`` builds ``.venv-vllm``) and are skipped
without it; the packing and error-message tests run everywhere. One engine serves the module: started with
random ("dummy") weights, so every agreement with the Megatron policy below is the refit's doing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

from nemo_dvpo.inference.generation import SamplingConfig, generate, sampling_log_probs
from nemo_dvpo.inference.vllm_engine import (
    DEFAULT_VENV,
    VllmEngine,
    VllmEngineConfig,
    default_vllm_python,
    logprob_gap_metrics,
    refit_from_policy,
)
from nemo_dvpo.inference.vllm_weights import hf_weights_of
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError
from tests.conftest import REPO_ROOT, entry_point_env, free_port, load_script, process_alive

# The worker-side module, imported by its path as vLLM's worker imports it (a top-level module of that folder).
views_of = load_script("nemo_dvpo/inference/vllm_worker_extension.py").views_of

HAVE_VLLM_ENV = Path(default_vllm_python()).exists()
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM_ENV, reason=f"the vLLM environment is absent ({default_vllm_python()} not found): build it with "
                              f"tools/setup_vllm_env.sh")

# Log-probs of the same tokens from the two engines, both float32, differ only by summation order: each of
# the 30 layers' matmuls (reductions over 576 or 1536 terms) and softmaxes rounds at float32's 2**-24
# relative, and the rounding grows along the residual stream roughly as sqrt(layers x reduction length)
# ~ 2e2 units of it in the logits (magnitude ~ 20): ~3e-4 absolute in a logit, at most twice that in a
# log-softmax. 2e-3 leaves a factor 3 for heavier tails; a wrong weight moves log-probs by O(1).
LOGPROB_TOLERANCE = 2e-3
# Greedy decoding may part where the two best logits are closer than the engines' logit difference; a
# first divergence counts as a near-tie when the policy's own log-probs of the two tokens differ by less.
NEAR_TIE = 4 * LOGPROB_TOLERANCE
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "What is 12 times 7?", "Write a haiku about rain.", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?", "Give me a synonym for happy.",
    "Translate 'good morning' into Spanish.", "What planet is known as the Red Planet?",
    "List two mammals that live in the ocean.", "What is the square root of 81?",
    "Explain photosynthesis in one sentence.", "What is the largest ocean on Earth?",
    "Name a famous painting by Leonardo da Vinci.", "How many days are in a leap year?",
    "What gas do humans exhale?", "Suggest a name for a pet turtle.", "What is the opposite of cold?",
    "Who was the first person to walk on the Moon?", "What language is spoken in Brazil?",
    "Describe a cat in five words.", "What is the chemical symbol for gold?", "How many continents are there?",
    "What do bees make?", "Name a fruit that is yellow.", "What is the freezing point of water in Fahrenheit?",
    "Write one sentence about autumn.", "What instrument has 88 keys?", "What is the tallest animal?",
    "How many sides does a hexagon have?", "What is the main ingredient of guacamole?",
]


# ---- everywhere: the bucket layout, the configuration, the missing environment ----

def test_buckets_pack_and_unpack_bit_exact_across_bucket_boundaries():
    config = VllmEngineConfig(model="unused", dtype="bfloat16", refit_bucket_mib=1)
    engine = VllmEngine(config)
    generator = torch.Generator().manual_seed(0)
    # 300k bf16 elements = 600 kB: two of them exceed the 1 MiB bucket, so the second starts a new one.
    weights = [(f"w{i}", torch.randn(shape, generator=generator))
               for i, shape in enumerate([(300, 1000), (300, 1000), (7,), (3, 5, 2)])]
    buckets = list(engine._buckets(weights))
    assert [[name for name, _, _ in bucket] for bucket in buckets] == [["w0"], ["w1", "w2", "w3"]]
    for bucket in buckets:
        buffer = torch.zeros(engine._bucket_bytes(bucket, torch.bfloat16), dtype=torch.uint8)
        engine._pack(bucket, buffer, torch.bfloat16)
        unpacked = dict(views_of(buffer, engine._entries(bucket)))
        for name, tensor, offset in bucket:
            assert offset % 64 == 0
            assert torch.equal(unpacked[name], tensor.to(torch.bfloat16)), name


def test_the_logprob_gap_metric_is_one_when_the_engines_agree():
    mask = torch.tensor([[False, True, True], [False, True, False]])
    policy = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, 9.0]])
    assert logprob_gap_metrics(policy, policy, mask) == {"token_mult_prob_error": 1.0, "max_abs_logprob_gap": 0.0}
    engine = policy + torch.tensor([[5.0, 0.1, -0.2], [0.0, 0.3, 7.0]])  # off-mask differences do not count
    metrics = logprob_gap_metrics(engine, policy, mask)
    assert math.isclose(metrics["token_mult_prob_error"], (math.exp(0.1) + math.exp(0.2) + math.exp(0.3)) / 3,
                        rel_tol=1e-6)
    assert math.isclose(metrics["max_abs_logprob_gap"], 0.3, rel_tol=1e-6)


def test_views_refuse_an_entry_past_the_buffer():
    with pytest.raises(ValueError, match="past the buffer"):
        views_of(torch.zeros(16, dtype=torch.uint8), [("w", "float32", [5], 0)])


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "int8", "rollout.vllm.dtype"), ("max_model_len", 0, "rollout.vllm.max_model_len"),
    ("address", "nohost", "rollout.vllm.address"), ("address", "h:1,nohost", "rollout.vllm.address"),
    ("refit_transport", "file", "rollout.vllm.refit_transport"),
    ("engine_kwargs", {"logprobs_mode": "raw_logprobs"}, "engine_kwargs may not set"),
    ("sleep_level", 0, "rollout.vllm.sleep_level"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        VllmEngineConfig(model="m", **{field: value})


def test_each_data_parallel_rank_reaches_an_engine_of_its_own():
    config = VllmEngineConfig(model="m", address="node1:5000, node2:5000")
    assert [config.for_data_parallel_rank(rank, 2).address for rank in (0, 1)] == ["node1:5000", "node2:5000"]
    # Ranks never share an engine: as many addresses as ranks, or none (each rank starts its own).
    with pytest.raises(ConfigError, match="2 engine\\(s\\) for 4 data-parallel rank"):
        config.for_data_parallel_rank(0, 4)
    with pytest.raises(ConfigError, match="1 engine\\(s\\) for 2 data-parallel rank"):
        VllmEngineConfig(model="m", address="node1:5000").for_data_parallel_rank(1, 2)
    local = VllmEngineConfig(model="m")
    assert local.for_data_parallel_rank(1, 2) is local


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU worker's environment")
def test_the_cpu_worker_preloads_its_own_environments_intel_openmp_in_place_of_the_trainers(tmp_path, monkeypatch):
    python = tmp_path / "venv-vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    (tmp_path / "venv-vllm" / "lib").mkdir()
    (tmp_path / "venv-vllm" / "lib" / "libiomp5.so").write_bytes(b"")
    # As an entry point of ours runs: the main environment's Intel OpenMP and tcmalloc preloaded.
    monkeypatch.setenv("LD_PRELOAD", os.pathsep.join(["/repo/.venv/lib/libiomp5.so",
                                                      "/usr/lib/libtcmalloc_minimal.so.4"]))
    env = VllmEngine(VllmEngineConfig(model="m"))._worker_env(str(python), b"key")
    assert env["LD_PRELOAD"].split(os.pathsep) == [str(tmp_path / "venv-vllm" / "lib" / "libiomp5.so"),
                                                   "/usr/lib/libtcmalloc_minimal.so.4"]


def test_connecting_to_an_address_that_does_not_serve_an_engine_says_so(monkeypatch):
    # The three ways a trainer's connection to rollout.vllm.address fails, each a clear error (never a bare
    # EOFError or AuthenticationError): nothing listens; something accepts and closes before the handshake;
    # the engine was started with another key.
    import socket
    import threading
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Listener

    key = os.urandom(16).hex()
    monkeypatch.setenv("NEMO_DVPO_VLLM_AUTHKEY", key)
    port = free_port()
    with pytest.raises(NemoDvpoError, match=f"no vLLM engine answers at 127.0.0.1:{port} .*--listen"):
        VllmEngine(VllmEngineConfig(model="m", address=f"127.0.0.1:{port}")).start()

    with socket.create_server(("127.0.0.1", 0)) as closer:
        def accept_and_close():
            connection, _ = closer.accept()
            connection.close()
        thread = threading.Thread(target=accept_and_close)
        thread.start()
        address = "127.0.0.1:%d" % closer.getsockname()[1]
        with pytest.raises(NemoDvpoError, match=f"no vLLM engine answers at {address} \\(it closed the connection"):
            VllmEngine(VllmEngineConfig(model="m", address=address)).start()
        thread.join(10)

    with Listener(("127.0.0.1", 0), authkey=os.urandom(16)) as listener:
        def refuse():
            with pytest.raises(AuthenticationError):
                listener.accept()
        thread = threading.Thread(target=refuse)
        thread.start()
        address = "%s:%d" % listener.address
        with pytest.raises(ConfigError, match=f"{address} rejected the key in NEMO_DVPO_VLLM_AUTHKEY"):
            VllmEngine(VllmEngineConfig(model="m", address=address)).start()
        thread.join(10)

    monkeypatch.setenv("NEMO_DVPO_VLLM_AUTHKEY", "not-hex")
    with pytest.raises(ConfigError, match="NEMO_DVPO_VLLM_AUTHKEY is not hex"):
        VllmEngine(VllmEngineConfig(model="m", address=address)).start()


def test_sleep_mode_is_for_an_engine_started_beside_the_trainer_on_a_gpu():
    with pytest.raises(ConfigError, match="rollout.vllm.address has devices of its own"):
        VllmEngineConfig(model="m", enable_sleep_mode=True, address="node1:5000")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="enable_sleep_mode=true needs a GPU"):
            VllmEngine(VllmEngineConfig(model="m", enable_sleep_mode=True)).start()


class RecordingEngine(VllmEngine):
    """An engine whose worker requests are recorded instead of sent (the trainer-side bookkeeping only)."""

    def __init__(self, config: VllmEngineConfig, calls: list):
        super().__init__(config)
        self.calls = calls

    def _request(self, op: str, **payload) -> dict:
        self.calls.append((op, payload.get("tags", payload.get("level"))))
        return {}

    def generate_output(self, tokenizer, prompt_ids, sampling):
        self.calls.append(("generate", None))
        return _one_token_generation()


def _one_token_generation():
    return types.SimpleNamespace(tokens=torch.zeros(1, 2, dtype=torch.long), logprobs=torch.zeros(1, 2),
                                 response_mask=torch.tensor([[False, True]]))


def _rollouts(monkeypatch, config: VllmEngineConfig, updates: list[bool], engine_rank: bool = True) -> list:
    """The engine requests and refits of one rollout per entry of ``updates`` (True: an update came before it),
    through PolicyModels.sample with the models replaced by recorders."""
    from nemo_dvpo.rlhf import policy as rlhf_policy

    calls = []
    monkeypatch.setattr(rlhf_policy, "refit_from_policy",
                        lambda engine, model, hf_config: calls.append(("refit", None)))
    monkeypatch.setattr(rlhf_policy, "token_logprobs",
                        lambda *args, **kwargs: (torch.zeros(1, 2), torch.zeros(1, 2)))
    # The rank that holds the engine broadcasts its generation to the rest of its model-parallel group.
    monkeypatch.setattr(rlhf_policy, "_from_first_of_model_parallel_group",
                        lambda value: _one_token_generation() if value is None else value)
    policy = rlhf_policy.PolicyModels.__new__(rlhf_policy.PolicyModels)
    policy.cfg = types.SimpleNamespace(rollout=types.SimpleNamespace(engine="vllm", vllm=config),
                                       logprob_micro_batch_size=1)
    policy.model, policy.hf_config, policy.vocab_size = None, None, 8
    policy.engine = RecordingEngine(config, calls) if engine_rank else None
    policy.engine_is_stale = True
    rollouts = []
    for updated in updates:
        policy.engine_is_stale |= updated  # what update() does
        del calls[:]
        policy.sample(None, [[1]], SamplingConfig(max_new_tokens=1))
        rollouts.append(list(calls))
    return rollouts


def test_a_sleeping_engine_wakes_its_weights_for_the_refit_then_its_kv_cache_and_sleeps_after_the_rollout(
        monkeypatch):
    # Without sleep mode: a refit when an update came before, nothing else but the rollout.
    awake = _rollouts(monkeypatch, VllmEngineConfig(model="m"), [False, True, False])
    assert awake == [[("refit", None), ("generate", None)], [("refit", None), ("generate", None)],
                     [("generate", None)]]
    # Level 1 (weights offloaded to host): the weights come back before a refit writes into them, the KV cache
    # after it (never both beside the refit's buffers), and the engine sleeps again once it has sampled.
    level1 = _rollouts(monkeypatch, VllmEngineConfig(model="m", enable_sleep_mode=True), [False, True, False])
    assert level1 == [
        [("refit", None), ("generate", None), ("sleep", 1)],
        [("wake_up", ["weights"]), ("refit", None), ("wake_up", ["kv_cache"]), ("generate", None), ("sleep", 1)],
        [("wake_up", ["weights", "kv_cache"]), ("generate", None), ("sleep", 1)]]
    # Level 2 drops the weights: every rollout refits first, an update before it or not.
    level2 = _rollouts(monkeypatch, VllmEngineConfig(model="m", enable_sleep_mode=True, sleep_level=2),
                       [False, False])
    assert level2[1] == [("wake_up", ["weights"]), ("refit", None), ("wake_up", ["kv_cache"]),
                         ("generate", None), ("sleep", 2)]
    # ... on every rank of the model-parallel group, which all take part in the refit's gathering.
    other_rank = _rollouts(monkeypatch, VllmEngineConfig(model="m", enable_sleep_mode=True, sleep_level=2),
                           [False, False], engine_rank=False)
    assert other_rank == [[("refit", None)], [("refit", None)]]


def test_a_missing_environment_says_how_to_build_it(tmp_path):

    with pytest.raises(NemoDvpoError, match="setup_vllm_env.sh"):
        VllmEngine(VllmEngineConfig(model="m", python=str(tmp_path / "no-venv" / "bin" / "python"))).start()


def test_an_environment_without_vllm_says_how_to_build_it():
    # The trainer's own python has no vllm: the worker starts, fails to import it and says so.
    with pytest.raises(NemoDvpoError, match="has no vllm.*setup_vllm_env.sh"):
        VllmEngine(VllmEngineConfig(model="m", python=sys.executable, start_timeout_s=120)).start()


# ---- with the vLLM environment: one engine refitted from the Megatron SmolLM2 policy ----

@pytest.fixture(scope="module")
def smollm2_policy(megatron_single_rank):
    from nemo_dvpo.models.builder import build_gpt_model, resolve_hf_config
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.sources import load_tokenizer

    model_cfg = load_model_config("smollm2_135m")
    hf_config = resolve_hf_config(model_cfg)
    policy = build_gpt_model(model_cfg, hf_config=hf_config, seq_length=512)
    for module in policy:
        module.eval()
    return policy, hf_config, load_tokenizer(model_cfg.source)


def engine_config(hf_folder: str, log_file: Path) -> VllmEngineConfig:
    # Eager mode: vLLM's torch.compile warm-up costs minutes on 2 cores and computes the same function.
    return VllmEngineConfig(model=hf_folder, load_format="dummy", dtype="float32", max_model_len=512,
                            cpu_kv_cache_gib=1, cpu_threads_bind="nobind", refit_bucket_mib=64,
                            log_file=str(log_file), engine_kwargs={"enforce_eager": True})


@pytest.fixture(scope="module")
def refitted_engine(smollm2_policy, smollm2_hf_folder, tmp_path_factory):
    policy, hf_config, _ = smollm2_policy
    log_file = tmp_path_factory.mktemp("vllm") / "worker.log"
    engine = VllmEngine(engine_config(smollm2_hf_folder, log_file)).start()
    try:
        before = engine.parameter_checksums()[0]
        stats = refit_from_policy(engine, policy, hf_config)
        yield engine, before, stats
    finally:
        engine.close()


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    from nemo_dvpo.inference.chat import apply_chat_template

    return [apply_chat_template(tokenizer, question) for question in QUESTIONS[:count]]


def policy_logprobs(policy, sequences: list[list[int]], prompt_lengths: list[int], vocab_size: int,
                    sampling: SamplingConfig | None = None) -> list[list[float]]:
    """The Megatron policy's log-prob of each token after the prompt: ``token_logprobs`` (the trainer's own
    function) at temperature 1, or under ``sampling``'s filtered distribution (``sampling_log_probs``)."""
    from nemo_dvpo.models.forward import forward_only
    from nemo_dvpo.models.logprobs import at_token_positions
    from nemo_dvpo.rlhf.rollout import token_logprobs

    width = max(map(len, sequences))
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, (sequence, start) in enumerate(zip(sequences, prompt_lengths)):
        tokens[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, start:len(sequence)] = True
    if sampling is None:
        logprobs, _ = token_logprobs(policy, tokens, mask, vocab_size=vocab_size)
    else:
        logprobs = forward_only(policy, tokens, lambda logits, micro: at_token_positions(
            sampling_log_probs(logits[:, :-1], micro[:, 1:], sampling, vocab_size), 0), tuple(tokens.shape))
    return [logprobs[row, start:len(sequence)].tolist()
            for row, (sequence, start) in enumerate(zip(sequences, prompt_lengths))]


@needs_vllm
@pytest.mark.slow
def test_refit_sends_every_weight_and_the_readable_ones_arrive(refitted_engine, smollm2_policy):
    engine, before, stats = refitted_engine
    policy, hf_config, _ = smollm2_policy
    exported = dict(hf_weights_of(policy, hf_config))
    assert stats.tensors == len(exported) and stats.seconds > stats.load_seconds > 0
    assert stats.bytes >= sum(t.numel() * 4 for t in exported.values())
    print(f"refit: {stats}")
    # On CPU vLLM keeps the linear layers only as packed GEMM operands (their parameters are empty); the
    # embedding and the norms stay readable and must now hold the policy's values. The linear layers are
    # checked through the log-probs below.
    after = engine.parameter_checksums()[0]
    readable = {name for name in after if name in exported}
    # (All of them on GPUs; on CPU the embedding, the final norm and each layer's two norms.)
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= readable and len(readable) >= 2 + 2 * 30
    for name in readable:
        expected = float(exported[name].double().sum())
        assert math.isclose(after[name], expected, rel_tol=1e-9, abs_tol=1e-9), name
    assert not math.isclose(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"], rel_tol=1e-3)


@needs_vllm
@pytest.mark.slow
def test_each_refit_serves_the_policys_current_weights(refitted_engine, smollm2_policy):
    # The RL loop: the policy changes, the engine is refitted, its log-probs follow; and back again.
    from nemo_dvpo.models.builder import unwrap_model

    engine, _, _ = refitted_engine
    policy, hf_config, tokenizer = smollm2_policy
    prompts = chat_prompts(tokenizer, 3)
    continuation = tokenizer("Sure, here is a short answer.")["input_ids"]
    sequences, lengths = [p + continuation for p in prompts], [len(p) for p in prompts]
    original = engine.score(sequences, lengths)
    gpt = unwrap_model(policy[0])
    with torch.no_grad():
        saved = {name: param.detach().clone() for name, param in gpt.named_parameters()}
        gpt.decoder.layers[3].mlp.linear_fc2.weight.mul_(1.5)  # a packed linear layer
        gpt.decoder.final_layernorm.weight.mul_(0.5)
    try:
        refit_from_policy(engine, policy, hf_config)
        changed = engine.score(sequences, lengths)
        ours = policy_logprobs(policy, sequences, lengths, len(tokenizer))
        assert max(abs(a - b) for ra, rb in zip(changed, ours) for a, b in zip(ra, rb)) < LOGPROB_TOLERANCE
        assert max(abs(a - b) for ra, rb in zip(changed, original) for a, b in zip(ra, rb)) > 0.1
    finally:
        with torch.no_grad():
            for name, param in gpt.named_parameters():
                param.copy_(saved[name])
        refit_from_policy(engine, policy, hf_config)
    assert engine.score(sequences, lengths) == original


@needs_vllm
@pytest.mark.slow
def test_logprobs_of_a_fixed_continuation_equal_the_policys(refitted_engine, smollm2_policy):
    engine, _, _ = refitted_engine
    policy, _, tokenizer = smollm2_policy
    continuation = tokenizer("The answer is simple: think it through, step by step, and check.")["input_ids"]
    prompts = chat_prompts(tokenizer, 8)
    sequences = [prompt + continuation for prompt in prompts]
    lengths = [len(prompt) for prompt in prompts]
    ours = policy_logprobs(policy, sequences, lengths, len(tokenizer))
    theirs = engine.score(sequences, lengths)
    gap = max(abs(a - b) for row_a, row_b in zip(ours, theirs) for a, b in zip(row_a, row_b))
    print(f"max |log-prob gap| over {sum(map(len, ours))} tokens: {gap:.2e}")
    assert gap < LOGPROB_TOLERANCE


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("sampling", [SamplingConfig(max_new_tokens=24, temperature=0.7, seed=1),
                                      SamplingConfig(max_new_tokens=24, temperature=1.3, top_k=20, top_p=0.8, seed=2)],
                         ids=["temperature", "top_k_top_p"])
def test_sampled_logprobs_are_those_of_the_filtered_distribution(refitted_engine, smollm2_policy, sampling):
    # The engine's log-prob of each token it drew is the policy's under the same temperature, top-k and top-p
    # (nemo_dvpo's sampling_log_probs): the filters mean the same in both engines.
    engine, _, _ = refitted_engine
    policy, _, tokenizer = smollm2_policy
    prompts = chat_prompts(tokenizer, 6)
    result = engine.generate(prompts, sampling, [tokenizer.eos_token_id])
    sequences = [prompt + ids for prompt, ids in zip(prompts, result.token_ids)]
    ours = policy_logprobs(policy, sequences, [len(p) for p in prompts], len(tokenizer), sampling)
    gap = max(abs(a - b) for row_a, row_b in zip(ours, result.logprobs) for a, b in zip(row_a, row_b))
    print(f"max |sampled log-prob gap|: {gap:.2e}")
    assert all(math.isfinite(value) for row in ours for value in row), "a drawn token was outside the filters"
    assert gap < LOGPROB_TOLERANCE


@needs_vllm
@pytest.mark.slow
def test_greedy_decoding_matches_the_megatron_engine(refitted_engine, smollm2_policy):
    engine, _, _ = refitted_engine
    policy, _, tokenizer = smollm2_policy
    prompts = chat_prompts(tokenizer, len(QUESTIONS))
    sampling = SamplingConfig(max_new_tokens=32, greedy=True)
    megatron = generate(policy, tokenizer, prompts, sampling)
    vllm = engine.generate_output(tokenizer, prompts, sampling)
    identical, near_ties = 0, []
    for row, prompt in enumerate(prompts):
        ours, theirs = megatron.response_token_ids(row), vllm.response_token_ids(row)
        if ours == theirs:
            identical += 1
            continue
        at = next((t for t, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        assert at < min(len(ours), len(theirs)), f"row {row}: one response is a prefix of the other"
        prefix = prompt + ours[:at]
        both = policy_logprobs(policy, [prefix + [ours[at]], prefix + [theirs[at]]], [len(prefix)] * 2,
                               len(tokenizer))
        margin = both[0][0] - both[1][0]
        near_ties.append((row, at, margin))
        assert 0 <= margin < NEAR_TIE, f"row {row} parts at token {at} with a log-prob margin {margin:.2e}"
    print(f"greedy: {identical}/{len(prompts)} identical, near-ties at first divergence: {near_ties}")
    # The layouts agree too: the same masks and log-probs wherever the tokens agree.
    for row in range(len(prompts)):
        if megatron.response_token_ids(row) == vllm.response_token_ids(row):
            mask = megatron.response_mask[row]
            assert torch.equal(mask, vllm.response_mask[row])
            assert torch.allclose(megatron.logprobs[row][mask], vllm.logprobs[row][mask], atol=LOGPROB_TOLERANCE)


@needs_vllm
@pytest.mark.slow
def test_completions_by_the_engine_are_its_own_tokens_cut_and_decoded_as_the_megatron_engines(refitted_engine,
                                                                                               smollm2_policy):
    """``complete()`` on a Policy that holds an engine (what ``tools/eval_benchmarks.py --engine vllm`` answers
    with): each reply is the engine's own greedy tokens under the request's limit, its text cut at a stop string
    by the same rules - so wherever the two engines draw the same tokens, the completions are equal."""
    import dataclasses

    from nemo_dvpo.inference.completion import CompletionRequest, complete
    from nemo_dvpo.inference.policy import Policy, stop_token_ids
    from nemo_dvpo.models.config import load_model_config

    engine, _, _ = refitted_engine
    model, _, tokenizer = smollm2_policy
    model_cfg = load_model_config("smollm2_135m")
    eos_ids = stop_token_ids(tokenizer, model_cfg)
    megatron_policy = Policy(model=model, model_cfg=model_cfg, tokenizer=tokenizer, name="smollm2",
                             eos_token_ids=eos_ids, max_length=512)
    # As use_vllm_engine leaves it: the engine holds the weights, the Megatron copy is gone.
    vllm_policy = dataclasses.replace(megatron_policy, model=None, engine=engine)
    prompts = chat_prompts(tokenizer, 12)
    requests = [CompletionRequest(prompt, max_tokens=6 + 5 * (row % 4), stop=["."] if row % 3 == 0 else [])
                for row, prompt in enumerate(prompts)]
    greedy = SamplingConfig(greedy=True, max_new_tokens=1)  # complete() sets the batch's length itself
    ours, theirs = complete(megatron_policy, requests, greedy), complete(vllm_policy, requests, greedy)
    drawn = engine.generate_output(tokenizer, prompts, SamplingConfig(greedy=True, max_new_tokens=21),
                                   eos_token_ids=eos_ids)
    same = 0
    for row, request in enumerate(requests):
        assert theirs[row].token_ids == drawn.response_token_ids(row)[:request.max_tokens], row
        assert theirs[row].prompt_tokens == len(prompts[row])
        if ours[row].token_ids == theirs[row].token_ids:
            same += 1
            assert ours[row] == theirs[row], row
    cut = [row for row, request in enumerate(requests)
           if request.stop and "." in tokenizer.decode(theirs[row].token_ids, skip_special_tokens=True)]
    assert cut, "no reply reached its stop string: the cut was not exercised"
    assert all(theirs[row].finish_reason == "stop" and "." not in theirs[row].text for row in cut)
    print(f"completions: {same}/{len(requests)} with the same tokens as the Megatron engine's")
    with pytest.raises(ValueError, match="streaming needs the Megatron engine"):
        complete(vllm_policy, requests[:1], greedy, on_token=lambda row, token: None)


@needs_vllm
@pytest.mark.slow
def test_the_benchmark_tool_answers_with_a_refitted_vllm_engine(tmp_path):
    """``tools/eval_benchmarks.py --engine vllm``: the engine starts on the model's architecture, gets the weights
    Megatron loaded by refit, answers, and is gone when the tool ends; the answers say where they came from."""
    out = tmp_path / "vllm_eval"
    completed = subprocess.run([sys.executable, "tools/eval_benchmarks.py", "--model", "smollm2_135m",
                                "--engine", "vllm", "--vllm-eager", "--benchmarks", "ifeval", "--limit", "3",
                                "--max-new-tokens", "12", "--max-sequence-length", "512", "--output-dir", str(out)],
                               cwd=REPO_ROOT, env=entry_point_env(), capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    assert "[vllm] smollm2_135m: " in completed.stdout and "refitted in" in completed.stdout
    answers = [json.loads(line) for line in (out / "ifeval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3
    for record in answers:
        assert record["generation"]["source"] == "vllm:smollm2_135m"
        assert 0 < record["generation"]["completion_tokens"] <= 12 and record["answer"]
    assert json.loads((out / "scores.json").read_text())["ifeval"]["n"] == 3


@needs_vllm
@pytest.mark.slow
def test_eos_ends_a_response_and_is_kept_as_in_the_megatron_engine(refitted_engine, smollm2_policy):
    engine, tokenizer = refitted_engine[0], smollm2_policy[2]
    prompts = chat_prompts(tokenizer, 4)
    free = engine.generate(prompts, SamplingConfig(max_new_tokens=16, greedy=True, stop_on_eos=False), [])
    assert all(len(ids) == 16 for ids in free.token_ids) and set(free.finish_reasons) == {"length"}
    stop_id = free.token_ids[0][5]
    stopped = engine.generate(prompts, SamplingConfig(max_new_tokens=16, greedy=True, eos_token_ids=[stop_id]),
                              [stop_id])
    for ids, full in zip(stopped.token_ids, free.token_ids):
        expected = full[:full.index(stop_id) + 1] if stop_id in full else full
        assert ids == expected


@needs_vllm
@pytest.mark.slow
def test_a_seed_reproduces_the_samples(refitted_engine, smollm2_policy):
    engine, _, _ = refitted_engine
    tokenizer = smollm2_policy[2]
    # The data builder's shape: 4 samples of each of 32 prompts (more prompt tokens than one scheduler step
    # of vLLM's default budget, 4096) - rows draw independently, and a repeated call draws the same.
    prompts = [prompt for prompt in chat_prompts(tokenizer, len(QUESTIONS)) for _ in range(4)]
    assert sum(map(len, prompts)) > 4096
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=7)
    eos = [tokenizer.eos_token_id]
    first, again = engine.generate(prompts, sampling, eos), engine.generate(prompts, sampling, eos)
    other = engine.generate(prompts, SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95, seed=8), eos)
    assert first.token_ids == again.token_ids and first.logprobs == again.logprobs
    assert first.token_ids != other.token_ids
    distinct_per_prompt = [len({tuple(ids) for ids in first.token_ids[i:i + 4]}) for i in range(0, len(prompts), 4)]
    assert sum(distinct_per_prompt) > len(QUESTIONS), "the samples of a prompt all drew the same tokens"


@needs_vllm
@pytest.mark.slow
def test_the_worker_dies_when_the_trainer_is_killed(smollm2_hf_folder, tmp_path):
    # A stand-in trainer starts an engine, reports the worker's pid, and is SIGKILLed: no clean-up runs in it.
    script = tmp_path / "trainer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from pathlib import Path
        from nemo_dvpo.inference.vllm_engine import VllmEngine
        from tests.test_vllm_engine import engine_config
        engine = VllmEngine(engine_config({smollm2_hf_folder!r}, Path({str(tmp_path / 'worker.log')!r}))).start()
        print(engine.process.pid, flush=True)
        time.sleep(3600)
    """))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                               env=entry_point_env())
    try:
        worker_pid = int(trainer.stdout.readline())
        os.kill(worker_pid, 0)  # alive now
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.time() + 30
        while time.time() < deadline and process_alive(worker_pid):
            time.sleep(0.2)
        assert not process_alive(worker_pid), "the vLLM worker outlived its SIGKILLed trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()


@needs_vllm
@pytest.mark.slow
def test_an_engine_launched_separately_is_reached_at_its_address(smollm2_hf_folder, tmp_path, monkeypatch):
    # A Slurm het group's engine: started on its own (--listen), reached by address, and kept across
    # trainers - a resumed trainer reconnects to the same engine.
    config = engine_config(smollm2_hf_folder, tmp_path / "unused.log")
    port, key = free_port(), os.urandom(16).hex()
    env = {**entry_point_env(), "NEMO_DVPO_VLLM_AUTHKEY": key, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "LD_PRELOAD": str(DEFAULT_VENV / "lib" / "libiomp5.so")}
    server = subprocess.Popen([default_vllm_python(), str(REPO_ROOT / "nemo_dvpo" / "inference" / "vllm_worker.py"),
                               "--listen", f"127.0.0.1:{port}", "--engine-args", json.dumps(config.llm_kwargs())],
                              env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        remote = VllmEngineConfig(**{**config.__dict__, "address": f"127.0.0.1:{port}"})
        monkeypatch.setenv("NEMO_DVPO_VLLM_AUTHKEY", key)
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                first = VllmEngine(remote).start()
                break
            except NemoDvpoError:
                assert time.time() < deadline, "the separately launched engine never answered"
                time.sleep(2)
        sampling = SamplingConfig(max_new_tokens=8, greedy=True)
        answer = first.generate([[1, 2, 3, 4]], sampling, [2])
        first.close()
        assert server.poll() is None, "disconnecting stopped the separately launched engine"
        again = VllmEngine(remote).start()
        assert again.generate([[1, 2, 3, 4]], sampling, [2]).token_ids == answer.token_ids
        again.close(stop_remote=True)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
        print((tmp_path / "server.log").read_text()[-3000:])  # shown when the test fails


def test_the_vllm_environment_is_separate():
    # The trainer's environment must not gain vllm (its transformers 5 would break megatron-bridge).
    import importlib.util

    assert importlib.util.find_spec("vllm") is None
    assert DEFAULT_VENV.name == ".venv-vllm"


# ---- the engine as a recipe's rollout (rollout.engine=vllm) ----

@pytest.fixture(scope="module")
def smollm2_gvm(megatron_single_rank, tmp_path_factory) -> Path:
    """A value model of SmolLM2's shape (SmolLM2's trunk, a random head) saved as a GVM checkpoint."""
    from nemo_dvpo.checkpointing.model_checkpoint import load_value_model, save_model_checkpoint
    from nemo_dvpo.models.builder import resolve_hf_config
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.sources import load_tokenizer
    from nemo_dvpo.models.value_model import value_head

    model_cfg = load_model_config("smollm2_135m")
    gvm = load_value_model(model_cfg, seq_length=512)
    with torch.no_grad():
        head = value_head(gvm)
        head.weight.copy_(0.01 * torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    folder = tmp_path_factory.mktemp("smollm2_gvm") / "gvm"
    save_model_checkpoint(gvm, folder, model_cfg, resolve_hf_config(model_cfg), load_tokenizer(model_cfg.source),
                          kind="gvm", extra={"gvm": {"gamma": 1.0, "lam": 0.95, "chat_template": True,
                                                     "value_stats": None}})
    return folder


def _dvpo_vllm_command(gvm: Path, run_dir: Path, log_file: Path, *overrides: str) -> list[str]:
    return [sys.executable, "examples/train_dvpo.py", f"gvm={gvm}", f"run_dir={run_dir}", "train.steps=3",
            "train.save_every=1", "train.kl_budget=null", "rollout.prompts_per_step=2",
            "rollout.sampling.max_new_tokens=12", "ppo.mini_batch_size=2", "ppo.micro_batch_size=1",
            "eval.before=false", "eval.after=false", "export_hf=false", "rollout.engine=vllm",
            "rollout.old_logprobs=recompute", "rollout.vllm.cpu_kv_cache_gib=1", "rollout.vllm.cpu_threads_bind=nobind",
            "+rollout.vllm.engine_kwargs.enforce_eager=true", f"rollout.vllm.log_file={log_file}", *overrides]


@pytest.fixture(scope="module")
def dvpo_vllm_run(smollm2_gvm, tmp_path_factory):
    """Three DVPO steps of SmolLM2 with rollout.engine=vllm: (run folder, worker log, trainer pid, output)."""
    work = tmp_path_factory.mktemp("dvpo_vllm")
    run_dir, log_file = work / "uninterrupted", work / "worker.log"
    trainer = subprocess.Popen(_dvpo_vllm_command(smollm2_gvm, run_dir, log_file), cwd=REPO_ROOT,
                               env=entry_point_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = trainer.communicate(timeout=1800)
    assert trainer.returncode == 0, output[-6000:]
    return run_dir, log_file, trainer.pid


@pytest.mark.slow
@needs_vllm
def test_a_dvpo_run_samples_with_vllm_refits_after_each_update_and_scores_with_the_policy(dvpo_vllm_run):
    """Every rollout after an update follows a refit, the engine's log-probs of its samples equal the Megatron
    policy's within the engines' rounding (the ratio starts from the policy's own), and the engine's process is
    gone when the run ends."""
    run_dir, log_file, trainer_pid = dvpo_vllm_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3]
    # A refit before the first rollout (dummy weights) and after each update.
    assert all(record["time/refit_s"] > 0 for record in records)
    for record in records:
        # exp(gap) - 1 ~ gap: the mean log-prob gap within the engines' fp32 rounding (LOGPROB_TOLERANCE).
        assert record["rollout/engine_token_mult_prob_error"] - 1 < LOGPROB_TOLERANCE, record
        assert record["rollout/engine_max_abs_logprob_gap"] < 10 * LOGPROB_TOLERANCE, record
    # Step 1 samples from the starting policy, which is the reference; old log-probs are the policy's own.
    assert records[0]["rollout/kl"] == pytest.approx(0.0, abs=1e-4)
    # The trainer started its worker (its command line names the trainer's pid), and no such worker outlived it.
    assert log_file.stat().st_size > 0
    assert not _workers_of(trainer_pid)


@pytest.mark.slow
@needs_vllm
def test_a_killed_vllm_run_resumes_exactly(dvpo_vllm_run, smollm2_gvm, tmp_path):
    """SIGKILL after the first checkpoint (the engine's worker dies with the trainer), then resume=true: a new
    engine is refitted with the restored policy before its first rollout, and with each step's sampling seed
    fixed by the step, every logged number equals the uninterrupted run's."""
    from tests.conftest import kill_after_first_checkpoint

    uninterrupted, _, _ = dvpo_vllm_run
    killed, log_file = tmp_path / "killed", tmp_path / "worker.log"
    trainer_pid = kill_after_first_checkpoint(_dvpo_vllm_command(smollm2_gvm, killed, log_file), killed)
    deadline = time.time() + 30  # the worker's parent-death signal acts at once, its watchdog within a second
    while _workers_of(trainer_pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _workers_of(trainer_pid), "the killed trainer's vLLM worker outlived it"
    resumed = subprocess.run(_dvpo_vllm_command(smollm2_gvm, killed, log_file, "resume=true"), cwd=REPO_ROOT,
                             env=entry_point_env(), capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]

    def step_metrics(run_dir: Path) -> dict[int, dict]:
        return {record["step"]: {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}
                for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}

    expected, actual = step_metrics(uninterrupted), step_metrics(killed)
    assert sorted(actual) == [1, 2, 3]
    assert actual == expected


def _workers_of(parent_pid: int) -> list[int]:
    """The pids of live vLLM workers started by the process ``parent_pid`` (``--parent-pid`` in their command)."""
    return [worker for worker, parent in _live_workers().items() if parent == parent_pid]


def _live_workers() -> dict[int, int]:
    """Every live vLLM worker's pid with the pid of the trainer that started it (its ``--parent-pid``).

    A process the worker forks (multiprocessing's resource tracker, inductor's compiles) shows the worker's command
    line until it execs; one whose parent is itself a worker is that child, not a second engine. An orphaned worker
    (its trainer gone, its parent now init) still counts."""
    found, parent_of = {}, {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().split(b"\0")
            if any(a.endswith(b"vllm_worker.py") for a in arguments) and b"--parent-pid" in arguments:
                stat = (cmdline.parent / "stat").read_text()
                pid = int(cmdline.parent.name)
                found[pid] = int(arguments[arguments.index(b"--parent-pid") + 1])
                parent_of[pid] = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the command's parentheses
        except OSError:
            continue  # the process ended while we looked
    return {pid: trainer for pid, trainer in found.items() if parent_of[pid] not in found}


def _descends_from(pid: int, ancestor: int) -> bool:
    """True if ``ancestor`` is ``pid`` or one of its ancestors (a process that ended meanwhile counts as not)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])  # field 4, after the command's parentheses
        except (FileNotFoundError, ProcessLookupError):
            return False
    return False


@pytest.mark.slow
@needs_vllm
def test_each_data_parallel_rank_samples_from_an_engine_of_its_own(smollm2_gvm, tmp_path):
    """Two data-parallel ranks: each starts an engine of its own, refits it and samples its half of the prompts
    from it; on both, the engine's log-probs equal the policy's, and no engine outlives the run."""
    run_dir = tmp_path / "dp2"
    command = [sys.executable, "-m", "nemo_dvpo.launch", "--standalone", "--nproc-per-node=2",
               *_dvpo_vllm_command(smollm2_gvm, run_dir, tmp_path / "worker.log", "train.steps=1",
                                   "rollout.vllm.cpu_threads=1")[1:]]
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, env=entry_point_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    seen: dict[int, int] = {}
    while launcher.poll() is None:
        # Only this run's workers: the module's refitted_engine fixture keeps a worker of its own alive meanwhile.
        seen.update({worker: trainer for worker, trainer in _live_workers().items()
                     if _descends_from(trainer, launcher.pid)})
        time.sleep(0.5)
    output = launcher.stdout.read()
    assert launcher.returncode == 0, output[-6000:]
    ranks = {parent for parent in seen.values()}
    assert len(seen) == 2 and len(ranks) == 2, f"workers by trainer rank: {seen}"  # one each, two trainers
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["time/refit_s"] > 0
    assert record["rollout/engine_token_mult_prob_error"] - 1 < LOGPROB_TOLERANCE, record
    assert record["rollout/engine_max_abs_logprob_gap"] < 10 * LOGPROB_TOLERANCE, record
    assert not any(_workers_of(rank) for rank in ranks)

