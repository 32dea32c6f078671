"""LoRA (megatron-bridge's PEFT) on the tiny model: a fresh adapter and the adapters switched off compute exactly
the base model; the backward through the frozen output layer is one matrix product; training moves only the
adapters (and a value model's head); the merged HF export computes the adapted model's logits (TP=1 and TP=2);
training checkpoints resume exactly and load merged into plain models; a killed LoRA DPO run resumes to the
uninterrupted run's metrics and its final checkpoint differs from the starting policy only in the adapted layers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, entry_point_env, kill_after_first_checkpoint, run_torchrun
from tests.test_dvpo_recipe import _step_metrics
from tests.tolerances import llama_terms, reduction_atol

FIXTURE = str(REPO_ROOT / "tests" / "fixtures" / "ultrafeedback_binarized_mini.jsonl")
ADAPTED = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def _tiny():
    from nemo_dvpo.models.config import load_model_config

    return load_model_config("tiny")


def _merge_terms(seq_len: int = 11) -> int:
    """Terms a merged model (W + s B A) and its adapters (W x + s B (A x)) order differently along the tiny
    model: llama_terms "logits" (2264 at the 11 tokens of _tokens) plus the rank-4 sum of each adapter in
    4 adapted linears x 4 layers (64): 2328, i.e. 6 sqrt(n) = 289.5 eps * magnitude."""
    return llama_terms(_tiny(), seq_len) + 4 * len(ADAPTED) * _tiny().num_layers


def _tokens() -> torch.Tensor:
    return torch.randint(0, 1000, (3, 11), generator=torch.Generator().manual_seed(3))


def _randomize_adapters(model, seed: int = 5) -> None:
    """Non-zero B (a fresh adapter's B is zero), so that the adapters change the outputs."""
    from nemo_dvpo.models.lora import adapter_modules

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in adapter_modules(model):
            weight = module.adapter.linear_out.weight
            weight.copy_(0.05 * torch.randn(weight.shape, generator=generator))


def test_lora_config_is_validated_naming_the_field():
    from nemo_dvpo.models.lora import LoRAConfig
    from nemo_dvpo.utils.config import from_dict
    from nemo_dvpo.utils.errors import ConfigError

    for values, field in (({"dim": 0}, "lora.dim"), ({"alpha": 0}, "lora.alpha"), ({"dropout": 1.0}, "lora.dropout"),
                          ({"target_modules": ["q_proj"]}, "lora.target_modules"),
                          ({"target_modules": []}, "lora.target_modules")):
        with pytest.raises(ConfigError, match=field):
            LoRAConfig(**values)
    with pytest.raises(ConfigError, match="dvpo.lora.dim"):
        from_dict(LoRAConfig, {"dim": "four"}, "dvpo.lora")
    assert from_dict(LoRAConfig, {"target_modules": ["*.layers.0.*.linear_qkv"]}, "lora").dim == 16


def test_fresh_adapters_and_adapters_off_compute_exactly_the_base_model(megatron_single_rank):
    from nemo_dvpo.models.builder import build_gpt_model, unwrap_model
    from nemo_dvpo.models.forward import full_logits
    from nemo_dvpo.models.lora import LoRAConfig, adapters_disabled, apply_lora

    model_cfg, tokens = _tiny(), _tokens()
    torch.manual_seed(0)
    model = build_gpt_model(model_cfg)
    base = full_logits(model, tokens, vocab_size=model_cfg.vocab_size)
    apply_lora(model, LoRAConfig(enabled=True, dim=4, alpha=8))
    names = [name for name, param in unwrap_model(model[0]).named_parameters() if param.requires_grad]
    assert names and all(".adapter." in name for name in names)
    assert {name.split(".adapter.")[0].rsplit(".", 1)[1] for name in names} == set(ADAPTED)
    assert torch.equal(full_logits(model, tokens, vocab_size=model_cfg.vocab_size), base), "B = 0 changed the model"
    _randomize_adapters(model)
    adapted = full_logits(model, tokens, vocab_size=model_cfg.vocab_size)
    assert (adapted - base).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(full_logits(model, tokens, vocab_size=model_cfg.vocab_size), base)
    assert torch.equal(full_logits(model, tokens, vocab_size=model_cfg.vocab_size), adapted)


def test_backward_through_the_frozen_output_layer_is_one_matrix_product_with_unchanged_gradients(
        megatron_single_rank):
    """A LoRA policy's output layer is frozen; the logits' gradient reaches its backward contiguous, so the input
    gradient is one matrix product, not a batched one over positions that re-reads the vocabulary weight for
    each (5x slower on SmolLM2). The adapters' gradients are those of the route megatron takes when the output
    weight trains (torch.matmul folds the gradient itself there)."""
    from torch.profiler import profile

    from nemo_dvpo.models.builder import build_gpt_model, unwrap_model
    from nemo_dvpo.models.forward import position_ids_for
    from nemo_dvpo.models.logprobs import target_logprobs
    from nemo_dvpo.models.lora import LoRAConfig, apply_lora

    model_cfg, tokens = _tiny(), _tokens()
    torch.manual_seed(0)
    model = apply_lora(build_gpt_model(model_cfg), LoRAConfig(enabled=True, dim=4, alpha=8))
    _randomize_adapters(model)
    gpt = unwrap_model(model[0])
    trained = {name: param for name, param in gpt.named_parameters() if param.requires_grad}

    def adapter_gradients() -> dict[str, torch.Tensor]:
        for param in gpt.parameters():
            param.grad = None
        logits = gpt(tokens, position_ids_for(tokens), attention_mask=None)
        target_logprobs(logits[:, :-1], tokens[:, 1:], model_cfg.vocab_size).sum().backward()
        return {name: param.grad.clone() for name, param in trained.items()}

    with profile(record_shapes=True) as prof:
        gradients = adapter_gradients()
    vocab = gpt.output_layer.weight.shape[0]
    batched = [(event.name, event.input_shapes) for event in prof.events()
               if event.name in ("aten::bmm", "aten::baddbmm") and any(vocab in shape for shape in event.input_shapes)]
    assert not batched, f"batched products over the vocabulary in the backward: {batched}"

    gpt.output_layer.weight.requires_grad_(True)
    try:
        reference = adapter_gradients()
    finally:
        gpt.output_layer.weight.requires_grad_(False)
        gpt.output_layer.weight.grad = None
    # Both routes compute the same products; the tolerance allows for any reordering along the backward.
    terms = llama_terms(model_cfg, tokens.shape[1], tokens=tokens.numel(), through="gradients")
    for name, expected in reference.items():
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(gradients[name], expected, rtol=0, atol=reduction_atol(expected, terms))


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(tokens).logits.float()


@pytest.mark.slow
def test_merged_hf_export_computes_the_adapted_models_logits(tmp_path, megatron_single_rank):
    from nemo_dvpo.checkpointing.conversion import export_model_to_hf
    from nemo_dvpo.models.forward import full_logits
    from nemo_dvpo.models.lora import LoRAConfig, apply_lora, has_adapters
    from nemo_dvpo.models.sources import load_tokenizer
    from nemo_dvpo.rlhf.policy import finalize_policy
    from nemo_dvpo.utils.distributed import ParallelConfig
    from tests.distributed.common import megatron_from_hf, random_hf_model

    model_cfg, tokens = _tiny(), _tokens()
    hf_model = random_hf_model(model_cfg)
    model = apply_lora(megatron_from_hf(model_cfg, hf_model, ParallelConfig()), LoRAConfig(enabled=True, dim=4))
    _randomize_adapters(model)
    adapted = full_logits(model, tokens, vocab_size=model_cfg.vocab_size)
    model = finalize_policy(model)
    assert not has_adapters(model)
    # Logits ~3.1: atol ~1.1e-4 (_merge_terms). Observed 7e-6 (18.6 eps * max); was 2e-5, 35% used.
    torch.testing.assert_close(full_logits(model, tokens, vocab_size=model_cfg.vocab_size), adapted,
                               rtol=0, atol=reduction_atol(adapted, _merge_terms()))
    export_model_to_hf(model, hf_model.config, load_tokenizer(model_cfg.tokenizer_source), tmp_path / "hf")
    exported = _hf_logits(tmp_path / "hf", tokens)
    assert (exported - hf_model(tokens).logits).abs().max() > 1e-2, "the export holds the base weights"
    torch.testing.assert_close(exported, adapted, rtol=0, atol=2e-4)


@pytest.mark.slow
def test_merged_export_at_tp2_computes_the_adapted_models_logits(tmp_path):
    result = run_torchrun("lora_tp.py", 2, str(tmp_path / "hf"), tmp_path=tmp_path)
    assert result["adapters_off_equal_base"] and result["adapted_minus_base"] > 1e-2
    # Logits ~5 (lora_tp.py's logit_scale): atol ~1.7e-4 (_merge_terms). Observed 4.4e-6; was 2e-5, 22% used.
    assert result["merged_minus_adapted"] < reduction_atol(result["logit_scale"], _merge_terms())
    assert result["export_minus_adapted"] < 2e-4


def _mse_step(values_target: float):
    from nemo_dvpo.models.forward import position_ids_for

    def forward_step(tokens, chunk):
        output = chunk(tokens, position_ids_for(tokens), attention_mask=None)

        def loss_func(values):
            loss = (values.squeeze(-1).float() - values_target).pow(2).mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    return forward_step


def _value_model_with_lora(model_cfg, lora, optim):
    from nemo_dvpo.models.value_model import build_value_model, value_head
    from nemo_dvpo.training.optim import build_optimizer, ddp_config_for
    from nemo_dvpo.training.step import configure_for_training

    torch.manual_seed(0)
    model = build_value_model(model_cfg, wrap_with_ddp=True, ddp_config=ddp_config_for(optim), lora=lora)
    with torch.no_grad():
        # A non-zero head: with the zero head of a fresh GVM no gradient would reach the adapters.
        value_head(model).weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    optimizer, scheduler = build_optimizer(model, optim, total_steps=10)
    configure_for_training(model, optimizer)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> list[float]:
    from nemo_dvpo.training.step import train_step

    tokens = _tokens()
    return [train_step(model, optimizer, scheduler, [tokens], _mse_step(0.5), seq_length=tokens.shape[1],
                       micro_batch_size=tokens.shape[0])["loss"] for _ in range(steps)]


def _parameters(model) -> dict[str, torch.Tensor]:
    from nemo_dvpo.models.builder import unwrap_model

    return {name: param.detach().clone() for name, param in unwrap_model(model[0]).named_parameters()}


def test_value_model_trains_only_adapters_and_head_and_its_checkpoints_resume_and_load_merged(
        tmp_path, megatron_single_rank):
    from nemo_dvpo.checkpointing.train_checkpoint import load_training_checkpoint, save_training_checkpoint
    from nemo_dvpo.checkpointing.model_checkpoint import load_value_model
    from nemo_dvpo.models.lora import LoRAConfig
    from nemo_dvpo.models.value_model import build_value_model, token_values
    from nemo_dvpo.training.optim import OptimConfig
    from nemo_dvpo.utils.errors import CheckpointError

    model_cfg, tokens = _tiny(), _tokens()
    lora, optim = LoRAConfig(enabled=True, dim=4, alpha=8), OptimConfig(lr=1e-2, warmup_steps=0,
                                                                         decay_style="constant")
    model, optimizer, scheduler = _value_model_with_lora(model_cfg, lora, optim)
    trainable = {name for name, param in model[0].module.named_parameters() if param.requires_grad}
    assert trainable and all(".adapter." in name or name.startswith("output_layer.") for name in trainable)
    in_optimizer = sum(param.numel() for group in optimizer.param_groups for param in group["params"])
    assert in_optimizer == sum(param.numel() for param in model[0].parameters() if param.requires_grad)
    assert in_optimizer < 0.05 * sum(param.numel() for param in model[0].parameters())

    before = _parameters(model)
    # Two steps: B starts at zero, so A's gradient is zero in the first.
    _train(model, optimizer, scheduler, 2)
    after = _parameters(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable, sorted(changed ^ trainable)[:5]

    # A training checkpoint holds the adapters and resumes exactly.
    path = save_training_checkpoint(tmp_path / "run", 2, model, optimizer, scheduler, model_cfg,
                                    model_cfg.to_hf_config(), None, kind="gvm", trainer_state={})
    assert json.loads((path / "nemo_dvpo_checkpoint.json").read_text())["lora"]["dim"] == 4
    resumed, resumed_optimizer, resumed_scheduler = _value_model_with_lora(model_cfg, lora, optim)
    load_training_checkpoint(path, resumed, resumed_optimizer, resumed_scheduler)
    assert all(torch.equal(value, _parameters(resumed)[name]) for name, value in after.items())
    adapted_values = token_values(resumed, tokens)
    assert _train(model, optimizer, scheduler, 2) == _train(resumed, resumed_optimizer, resumed_scheduler, 2)

    # Into a model without adapters (a scorer, init_from) it loads merged; other adapter settings are refused.
    plain = load_value_model(model_cfg, init_from=str(path))
    # Values ~25: atol ~8.6e-4 (_merge_terms, the head summing over the hidden size like an output layer).
    # Observed 5.7e-6 (1.9 eps * max); was 1e-5 (3.4 eps * max), 57% used.
    torch.testing.assert_close(token_values(plain, tokens), adapted_values, rtol=0,
                               atol=reduction_atol(adapted_values, _merge_terms()))
    other, other_optimizer, other_scheduler = _value_model_with_lora(model_cfg, LoRAConfig(enabled=True, dim=8),
                                                                     optim)
    with pytest.raises(CheckpointError, match="resume with the lora settings it was saved with"):
        load_training_checkpoint(path, other, other_optimizer, other_scheduler)




def _run(command: list[str]) -> str:
    completed = subprocess.run(command, cwd=REPO_ROOT, env=entry_point_env(), capture_output=True, text=True,
                               timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]
    return output


def _dpo_command(init: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "examples/train_dpo.py", "model=tiny", f"run_dir={run_dir}", f"init_from={init}",
            f"data.train={FIXTURE}", "data.eval=null", "data.eval_prompts=null", "train.steps=3",
            "train.global_batch_size=4", "train.micro_batch_size=4", "train.save_every=1", "optim.lr=1e-2",
            "lora.enabled=true", "lora.dim=4", *overrides]


@pytest.mark.slow
def test_killed_lora_dpo_run_resumes_exactly_and_its_final_policy_differs_only_in_the_adapted_layers(
        tiny_policy_and_gvm, tmp_path):
    from nemo_dvpo.checkpointing.model_checkpoint import load_model_checkpoint
    from nemo_dvpo.models.builder import unwrap_model
    from nemo_dvpo.models.forward import full_logits

    init = tiny_policy_and_gvm / "init"
    uninterrupted = tmp_path / "uninterrupted"
    assert "DPO summary" in _run(_dpo_command(init, uninterrupted))
    metrics = _step_metrics(uninterrupted)
    # The reference is the policy with its adapters off, and a fresh adapter is the identity: loss log 2.
    assert metrics[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[3]["train/loss"] < metrics[1]["train/loss"]
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(_dpo_command(init, killed, "export_hf=false"), killed)
    assert "resumed from" in _run(_dpo_command(init, killed, "resume=true", "export_hf=false"))
    assert _step_metrics(killed) == metrics

    # Final checkpoint: merged weights (a plain policy); only the adapted layers moved.
    assert "lora" not in json.loads((uninterrupted / "final" / "nemo_dvpo_checkpoint.json").read_text())
    assert "lora" in json.loads((uninterrupted / "checkpoints" / "latest").parent.joinpath(
        (uninterrupted / "checkpoints" / "latest").read_text().strip(), "nemo_dvpo_checkpoint.json").read_text())
    start, _, _ = load_model_checkpoint(init)
    final, _, _ = load_model_checkpoint(uninterrupted / "final")
    start_state, final_state = unwrap_model(start[0]).state_dict(), unwrap_model(final[0]).state_dict()
    moved = {name for name, value in start_state.items()
             if torch.is_tensor(value) and not torch.equal(value, final_state[name])}
    assert moved and all(name.rsplit(".", 2)[-2] in ADAPTED for name in moved), sorted(moved)[:5]
    # The HF export is the final policy.
    tokens = _tokens()
    torch.testing.assert_close(_hf_logits(uninterrupted / "hf", tokens),
                               full_logits(final, tokens, vocab_size=_tiny().vocab_size), rtol=0, atol=2e-4)
