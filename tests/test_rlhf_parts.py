"""The parts every RL recipe shares: the data-parallel helper, the trajectory, canonical value scoring
(batching-invariant to the bit), the mini-batch update's exact token mean, the scorer checks, and the
single source of config defaults."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.utils.paths import CONF_DIR
from tests.conftest import run_torchrun
from tests.tolerances import llama_terms, reduction_atol


@pytest.mark.slow
def test_metrics_reduce_the_same_names_on_every_rank_when_only_one_rank_has_verifiable_prompts(tmp_path):
    ranks = run_torchrun("data_parallel_metrics.py", 2, tmp_path=tmp_path)["ranks"]
    for result in ranks:
        assert result["ratios"] == {"verifiable_score": pytest.approx(0.75), "kl": pytest.approx(5.0 / 8.0)}
        assert result["means"] == {"a": pytest.approx(0.5), "b": pytest.approx(5.0)}
    assert [result["shards"] for result in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.slow
def test_rollout_metrics_of_a_mixed_prompt_file_at_two_data_parallel_ranks(tmp_path):
    """Rank 0 holds the verifiable prompts (one response follows its instruction, one does not), rank 1 a plain
    one: both ranks log the same metrics, the verifiable score over rank 0's rollouts only, every other mean
    over all rollouts (hand-computed from the script's tensors)."""
    ranks = run_torchrun("rollout_metrics_mixed.py", 2, tmp_path=tmp_path)["ranks"]
    assert ranks[0] == ranks[1]
    metrics = ranks[0]
    # Response tokens: rank 0 has 2 + 3, rank 1 has 2; rows: 2 + 1.
    assert metrics["rollout/verifiable_score"] == pytest.approx(0.5)
    assert metrics["rollout/response_length"] == pytest.approx(7 / 3)
    # k1 per token: old - ref = 0.5 on rank 0, -0.5 on rank 1.
    assert metrics["rollout/kl_per_token"] == pytest.approx((5 * 0.5 + 2 * -0.5) / 7)
    assert metrics["rollout/kl"] == pytest.approx((5 * 0.5 + 2 * -0.5) / 3)
    assert metrics["rollout/gvm_value_mean"] == pytest.approx((5 * 2.0 + 2 * 4.0) / 7)
    assert metrics["rollout/gvm_value_last_token"] == pytest.approx((2 * 2.0 + 4.0) / 3)
    assert metrics["rollout/advantage_mean"] == pytest.approx(18 / 7)
    variance = (5 * 4.0 + 2 * 16.0) / 7 - (18 / 7) ** 2
    assert metrics["rollout/advantage_std"] == pytest.approx((variance * 7 / 6) ** 0.5)
    assert metrics["rollout/kl_coef"] == pytest.approx(0.1)


def test_trajectory_rows_select_and_cut_every_field():
    from nemo_dvpo.rlhf.trajectory import Trajectory

    tokens = torch.arange(12).reshape(3, 4)
    trajectory = Trajectory(tokens, tokens > 5, torch.tensor([2, 3, 4]), tokens.float(), -tokens.float(),
                            tokens.float() / 2, tokens.float() * 3)
    picked = trajectory.rows(torch.tensor([2, 0]), length=3)
    assert picked.tokens.tolist() == [[8, 9, 10], [0, 1, 2]]
    assert picked.sequence_lengths.tolist() == [4, 2]
    assert picked.returns is None and picked.advantages.tolist() == [[24.0, 27.0, 30.0], [0.0, 3.0, 6.0]]


@pytest.fixture(scope="module")
def tiny_gvm(megatron_single_rank):
    from nemo_dvpo.models.value_model import build_value_model, value_head

    model = build_value_model(load_model_config("tiny"), seq_length=256)
    with torch.no_grad():
        value_head(model).weight.normal_(generator=torch.Generator().manual_seed(3))
    return model


def _padded(sequences, width=None):
    width = width or max(len(s) for s in sequences)
    tokens = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, :len(sequence)] = sequence
    return tokens, torch.tensor([len(s) for s in sequences])


