"""model.activation_recompute=full: the same gradients as keeping every activation, far fewer activations kept,
and a training recipe runs with it (the tiny model; the SmolLM2 memory and time are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, entry_point_env

FIXTURE_PAIRS = "tests/fixtures/ultrafeedback_binarized_mini.jsonl"


def _gradients_and_saved_bytes(model_cfg, hf_model) -> tuple[dict[str, torch.Tensor], int]:
    from nemo_dvpo.models.forward import position_ids_for
    from nemo_dvpo.utils.distributed import ParallelConfig
    from tests.distributed.common import megatron_from_hf

    model = megatron_from_hf(model_cfg, hf_model, ParallelConfig())[0]
    model.train()
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    saved: dict[int, int] = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        logits = model(tokens, position_ids_for(tokens), attention_mask=None)
    # Cross entropy of each next token: a loss that reaches every parameter.
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, sum(saved.values())


@pytest.mark.slow
def test_full_recompute_gives_the_same_gradients_and_keeps_fewer_activations(megatron_single_rank):
    from nemo_dvpo.models.config import load_model_config
    from tests.distributed.common import random_hf_model

    hf_model = random_hf_model(load_model_config("tiny"))
    kept, kept_bytes = _gradients_and_saved_bytes(load_model_config("tiny"), hf_model)
    recomputed, recomputed_bytes = _gradients_and_saved_bytes(
        load_model_config("tiny", activation_recompute="full"), hf_model)
    assert kept.keys() == recomputed.keys()
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], rtol=0, atol=1e-6, msg=name)
    assert any(gradient.abs().sum() > 0 for gradient in kept.values())
    # Only each layer's input (and the output layer's) stays alive through the forward pass.
    assert recomputed_bytes < 0.5 * kept_bytes, (recomputed_bytes, kept_bytes)


def test_a_bad_recompute_mode_is_refused_naming_the_field():
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="activation_recompute"):
        load_model_config("tiny", activation_recompute="selective")


@pytest.mark.slow
def test_dvpo_runs_with_full_recompute_after_generating(tiny_policy_and_gvm, tmp_path):
    # Generation (under inference mode) comes before every training step: the tables it caches must not be
    # what the recomputed layers save for backward.
    completed = subprocess.run(
        [sys.executable, "examples/train_dvpo.py", "model=tiny", "model.activation_recompute=full",
         f"run_dir={tmp_path / 'dvpo'}", f"init_from={tiny_policy_and_gvm / 'init'}",
         f"gvm={tiny_policy_and_gvm / 'gvm'}", "train.steps=2", "train.save_every=2", "export_hf=false",
         "rollout.prompts_per_step=4", "rollout.sampling.max_new_tokens=10", "ppo.micro_batch_size=1",
         "data.max_prompt_tokens=96", "eval.before=false", "eval.after=false"],
        cwd=REPO_ROOT, env=entry_point_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]
    # The policy comes from an init_from checkpoint saved without recompute: the run's setting still applies.
    metadata = json.loads((tmp_path / "dvpo" / "final" / "nemo_dvpo_checkpoint.json").read_text())
    assert metadata["model"]["activation_recompute"] == "full"


@pytest.mark.slow
def test_a_checkpoint_runs_with_the_callers_precision_and_recompute_and_keeps_its_shape(tiny_policy_and_gvm):
    from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config
    from nemo_dvpo.models.config import load_model_config

    stored = read_checkpoint_model_config(tiny_policy_and_gvm / "init")
    caller = load_model_config("tiny", num_layers=stored.num_layers + 1, precision="bf16",
                               activation_recompute="full")
    run = read_checkpoint_model_config(tiny_policy_and_gvm / "init", run_as=caller)
    assert (stored.precision, stored.activation_recompute) == ("fp32", "none")
    assert (run.precision, run.activation_recompute) == ("bf16", "full")
    assert run.num_layers == stored.num_layers and run.tokenizer == stored.tokenizer


@pytest.mark.slow
def test_gvm_training_runs_with_full_recompute(tmp_path):
    completed = subprocess.run(
        [sys.executable, "examples/train_gvm.py", "model=tiny", "model.activation_recompute=full",
         f"run_dir={tmp_path / 'gvm'}", f"data.train={FIXTURE_PAIRS}", "data.eval=null", "train.steps=2",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.save_every=2",
         "train.value_stats_samples=4", "train.eval_every=2"],
        cwd=REPO_ROOT, env=entry_point_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]
    assert (tmp_path / "gvm" / "final" / "nemo_dvpo_checkpoint.json").exists()
