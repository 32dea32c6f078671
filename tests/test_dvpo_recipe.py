"""The DVPO recipe on the tiny model: TP=2 and PP=2 equal TP=1, frozen models stay frozen, the main job
runs end to end (stage 1, stage 2, summary, HF export) and a killed run resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_dvpo.utils import cpu_runtime
from tests.conftest import (
    REPO_ROOT,
    entry_point_env as _env,
    kill_after_first_checkpoint,
    read_checkpoint_tensors,
    run_torchrun,
)
from tests.tolerances import llama_terms, reduction_atol

STEP_METRICS = ("rollout/kl", "rollout/gvm_value_mean", "rollout/advantage_std", "train/entropy",
                "train/pg_loss", "train/kl_loss", "train/grad_norm", "train/clip_fraction", "train/approx_kl")


@pytest.fixture(scope="module")
def work_dir(tiny_policy_and_gvm) -> Path:
    return tiny_policy_and_gvm


@pytest.fixture(scope="module")
def tp1_result(work_dir, tmp_path_factory):
    return run_torchrun("rl_steps.py", 1, "dvpo", str(work_dir), "1", "1", tmp_path=tmp_path_factory.mktemp("tp1"))


@pytest.mark.slow
def test_two_steps_train_the_policy_and_leave_gvm_and_reference_bit_identical(tp1_result):
    assert tp1_result["policy_changed"]
    assert tp1_result["frozen_unchanged"]
    assert tp1_result["frozen_have_no_grad"]
    first, second = tp1_result["metrics"]
    # Step 1 samples from the starting policy, which is the reference: no KL yet.
    # (old log-probs come from the sampler's KV-cache path, the reference's from a full forward pass)
    assert first["rollout/kl"] == pytest.approx(0.0, abs=1e-4)
    assert second["rollout/kl"] > 1e-4
    assert first["train/grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, old_logprobs, gvm_tp", [
    (2, 1, "generation", None), (1, 2, "generation", None), (1, 1, "recompute", None),
    # the GVM on its own process groups, at a smaller and at a larger TP size than the policy
    (2, 1, "generation", 1), (1, 2, "generation", 2),
])
def test_two_steps_at_tp2_and_pp2_equal_tp1(work_dir, tp1_result, tp, pp, old_logprobs, gvm_tp, tmp_path):
    """Same run at other layouts, with old log-probs from a forward pass instead of the sampler, and
    with the GVM at another TP size than the policy."""
    gvm_args = () if gvm_tp is None else (str(gvm_tp),)
    result = run_torchrun("rl_steps.py", tp * pp, "dvpo", str(work_dir), str(tp), str(pp), old_logprobs, *gvm_args,
                          tmp_path=tmp_path)
    assert result["rollouts"] == tp1_result["rollouts"], "the sampled tokens differ between layouts"
    for expected, actual in zip(tp1_result["metrics"], result["metrics"]):
        for name in STEP_METRICS:
            assert actual[name] == pytest.approx(expected[name], rel=2e-3, abs=2e-5), name
    # After 8 Adam updates at lr 1e-3: Adam normalises each gradient, so fp32 rounding differences
    # between layouts (about 3e-5 relative in the first gradient norm) grow to a few 1e-4 in the logits.
    torch.testing.assert_close(torch.tensor(result["logits"]), torch.tensor(tp1_result["logits"]),
                               rtol=1e-3, atol=1e-3)
    assert result["frozen_unchanged"] and result["policy_changed"]
    if old_logprobs == "recompute":
        assert all("rollout/entropy" in step for step in result["metrics"])


@pytest.mark.slow
@pytest.mark.parametrize("global_tp, gvm_tp", [(1, 2), (2, 1)])
def test_gvm_at_its_own_tp_size_gives_the_values_of_the_gvm_at_the_global_layout(work_dir, global_tp, gvm_tp,
                                                                                 tmp_path):
    """(1, 2): the two data-parallel ranks bring different batches into one GVM tensor-parallel group;
    (2, 1): each rank runs the GVM alone on the batch it shares with its policy tensor-parallel peer."""
    result = run_torchrun("gvm_standalone_values.py", 2, str(work_dir / "gvm"), str(global_tp), str(gvm_tp),
                          tmp_path=tmp_path)
    assert result["value_scale"] > 0.1
    # The tiny GVM at TP=1 vs TP=2 (and another micro-batching) on rows of up to 13 tokens: llama_terms
    # "logits" at seq 13 = 2280 terms, 6 sqrt(n) = 286 eps * value_scale (~29.4): atol ~1e-3. Observed
    # 7.6e-6 (2.2 eps * value_scale) both ways; was 1e-5, 76% used.
    from nemo_dvpo.models.config import load_model_config

    terms = llama_terms(load_model_config("tiny"), seq_len=13)
    assert result["max_abs_diff"] < reduction_atol(result["value_scale"], terms)
    # The GVM really is sharded at its own size, not the global one.
    assert result["gvm_qkv_rows"] * gvm_tp == result["global_qkv_rows"] * global_tp


def _command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "examples/train_dvpo.py", "model=tiny", f"run_dir={run_dir}",
            "rollout.prompts_per_step=4", "rollout.sampling.max_new_tokens=10", "ppo.micro_batch_size=1",
            "data.max_prompt_tokens=96", "eval.num_prompts=4", "eval.batch_size=4", "eval.max_new_tokens=8",
            "optim.lr=1e-3", *overrides]


def _expected_runtime(runtime: cpu_runtime.RuntimeChoice) -> str:
    """What an entry point started from this environment runs with: the choice asked for or the machine's default,
    if its library is found (a caller's own preload of the runtime is kept instead)."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if runtime.preloaded(preloaded):
        return next(choice for choice, files in runtime.libraries.items()
                    if files and any(filename in preloaded for filename in files))
    choice, _ = runtime.requested(os.environ, gpu_machine=os.path.exists("/dev/nvidiactl"))
    return choice if choice == runtime.own or cpu_runtime.find_library(runtime, choice) else runtime.own


def _step_metrics(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: {k: v for k, v in record.items() if not k.startswith(("time/", "perf/"))}
            for record in records}


@pytest.mark.slow
def test_main_job_trains_a_gvm_first_then_the_policy_and_exports_it(tmp_path):
    run_dir = tmp_path / "main"
    completed = subprocess.run(_command(run_dir, "train.steps=2", "gvm_training.train.steps=2",
                                        "gvm_training.train.eval_every=1"),
                               cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    assert "stage 1 trains one first" in output and "DVPO summary" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["gvm"] == str(run_dir / "gvm" / "final")
    assert set(summary["gvm_heldout_accuracy"]) >= {"mean", "last", "p1", "p99"}
    assert summary["gvm_heldout_accuracy"]["pairs"] >= 1  # the stage-1 GVM records how many pairs it was checked on
    assert "what this shows" in output
    assert summary["verifiable_score_before"]["num_prompts"] == 4
    assert summary["verifiable_score_after"]["num_prompts"] == 4
    assert summary["steps_this_run"] == 2 and summary["median_step_s"] > 0
    # The entry point ran again with tcmalloc and Intel's OpenMP preloaded where the machine has them
    # (nemo_dvpo/utils/cpu_runtime.py), or as asked in the environment.
    allocator, openmp = (_expected_runtime(runtime) for runtime in (cpu_runtime.ALLOCATOR, cpu_runtime.OPENMP))
    assert (summary["cpu_allocator"], summary["cpu_openmp"]) == (allocator, openmp)
    assert f"(CPU allocator: {allocator}, OpenMP: {openmp})" in output
    assert sorted(_step_metrics(run_dir)) == [1, 2]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    hf_tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf")
    prompt = hf_tokenizer("Hello", return_tensors="pt")
    generated = hf_model.generate(**prompt, max_new_tokens=4, do_sample=False,
                                  pad_token_id=hf_tokenizer.eos_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_the_summary_says_what_the_evaluation_can_and_cannot_show():
    from nemo_dvpo.rlhf.report import _gvm_accuracy, what_the_change_shows

    # The embedded default's size: 32 prompts, a change well inside its interval.
    small = what_the_change_shows({"mean": -0.016, "ci95": 0.068, "num_prompts": 32}, 6)
    assert small.startswith("no measurable change: 32 held-out prompts only detect changes beyond +-0.068")
    assert "a run of 6 steps shows the pipeline working" in small
    assert what_the_change_shows({"mean": 0.066, "ci95": 0.043, "num_prompts": 326}, 20).startswith(
        "a run of 20 steps raised the held-out verifiable score by 0.066 (95% interval excludes 0, 326 prompts)")
    assert "lowered" in what_the_change_shows({"mean": -0.123, "ci95": 0.054, "num_prompts": 200}, 48)
    assert what_the_change_shows({"mean": 0.5, "ci95": float("nan"), "num_prompts": 1}, 1).startswith(
        "no measurable change")
    # 8 of 12 pairs: Wilson 95% interval 0.391-0.862 (by hand: centre 0.6263, half-width 0.2357).
    assert _gvm_accuracy({"mean": 8 / 12, "last": 0.25, "pairs": 12}) == (
        "mean-token 0.667, last-token 0.250 on 12 pairs (mean-token 95% interval 0.39-0.86)")
    assert _gvm_accuracy({"mean": 0.5, "last": 0.5}) == "mean-token 0.500, last-token 0.500"


@pytest.mark.slow
def test_bad_config_fails_at_start_up_naming_the_field(tmp_path):
    completed = subprocess.run(_command(tmp_path / "bad", "ppo.advantage_mode=value", "kl.placement=reward"),
                               cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert "kl.placement=reward needs ppo.advantage_mode=gae" in completed.stderr + completed.stdout


@pytest.mark.slow
def test_gvm_tp_size_that_does_not_divide_the_world_fails_at_start_up(work_dir, tmp_path):
    completed = subprocess.run(_command(tmp_path / "bad", f"gvm={work_dir / 'gvm'}",
                                        "gvm_tensor_model_parallel_size=2"),
                               cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert "gvm_tensor_model_parallel_size=2: world size 1 is not a multiple" in completed.stderr + completed.stdout


GIVEN_GVM = ("train.steps=4", "train.save_every=1", "export_hf=false")


def _given_gvm(work_dir: Path) -> tuple[str, ...]:
    return (f"init_from={work_dir / 'init'}", f"gvm={work_dir / 'gvm'}", *GIVEN_GVM)


@pytest.fixture(scope="module")
def uninterrupted(work_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dvpo") / "uninterrupted"
    completed = subprocess.run(_command(run_dir, *_given_gvm(work_dir)), cwd=REPO_ROOT, env=_env(),
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    return run_dir


@pytest.mark.slow
def test_killed_and_resumed_run_reproduces_the_uninterrupted_run(work_dir, uninterrupted, tmp_path):
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(_command(killed, *_given_gvm(work_dir)), killed)

    completed = subprocess.run(_command(killed, *_given_gvm(work_dir), "resume=true"), cwd=REPO_ROOT, env=_env(),
                               capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    assert "resumed from" in output
    expected, actual = _step_metrics(uninterrupted), _step_metrics(killed)
    assert sorted(actual) == [1, 2, 3, 4]
    assert actual == expected
    assert expected[4]["rollout/kl"] != expected[1]["rollout/kl"]
    before = json.loads((uninterrupted / "summary.json").read_text())["verifiable_score_before"]
    assert json.loads((killed / "summary.json").read_text())["verifiable_score_before"] == before


@pytest.mark.slow
def test_kl_budget_stops_and_keeps_the_last_policy_within_it(work_dir, uninterrupted, tmp_path):
    expected = _step_metrics(uninterrupted)
    kl = {step: expected[step]["rollout/kl"] for step in expected}
    # Step t measures the policy after t - 1 updates: step 1 the starting policy (KL 0), step 2 the policy after
    # one update. A budget of half step 2's KL is passed at step 2, so the run returns to the starting policy.
    assert abs(kl[1]) < 1e-4 < kl[2], kl
    budget = kl[2] / 2
    run_dir = tmp_path / "budget"
    completed = subprocess.run(_command(run_dir, *_given_gvm(work_dir), f"train.kl_budget={budget}"),
                               cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    assert "passed train.kl_budget" in output and "the final policy is the one after 0 steps" in output
    # The run is the uninterrupted one up to the step that passed the budget, then it stops.
    assert _step_metrics(run_dir) == {step: expected[step] for step in (1, 2)}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["kl_budget"] == {"budget": budget, "final_policy_step": 0, "passed_at_step": 2,
                                    "passed_with_kl": kl[2]}
    assert summary["final_kl"] == kl[1]
    # The final policy is the starting one (the init checkpoint), not the one after step 1 or 2.
    final = read_checkpoint_tensors(run_dir / "final" / "weights")
    start = read_checkpoint_tensors(work_dir / "init" / "weights")
    after_step_1 = read_checkpoint_tensors(run_dir / "checkpoints" / "step_0000001" / "weights")
    assert final.keys() == start.keys()
    assert all(torch.equal(final[name], start[name]) for name in final)
    assert not all(torch.equal(final[name], after_step_1[name]) for name in final)
    assert json.loads((run_dir / "final" / "nemo_dvpo_checkpoint.json").read_text())["step"] == 0


class _Replica(torch.nn.Sequential):
    """A stand-in for a DDP-wrapped policy chunk: a frozen base and a trained adapter; counts broadcasts."""

    def __init__(self):
        super().__init__(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
        self[0].requires_grad_(False)
        self.broadcasts = 0

    def broadcast_params(self):
        self.broadcasts += 1


def _budget(rank: int, size: int, budget: float):
    from nemo_dvpo.rlhf.kl_budget import KLBudget
    from nemo_dvpo.training.data_parallel import DataParallel

    policy = [_Replica()]
    trained = lambda: [p for m in policy for p in m.parameters() if p.requires_grad]  # noqa: E731
    return KLBudget(budget, trained, policy, DataParallel(rank=rank, size=size, group=None), "test"), policy


def test_kl_budget_keeps_one_in_place_copy_of_the_trained_parameters_only():
    budget, policy = _budget(rank=0, size=1, budget=1.0)
    base, adapter = policy[0]
    base_before = base.weight.detach().clone()
    assert not budget.watch(0, 0.5)
    kept = budget.within["weights"]
    # Only what trains is copied: the frozen base (with LoRA, the whole model but the adapters) is not.
    assert [tuple(w.shape) for w in kept] == [(1, 3), (1,)]
    with torch.no_grad():
        adapter.weight.add_(1.0)
    assert not budget.watch(1, 0.8)
    # Still within the budget: the same tensors now hold the newer policy (no second copy is allocated).
    assert all(a is b for a, b in zip(budget.within["weights"], kept))
    assert torch.equal(kept[0], adapter.weight) and budget.within["step"] == 1
    within = adapter.weight.detach().clone()
    with torch.no_grad():
        adapter.weight.add_(1.0)
    assert budget.watch(2, 1.5)
    assert budget.passed == {"step": 2, "kl": 1.5} and budget.within["step"] == 1
    assert budget.return_to_within() == 1
    assert torch.equal(adapter.weight, within) and torch.equal(base.weight, base_before)
    assert policy[0].broadcasts == 0
    assert budget.summary(final_step=1) == {"budget": 1.0, "final_policy_step": 1, "passed_at_step": 3,
                                            "passed_with_kl": 1.5}
    assert budget.final_kl(last_kl=1.5) == 0.8


def test_kl_budget_copy_lives_on_data_parallel_rank_zero_and_is_broadcast_on_return():
    for rank in (0, 1):
        budget, policy = _budget(rank=rank, size=2, budget=1.0)
        budget.watch(0, 0.5)
        assert (budget.within["weights"] is None) == (rank != 0)
        assert budget.watch(1, 2.0)
        # Every replica takes part in the broadcast from rank 0, which alone restored its weights.
        assert budget.return_to_within() == 0 and policy[0].broadcasts == 1


def test_no_kl_budget_never_passes_and_keeps_nothing():
    budget, _ = _budget(rank=0, size=1, budget=None)
    assert not budget.watch(0, 1e9) and budget.within is None and budget.summary(final_step=3) is None


@pytest.mark.slow
def test_kl_budget_must_be_positive(tmp_path):
    completed = subprocess.run(_command(tmp_path / "bad", "train.kl_budget=0"),
                               cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert "train.kl_budget must be > 0" in completed.stderr + completed.stdout