def test_a_sequence_gets_bit_identical_values_alone_padded_or_batched_with_others(tiny_gvm):
    from nemo_dvpo.models.value_model import sequence_values, token_values

    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 49152, (n,), generator=generator) for n in (37, 120, 64, 200, 5, 90)]
    alone = [sequence_values(tiny_gvm, *_padded([s]), rows=4, bucket=32)[0] for s in sequences]
    padded = [sequence_values(tiny_gvm, *_padded([s], width=len(s) + 23), rows=4, bucket=32)[0] for s in sequences]
    batched = sequence_values(tiny_gvm, *_padded(sequences), rows=4, bucket=32)
    reordered = sequence_values(tiny_gvm, *_padded(sequences[::-1]), rows=4, bucket=32).flip(0)
    for index, sequence in enumerate(sequences):
        length = len(sequence)
        assert torch.equal(alone[index][:length], batched[index, :length])
        assert torch.equal(alone[index][:length], padded[index][:length])
        assert torch.equal(alone[index][:length], reordered[index, :length])
        assert bool((batched[index, length:] == 0).all())
        # The values are the GVM's (the canonical shape changes bits, not values).
        direct = token_values(tiny_gvm, sequence[None])[0]
        # Another shape, other sums: llama_terms "logits" at this length (2176 + 8 * length terms; the
        # head sums over the hidden size like an output layer), 6 sqrt(n) = 282..369 eps * max|value|
        # (13..28): atol ~4.4e-4..1.2e-3, rtol=0. Observed at most 2.9e-6 (1.6 eps * max|value|); was
        # atol=1e-5 (0.3..0.6 eps * max|value|), rtol=1e-4.
        torch.testing.assert_close(alone[index][:length], direct, rtol=0,
                                   atol=reduction_atol(direct, llama_terms(load_model_config("tiny"), length)))
    # Without the fixed shapes the bits do depend on the company: the test above can fail.
    tokens, _ = _padded(sequences)
    assert not all(torch.equal(token_values(tiny_gvm, tokens)[i, :len(s)], token_values(tiny_gvm, s[None])[0])
                   for i, s in enumerate(sequences))


def test_the_update_loss_is_the_exact_token_mean_of_the_mini_batch_however_it_is_split(megatron_single_rank):
    """Rows with 1 and 9 response tokens: a per-micro-batch mean would weight the short row 9 times too
    much when micro-batches hold one row each. With the global token count both splits give the same
    gradient (reported as the same gradient norm, clipping off) as one micro-batch of both rows."""
    from nemo_dvpo.models.builder import build_gpt_model
    from nemo_dvpo.rlhf.trajectory import Trajectory
    from nemo_dvpo.rlhf.update import LogprobOutputs, MiniBatchSchedule, minibatch_update
    from nemo_dvpo.training.data_parallel import DataParallel
    from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for
    from nemo_dvpo.training.step import configure_for_training

    model_cfg = load_model_config("tiny")
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    response_mask = torch.zeros(2, 12, dtype=torch.bool)
    response_mask[0, 10:11] = True   # 1 response token
    response_mask[1, 2:11] = True    # 9 response tokens
    lengths = torch.tensor([11, 11])
    advantages = torch.where(response_mask, torch.linspace(-1, 1, 24).reshape(2, 12), torch.zeros(2, 12))
    trajectory = Trajectory(tokens, response_mask, lengths, torch.zeros(2, 12), torch.zeros(2, 12),
                            torch.zeros(2, 12), advantages)

    def loss(outputs, batch, global_tokens):
        # -E_t[A_t * log pi(a_t)]: a plain policy gradient with the token mean over the mini-batch.
        value = -(batch.advantages * outputs["logprobs"] * batch.response_mask).sum() / global_tokens
        return value, {"loss": value.detach()}

    norms = []
    for micro_batch_size in (2, 1):
        torch.manual_seed(0)
        model = build_gpt_model(model_cfg, wrap_with_ddp=True, ddp_config=ddp_config_for(OptimConfig()))
        optimizer, scheduler = build_optimizer(model, OptimConfig(lr=1e-3, clip_grad=0.0), total_steps=1)
        configure_for_training(model, optimizer)
        metrics = minibatch_update(model, optimizer, scheduler, trajectory, loss,
                                   outputs=LogprobOutputs(vocab_size=model_cfg.vocab_size),
                                   schedule=MiniBatchSchedule(epochs=1, mini_batch_size=2,
                                                              micro_batch_size=micro_batch_size),
                                   data_parallel=DataParallel.single(), seed=(0,))
        norms.append(metrics["grad_norm"])
    assert norms[0] > 0
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


