"""DVPO, DPO, PPO and GRPO at equal budget on IFEval's 541 prompts, every answer shipped (docs/benchmarks.md).

The whole plan of docs/benchmarks.md, "IFEval-541 at equal budget: the plan, fixed before any answer", as one
resumable command: the stage-1 models (a GVM and a reward model on the same 801 pairs), the four policies of
``benchmarks/quality_at_equal_budget.py``, the starting model's and each policy's IFEval answers (shipped under
``docs/evals/ifeval541/<name>``), the paired reports, then a GVM on all 2,134 training pairs.

    python benchmarks/ifeval541_at_equal_budget.py --jobs 2      # two steps at a time, one thread each

Stop it at any point (or lose the machine) and run the same command again: a finished step is skipped (its
output exists), an interrupted training continues from its checkpoint (``resume=true``), an interrupted
evaluation keeps every answer it wrote. Each step's output goes to ``runs/ifeval541/logs/<step>.log``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _runs import REPO_ROOT

PY = sys.executable
IFEVAL = ["--benchmarks", "ifeval", "--batch-size", "64", "--max-new-tokens", "512"]
POLICIES = ("dvpo", "dpo", "ppo", "grpo")
BUDGET = ["--gvm", "runs/gvm_pair/final", "--reward-model", "runs/rm_pair/final", "--steps", "12", "--prompts", "16",
          "--epochs", "1", "--mini-batch", "2", "--micro-batch", "2", "--group-size", "4", "--response-tokens", "64",
          "--eval-prompts", "192", "--eval-tokens", "128", "--pairs", "runs/gvm_pair.train.jsonl",
          "--run-dir", "runs/quality_equal_budget"]


@dataclass
class Step:
    name: str
    command: list[str]
    done: str            # the file whose existence means the step has finished
    needs: tuple = ()    # files that must exist before it starts
    makes: tuple = ()    # other files it makes that later steps need


def ifeval_step(name: str, model: str, needs: tuple = (), shown_as: str = "") -> Step:
    return Step(f"ifeval_{name}", [PY, "tools/eval_benchmarks.py", "--model", model, "--name", shown_as or name,
                                   *IFEVAL, "--output-dir", f"runs/ifeval541/{name}",
                                   "--ship-to", f"docs/evals/ifeval541/{name}"],
                f"docs/evals/ifeval541/{name}/provenance.json", needs)


def plan() -> list[Step]:
    policy_final = {name: f"runs/quality_equal_budget/{name}/summary.json" for name in POLICIES}
    steps = [
        Step("gvm_801_pairs", [PY, "benchmarks/gvm_smollm2.py", "--labels", "pair", "--train-prompts", "600",
                               "--steps", "100", "--eval-every", "25", "--eval-pairs", "100", "resume=true",
                               "model.activation_recompute=full"],
             "runs/gvm_pair/heldout_accuracy.json", makes=("runs/gvm_pair.train.jsonl",)),
        Step("reward_model_801_pairs", [PY, "examples/train_reward_model.py", "run_dir=runs/rm_pair",
                                        "data.train=runs/gvm_pair.train.jsonl", "train.steps=100",
                                        "train.global_batch_size=16", "train.micro_batch_size=8", "train.eval_every=50",
                                        "train.save_every=25", "train.eval_max_pairs=100", "optim.lr=2e-5",
                                        "optim.min_lr=2e-6", "optim.warmup_steps=3", "resume=true"],
             "runs/rm_pair/final/nemo_dvpo_checkpoint.json", needs=("runs/gvm_pair.train.jsonl",)),
        Step("policies_dvpo_dpo", [PY, "benchmarks/quality_at_equal_budget.py", *BUDGET, "--algorithms", "dvpo,dpo",
                                   "optim.lr=3e-6"],
             policy_final["dpo"], needs=("runs/gvm_pair/heldout_accuracy.json",), makes=(policy_final["dvpo"],)),
        Step("policies_ppo_grpo", [PY, "benchmarks/quality_at_equal_budget.py", *BUDGET, "--algorithms", "ppo,grpo",
                                   "optim.lr=3e-6"],
             policy_final["grpo"], needs=("runs/rm_pair/final/nemo_dvpo_checkpoint.json",),
             makes=(policy_final["ppo"],)),
        # The starting model's answers need no training; they wait for stage 1 so as not to delay it.
        ifeval_step("base", "smollm2_135m", needs=("runs/rm_pair/final/nemo_dvpo_checkpoint.json",),
                    shown_as="SmolLM2-135M-Instruct"),
        *[ifeval_step(name, f"runs/quality_equal_budget/{name}/final", needs=(policy_final[name],))
          for name in POLICIES],
    ]
    shipped = tuple(f"docs/evals/ifeval541/{name}/provenance.json" for name in ("base", *POLICIES))
    folders = [f"runs/ifeval541/{name}" for name in ("base", *POLICIES)]
    steps += [
        Step("report_against_the_start", [PY, "tools/eval_benchmarks.py", "--compare", *folders,
                                          "--output-dir", "runs/ifeval541/report_vs_base"],
             "runs/ifeval541/report_vs_base/report.md", needs=shipped),
        Step("report_against_dvpo", [PY, "tools/eval_benchmarks.py", "--compare", *folders[1:],
                                     "--output-dir", "runs/ifeval541/report_vs_dvpo"],
             "runs/ifeval541/report_vs_dvpo/report.md", needs=shipped),
        Step("gvm_all_pairs", [PY, "benchmarks/gvm_smollm2.py", "--labels", "pair", "--train-prompts", "100000",
                               "--steps", "267", "--eval-every", "50", "--eval-pairs", "100", "--run-dir",
                               "runs/gvm_pair_all", "resume=true", "model.activation_recompute=full"],
             "runs/gvm_pair_all/heldout_accuracy.json", needs=shipped),
    ]
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="steps run at the same time (each gets 1 thread)")
    parser.add_argument("--dry-run", action="store_true", help="print what is done, ready and waiting; run nothing")
    args = parser.parse_args()
    steps, running = plan(), {}
    logs = REPO_ROOT / "runs" / "ifeval541" / "logs"

    def exists(relative: str) -> bool:
        return (REPO_ROOT / relative).exists()
    if args.dry_run:
        for step in steps:
            state = "done" if exists(step.done) else ("ready" if all(map(exists, step.needs)) else "waiting")
            print(f"{state:8s} {step.name}: {' '.join(step.command[1:])}")
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pending = [step for step in steps if not exists(step.done)]
    while pending or running:
        for step in [step for step in pending if all(map(exists, step.needs))][:max(0, args.jobs - len(running))]:
            logs.mkdir(parents=True, exist_ok=True)
            print(f"[ifeval541] start {step.name}", flush=True)
            with open(logs / f"{step.name}.log", "a") as log:
                running[step.name] = subprocess.Popen(step.command, cwd=REPO_ROOT, env=env, stdout=log,
                                                      stderr=subprocess.STDOUT)
            pending.remove(step)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode != 0:
                    for other in running.values():
                        other.terminate()
                    raise SystemExit(f"[ifeval541] {name} failed (exit {process.returncode}): see {logs / name}.log; "
                                     "fix the cause and run the same command again")
                print(f"[ifeval541] done {name}", flush=True)
        if pending and not running and not any(all(map(exists, step.needs)) for step in pending):
            raise SystemExit(f"[ifeval541] {[step.name for step in pending]} wait for files no step makes")
        time.sleep(10)
    print("[ifeval541] all done: runs/ifeval541/report_vs_base/report.md, runs/ifeval541/report_vs_dvpo/report.md")


if __name__ == "__main__":
    main()
