"""The baselines built from DVPO's parts, on the tiny model: a Bradley-Terry reward model, PPO with a critic,
GRPO and DPO. Each trains what it should and freezes what it should; PPO at TP=2 and PP=2 equals TP=1 and
a killed PPO run resumes exactly; DPO's first loss is log 2 (policy = reference) and TP=2 equals TP=1."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, entry_point_env as _env, kill_after_first_checkpoint, run_torchrun
from tests.test_dvpo_recipe import _step_metrics

pytestmark = pytest.mark.slow  # every test here trains, converts or launches ranks (see pyproject.toml)

FIXTURE = str(REPO_ROOT / "tests" / "fixtures" / "ultrafeedback_binarized_mini.jsonl")
PPO_METRICS = ("rollout/kl", "rollout/score", "rollout/critic_value_mean", "rollout/advantage_std",
               "train/pg_loss", "train/grad_norm", "train/clip_fraction", "train/critic_loss",
               "train/critic_explained_variance")




def _run(command: list[str], timeout: int = 900) -> str:
    completed = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    return output


@pytest.fixture(scope="module")
def work_dir(tiny_policy_and_gvm) -> Path:
    return tiny_policy_and_gvm


# -- the reward model ------------------------------------------------------------------------------------

def test_reward_model_learns_the_pairs_with_the_bradley_terry_loss(tmp_path):
    run_dir = tmp_path / "rm"
    output = _run([sys.executable, "examples/train_reward_model.py", "model=tiny", f"run_dir={run_dir}",
                   f"data.train={FIXTURE}", f"data.eval={FIXTURE}", "train.steps=12", "train.global_batch_size=8",
                   "train.micro_batch_size=4", "train.eval_every=6", "train.eval_max_pairs=8", "optim.lr=1e-3",
                   "optim.warmup_steps=0"])
    assert "saved the reward_model" in output
    metrics = _step_metrics(run_dir)
    # The head starts at zero: every reward is 0, so the first loss is -log sigma(0) = log 2 and no pair is
    # ranked yet.
    assert metrics[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[1]["train/pair_accuracy"] == 0.0
    # It learns (slowly: a random trunk, 4 pairs a step): the loss falls below log 2, chosen rewards move up.
    late = sum(metrics[step]["train/loss"] for step in (10, 11, 12)) / 3
    assert late < math.log(2) - 0.005, [metrics[step]["train/loss"] for step in sorted(metrics)]
    assert sum(metrics[step]["train/reward_margin"] for step in (10, 11, 12)) > 0
    final = json.loads((run_dir / "final" / "nemo_dvpo_checkpoint.json").read_text())
    assert final["kind"] == "reward_model"
    assert final["gvm"]["eval_accuracy"]["last"] == metrics[12]["eval/accuracy_last"]


def test_reward_objective_refuses_scored_records(tmp_path):
    scored = tmp_path / "scored.jsonl"
    scored.write_text(json.dumps({"prompt": "Hi", "response": "Hello", "score": 0.5}) + "\n")
    completed = subprocess.run([sys.executable, "examples/train_reward_model.py", "model=tiny",
                                f"run_dir={tmp_path / 'rm'}", f"data.train={scored}", "data.eval=null"],
                               cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert f"{scored} holds scored records" in completed.stdout + completed.stderr


def test_label_with_reward_model_scores_each_response_at_its_last_token(work_dir, tmp_path):
    """The authors' later recipe's data: every response scored by the reward model, as scored records."""
    output = tmp_path / "scored.jsonl"
    _run([sys.executable, "tools/label_with_reward_model.py", "--reward-model", str(work_dir / "rm"), "--data",
          FIXTURE, "--output", str(output), "--max-records", "3"])
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["source_label"] for line in lines] == [1.0, -1.0] * 3
    # The same sequences through the scorer PPO uses (bucketed batches, the value at lengths - 1).
    from nemo_dvpo.data.preference import PreferenceDataConfig, collate_value_batch, load_preference_data
    from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config
    from nemo_dvpo.models.sources import load_tokenizer
    from nemo_dvpo.rlhf.scorers import LocalValueModel, RewardScorer

    model_cfg = read_checkpoint_model_config(str(work_dir / "rm"))
    tokenizer = load_tokenizer(model_cfg.tokenizer)
    samples = load_preference_data(FIXTURE, PreferenceDataConfig(max_length=1024, overlong="truncate_prompt",
                                                                 max_records=3), tokenizer,
                                   eos_token_id=model_cfg.eos_token_id).samples
    batch = collate_value_batch(samples, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    lengths = batch.prompt_lengths + batch.response_lengths
    expected = RewardScorer(LocalValueModel(str(work_dir / "rm"), "fp32", 1024, kinds=("reward_model",))).scores(
        batch.tokens, lengths)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(torch.tensor([line["score"] for line in lines]), expected, rtol=1e-4, atol=1e-5)
    # A stage-1 run reads it as it is.
    assert all(set(line) == {"prompt", "response", "score", "source_label"} for line in lines)

    completed = subprocess.run([sys.executable, "tools/label_with_reward_model.py", "--reward-model",
                                str(work_dir / "gvm"), "--data", FIXTURE, "--output", str(tmp_path / "x.jsonl")],
                               cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and "holds a 'gvm' checkpoint" in completed.stderr + completed.stdout


# -- PPO -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ppo_tp1(work_dir, tmp_path_factory):
    return run_torchrun("rl_steps.py", 1, "ppo", str(work_dir), "1", "1", tmp_path=tmp_path_factory.mktemp("ppo"))


def test_ppo_trains_policy_and_critic_and_leaves_reward_model_and_reference_bit_identical(ppo_tp1):
    assert ppo_tp1["policy_changed"], "policy or critic unchanged"
    assert ppo_tp1["frozen_unchanged"] and ppo_tp1["frozen_have_no_grad"]
    first, second = ppo_tp1["metrics"]
    # Reward model and critic both start with the fixture's random head (restored, not a fresh zero head).
    assert abs(first["rollout/score"]) > 1e-3 and abs(first["rollout/critic_value_mean"]) > 1e-3
    assert first["rollout/kl"] == pytest.approx(0.0, abs=1e-4)
    assert second["rollout/kl"] > 1e-4
    for step in (first, second):
        assert step["train/critic_loss"] > 0 and step["train/grad_norm"] > 0
        assert math.isfinite(step["train/critic_explained_variance"])


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_ppo_at_tp2_and_pp2_equals_tp1(work_dir, ppo_tp1, tp, pp, tmp_path):
    result = run_torchrun("rl_steps.py", tp * pp, "ppo", str(work_dir), str(tp), str(pp), tmp_path=tmp_path)
    assert result["rollouts"] == ppo_tp1["rollouts"]
    for expected, actual in zip(ppo_tp1["metrics"], result["metrics"]):
        for name in PPO_METRICS:
            assert actual[name] == pytest.approx(expected[name], rel=2e-3, abs=2e-5), name
    torch.testing.assert_close(torch.tensor(result["logits"]), torch.tensor(ppo_tp1["logits"]), rtol=1e-3, atol=1e-3)


def _ppo_command(work_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "examples/train_ppo.py", "model=tiny", f"run_dir={run_dir}",
            f"init_from={work_dir / 'init'}", f"reward_model={work_dir / 'rm'}", "rollout.prompts_per_step=4",
            "rollout.sampling.max_new_tokens=10", "ppo.micro_batch_size=1", "data.max_prompt_tokens=96",
            "eval.num_prompts=4", "eval.batch_size=4", "eval.max_new_tokens=8", "optim.lr=1e-3",
            "critic.optim.lr=1e-3", "critic.warmup_steps=1", "train.steps=3", "train.save_every=1",
            "export_hf=false", *overrides]


def test_killed_and_resumed_ppo_reproduces_the_uninterrupted_run(work_dir, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    output = _run(_ppo_command(work_dir, uninterrupted))
    assert "PPO summary" in output
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(_ppo_command(work_dir, killed), killed)
    output = _run(_ppo_command(work_dir, killed, "resume=true"))
    assert "resumed from" in output
    expected, actual = _step_metrics(uninterrupted), _step_metrics(killed)
    assert sorted(actual) == [1, 2, 3] and actual == expected
    # Step 1 is the critic's warm-up: the policy does not move, so step 2 still samples from the reference.
    assert "train/pg_loss" not in expected[1] and "train/pg_loss" in expected[2]
    assert expected[2]["rollout/kl"] == pytest.approx(0.0, abs=1e-4) and expected[3]["rollout/kl"] > 1e-4
    assert (killed / "final_critic" / "nemo_dvpo_checkpoint.json").exists()


# -- GRPO ------------------------------------------------------------------------------------------------

def test_grpo_trains_with_group_relative_advantages_and_pp2_equals_tp1(work_dir, tmp_path):
    tp1 = run_torchrun("rl_steps.py", 1, "grpo", str(work_dir), "1", "1", tmp_path=tmp_path)
    assert tp1["policy_changed"] and tp1["frozen_unchanged"] and tp1["frozen_have_no_grad"]
    first = tp1["metrics"][0]
    # A step's rollout is groups of two responses to one prompt.
    rollouts = tp1["rollouts"][0]
    assert rollouts[0][:8] == rollouts[1][:8] and rollouts[2][:8] == rollouts[3][:8]
    assert first["rollout/kl"] == pytest.approx(0.0, abs=1e-4)
    pp2 = run_torchrun("rl_steps.py", 2, "grpo", str(work_dir), "1", "2", tmp_path=tmp_path)
    assert pp2["rollouts"] == tp1["rollouts"]
    for expected, actual in zip(tp1["metrics"], pp2["metrics"]):
        for name in ("rollout/score", "rollout/kl", "train/pg_loss", "train/kl_loss", "train/grad_norm"):
            assert actual[name] == pytest.approx(expected[name], rel=2e-3, abs=2e-5), name


# -- DPO -------------------------------------------------------------------------------------------------

def _dpo_command(work_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "examples/train_dpo.py", "model=tiny", f"run_dir={run_dir}",
            f"init_from={work_dir / 'init'}", f"data.train={FIXTURE}", f"data.eval={FIXTURE}",
            "data.eval_prompts=null", "train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.eval_every=2", "train.eval_max_pairs=8", "train.save_every=1", "optim.lr=1e-3",
            "export_hf=false", *overrides]


def test_dpo_starts_at_log_2_learns_and_resumes_exactly(work_dir, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    output = _run(_dpo_command(work_dir, uninterrupted))
    assert "DPO summary" in output
    metrics = _step_metrics(uninterrupted)
    # The policy starts as the reference: every implicit reward is 0 and the loss -log sigma(0) = log 2.
    assert metrics[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[4]["train/loss"] < metrics[1]["train/loss"] - 0.01
    assert 0.0 <= metrics[4]["eval/pair_accuracy"] <= 1.0

    killed = tmp_path / "killed"
    kill_after_first_checkpoint(_dpo_command(work_dir, killed), killed)
    assert "resumed from" in _run(_dpo_command(work_dir, killed, "resume=true"))
    assert _step_metrics(killed) == metrics


def test_dpo_at_tp2_equals_tp1(work_dir, tmp_path):
    single = tmp_path / "tp1"
    _run(_dpo_command(work_dir, single, "train.steps=2"))
    double = tmp_path / "tp2"
    _run([sys.executable, "-m", "nemo_dvpo.launch", "--standalone", "--nproc-per-node=2",
          *_dpo_command(work_dir, double, "train.steps=2", "parallel.tensor_model_parallel_size=2")[1:]])
    expected, actual = _step_metrics(single), _step_metrics(double)
    for step in (1, 2):
        for name in ("train/loss", "train/grad_norm", "train/chosen_reward", "eval/pair_accuracy"):
            if name in expected[step]:
                assert actual[step][name] == pytest.approx(expected[step][name], rel=2e-3, abs=2e-5), name
