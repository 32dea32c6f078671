"""bf16 value models and policies on the tiny model: a bf16 trunk trained through fp32 master weights with the
value head computed in fp32; GVM training killed after its first checkpoint and resumed reproduces the
uninterrupted run's every logged number, with and without the distributed optimizer; frozen value models keep
an fp32 head; a bf16 DVPO policy killed and resumed reproduces its uninterrupted run, with both optimizers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, entry_point_env as _env, kill_after_first_checkpoint
from tests.test_dvpo_recipe import _command, _given_gvm, _step_metrics

FIXTURE = "tests/fixtures/ultrafeedback_binarized_mini.jsonl"


def _gvm_command(run_dir: Path, *overrides: str) -> list[str]:
    # Four steps, a checkpoint after step 2: steps 3 and 4 are what a resumed run must reproduce. Held-out
    # accuracy at steps 2 and 4 also checks the forward of the restored model.
    return [sys.executable, "examples/train_gvm.py", "model=tiny", "model.precision=bf16", f"run_dir={run_dir}",
            f"data.train={FIXTURE}", f"data.eval={FIXTURE}", "train.steps=4", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.eval_every=2", "train.save_every=2", "train.eval_max_pairs=8",
            "train.value_stats_samples=8", "optim.lr=1e-3", "optim.warmup_steps=1", *overrides]


def _run(command: list[str]) -> str:
    completed = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    return output




def _read_distributed_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch distributed checkpoint folder, read without megatron-core (an independent view)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent.parent.parent / f"{folder.parent.name}_{folder.name}.pt"
    dcp_to_torch_save(folder, target)
    return {key: value for key, value in torch.load(target, weights_only=False).items() if torch.is_tensor(value)}


def _optimizer_option(distributed: bool) -> str:
    return f"optim.use_distributed_optimizer={str(distributed).lower()}"


@pytest.fixture(scope="module", params=[False, True], ids=["optimizer", "distributed_optimizer"])
def uninterrupted(request, tmp_path_factory) -> tuple[Path, bool]:
    """One complete bf16 run with the fp16/bf16 optimizer, or with the distributed optimizer."""
    run_dir = tmp_path_factory.mktemp("bf16_gvm") / "uninterrupted"
    _run(_gvm_command(run_dir, _optimizer_option(request.param)))
    return run_dir, request.param


@pytest.mark.slow
def test_killed_and_resumed_bf16_gvm_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    # The reference is a run of the same settings: the two optimizers agree only to rounding (the distributed
    # one takes the gradient norm over its flat buffer).
    reference, distributed = uninterrupted
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(_gvm_command(killed, _optimizer_option(distributed)), killed)
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    output = _run(_gvm_command(killed, _optimizer_option(distributed), "resume=true"))
    assert "resumed from" in output
    expected, actual = _step_metrics(reference), _step_metrics(killed)
    assert sorted(actual) == [1, 2, 3, 4]
    assert actual == expected
    # The steps after the checkpoint trained: equality is not that of a model that stopped moving.
    assert expected[4]["train/loss"] != expected[3]["train/loss"]
    assert expected[4]["train/value_std"] > 0 and expected[4]["train/grad_norm"] > 0


def _has_bits_beyond_bf16(tensor: torch.Tensor) -> bool:
    return not torch.equal(tensor, tensor.to(torch.bfloat16).float())


@pytest.mark.slow
def test_bf16_checkpoint_holds_bf16_weights_and_fp32_master_weights(uninterrupted):
    run_dir, distributed = uninterrupted
    step = run_dir / "checkpoints" / "step_0000002"
    weights = _read_distributed_checkpoint(step / "weights")
    optimizer = _read_distributed_checkpoint(step / "optimizer")
    assert {weights[name].dtype for name in weights} == {torch.bfloat16}
    if distributed:
        # One flat buffer of bf16 parameters with fp32 gradients, and its fp32 master copy and Adam moments.
        state = {key.rsplit(".", 1)[1]: value for key, value in optimizer.items() if ".gbuf_idx_" in key}
        assert sorted(state) == ["exp_avg", "exp_avg_sq", "param"]
        assert all("dtype_(torch.bfloat16, torch.float32)" in key for key in optimizer if ".gbuf_idx_" in key)
        assert {value.dtype for value in state.values()} == {torch.float32}
        assert state["param"].numel() >= sum(value.numel() for value in weights.values())
        assert _has_bits_beyond_bf16(state["param"])
    else:
        for name in weights:
            master = optimizer[f"optimizer.state.fp32_param.{name}"]
            assert master.dtype == torch.float32 and optimizer[f"optimizer.state.exp_avg.{name}"].dtype == torch.float32
            # The model's weights are the master weights rounded to bf16 ...
            assert torch.equal(weights[name], master.to(torch.bfloat16)), name
        # ... and the masters keep what bf16 cannot hold (by step 2 only the zero-initialised head has moved:
        # the trunk's gradients vanish through a zero head).
        assert _has_bits_beyond_bf16(optimizer["optimizer.state.fp32_param.output_layer.weight"])
    final = json.loads((run_dir / "final" / "nemo_dvpo_checkpoint.json").read_text())
    assert final["model"]["precision"] == "bf16" and final["gvm"]["value_stats"]["std"] > 0


def test_value_head_computes_in_fp32_from_a_bf16_hidden_state():
    from nemo_dvpo.models.value_model import ValueHead

    generator = torch.Generator().manual_seed(0)
    head = ValueHead(64, dtype=torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, 64, generator=generator))
        head.bias.fill_(0.3)
    hidden = torch.randn(2, 5, 64, generator=generator).to(torch.bfloat16)
    values, _ = head(hidden)
    assert values.dtype == torch.float32
    expected = torch.nn.functional.linear(hidden.float(), head.weight.float(), head.bias.float())
    assert torch.equal(values, expected)
    # What a bf16 head would give differs: the test can tell the two apart.
    assert not torch.equal(values, torch.nn.functional.linear(hidden, head.weight, head.bias).float())
    values.sum().backward()
    assert head.weight.grad.dtype == torch.bfloat16 and head.weight.grad.abs().sum() > 0


def test_trained_bf16_value_model_has_bf16_parameters_fp32_masters_and_fp32_values(megatron_single_rank):
    from nemo_dvpo.models.builder import unwrap_model
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.value_model import build_value_model, token_values, value_head
    from nemo_dvpo.training.optim import OptimConfig, build_optimizer, ddp_config_for

    model_cfg = load_model_config("tiny", precision="bf16")
    optim = OptimConfig(lr=1e-3)
    trained = build_value_model(model_cfg, wrap_with_ddp=True, ddp_config=ddp_config_for(optim), seq_length=32)
    assert {param.dtype for param in unwrap_model(trained[0]).parameters()} == {torch.bfloat16}
    optimizer, _ = build_optimizer(trained, optim, total_steps=2)
    masters = [param for group in optimizer.param_groups for param in group["params"]]
    assert masters and {param.dtype for param in masters} == {torch.float32}
    head = value_head(trained)
    assert any(master.shape == head.weight.shape for master in masters)
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    assert token_values(trained, tokens).dtype == torch.float32

    # A frozen bf16 value model (stage 2's GVM, PPO's reward model) keeps its head in fp32.
    frozen = build_value_model(model_cfg, seq_length=32)
    assert value_head(frozen).weight.dtype == torch.float32
    assert unwrap_model(frozen[0]).embedding.word_embeddings.weight.dtype == torch.bfloat16


# -- a bf16 policy: DVPO against an fp32 GVM -------------------------------------------------------------------

def _dvpo_command(work_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    # The tiny DVPO run of test_dvpo_recipe (four steps, a checkpoint after each; the kill comes after step 1),
    # its policy in bf16: it starts from the fixture's fp32 checkpoint, cast to bf16 on load.
    return _command(run_dir, *_given_gvm(work_dir), "model.precision=bf16", "eval.before=false", "eval.after=false",
                    *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("distributed", [False, True], ids=["optimizer", "distributed_optimizer"])
def test_killed_and_resumed_bf16_dvpo_policy_reproduces_the_uninterrupted_run(tiny_policy_and_gvm, distributed,
                                                                               tmp_path):
    option = _optimizer_option(distributed)
    reference = tmp_path / "uninterrupted"
    _run(_dvpo_command(tiny_policy_and_gvm, reference, option))
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(_dvpo_command(tiny_policy_and_gvm, killed, option), killed)
    output = _run(_dvpo_command(tiny_policy_and_gvm, killed, option, "resume=true"))
    assert "resumed from" in output
    expected, actual = _step_metrics(reference), _step_metrics(killed)
    assert sorted(actual) == [1, 2, 3, 4]
    assert actual == expected
    # The policy moved (the KL to the reference grows from zero) ...
    assert expected[1]["rollout/kl"] != expected[4]["rollout/kl"]
    # ... as bf16 weights trained through fp32 masters that hold what bf16 cannot.
    step = killed / "checkpoints" / (killed / "checkpoints" / "latest").read_text().strip()
    weights = _read_distributed_checkpoint(step / "weights")
    optimizer = _read_distributed_checkpoint(step / "optimizer")
    assert {value.dtype for value in weights.values()} == {torch.bfloat16}
    masters = ([value for key, value in optimizer.items() if key.endswith(".param") and ".gbuf_idx_" in key]
               if distributed else [optimizer[f"optimizer.state.fp32_param.{name}"] for name in weights])
    assert masters and all(master.dtype == torch.float32 for master in masters)
    assert any(_has_bits_beyond_bf16(master) for master in masters)