def test_a_gvm_for_another_tokenizer_or_template_is_refused(smollm2_hf_folder):
    from transformers import AutoTokenizer

    from nemo_dvpo.rlhf.scorers import (
        ScorerInfo,
        chat_template_fingerprint,
        check_scorer_matches_policy,
        tokenizer_fingerprint,
    )
    from nemo_dvpo.utils.errors import CheckpointError, ConfigError

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_folder)
    info = ScorerInfo("gvm", "g", len(tokenizer), tokenizer_fingerprint(tokenizer), True,
                      chat_template_fingerprint(tokenizer))
    check_scorer_matches_policy(info, tokenizer, len(tokenizer), True, "g")
    with pytest.raises(CheckpointError, match="vocabulary size"):
        check_scorer_matches_policy(info, tokenizer, len(tokenizer) + 1, True, "g")
    with pytest.raises(ConfigError, match="data.chat_template=False"):
        check_scorer_matches_policy(info, tokenizer, len(tokenizer), False, "g")
    other = AutoTokenizer.from_pretrained(smollm2_hf_folder)
    other.add_tokens(["<new_token>"])
    with pytest.raises(CheckpointError, match="another tokenizer"):
        check_scorer_matches_policy(info, other, len(tokenizer), True, "g")
    other = AutoTokenizer.from_pretrained(smollm2_hf_folder)
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(CheckpointError, match="another chat template"):
        check_scorer_matches_policy(info, other, len(tokenizer), True, "g")


def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", ["dvpo", "gvm"])
def test_yaml_holds_only_overrides_of_the_dataclass_defaults(name):
    """The dataclasses are the one source of defaults: a YAML leaf that restates a default would let the
    two drift apart again."""
    from nemo_dvpo.recipes.dvpo import DVPORecipeConfig
    from nemo_dvpo.recipes.gvm import GVMRecipeConfig
    from nemo_dvpo.utils.config import defaults_of

    defaults = dict(_leaves(defaults_of({"dvpo": DVPORecipeConfig, "gvm": GVMRecipeConfig}[name])))
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    for key in ("defaults", "hydra"):
        yaml.pop(key, None)
    for key, value in _leaves(yaml):
        if key.startswith("gvm_training."):
            continue  # stage-1 overrides, a free-form mapping
        assert key in defaults, f"{name}.yaml sets {key}, which is no field of the recipe's config"
        assert value != defaults[key], f"{name}.yaml restates the default {key}={value!r}"


def test_the_entry_point_composes_defaults_and_overrides(tmp_path):
    from hydra import compose, initialize_config_dir

    from nemo_dvpo.recipes.dvpo import DVPORecipeConfig, parse_config
    from nemo_dvpo.utils.config import register_defaults
    from nemo_dvpo.utils.errors import ConfigError

    register_defaults("dvpo_defaults", DVPORecipeConfig)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = parse_config(compose("dvpo", overrides=["ppo.clip=0.3", "model=tiny"]))
        # A model field the preset does not mention is still a plain override (no "+"): its default is the
        # ModelConfig dataclass's, composed under the preset.
        tuned = parse_config(compose("dvpo", overrides=["model=tiny", "model.activation_recompute=full",
                                                        "model.random_init=true", "rollout.logprob_micro_batch_size=4"]))
        with pytest.raises(ConfigError, match="rollout.logprob_micro_batch_size must be >= 1"):
            parse_config(compose("dvpo", overrides=["rollout.logprob_micro_batch_size=0"]))
    assert cfg.data.max_prompt_tokens == 128          # nemo_dvpo/conf/dvpo.yaml's override
    assert cfg.rollout.forward_micro_batch_size == 8  # the dataclass default
    # Log-prob passes take the update's micro-batch unless set.
    assert cfg.rollout.logprob_micro_batch_size is None and cfg.logprob_micro_batch_size == cfg.ppo.micro_batch_size
    assert tuned.logprob_micro_batch_size == 4 and tuned.ppo.micro_batch_size == 2
    assert cfg.ppo.clip == 0.3 and cfg.model.name == "tiny"
    assert cfg.model.activation_recompute == "none" and not cfg.model.random_init
    assert tuned.model.activation_recompute == "full" and tuned.model.random_init
    assert tuned.model.num_layers == cfg.model.num_layers  # the preset still gives the shape
