"""DVPO, DPO, PPO and GRPO at equal budget on IFEval's 541 prompts, every answer shipped (docs/benchmarks.md).

The whole plan of docs/benchmarks.md, "IFEval-541 at equal budget: the plan, fixed before any answer", as one
resumable command: the stage-1 models (a GVM and a reward model on the same 801 pairs), the four policies of
``benchmarks/quality_at_equal_budget.py``, the starting model's and each policy's IFEval answers (shipped under
``docs/evals/ifeval541/<name>``), the paired reports (``docs/evals/ifeval541/report_vs_*``), then a GVM on all
2,134 training pairs. DVPO from that GVM, under the same budget, and its answers run only when named
(``ifeval_dvpo_all_pairs``): the plan runs them if that GVM's held-out accuracy beats the 801-pair GVM's (the rule
is in docs/benchmarks.md).

    python benchmarks/ifeval541_at_equal_budget.py --jobs 2                 # everything, two steps at a time
    python benchmarks/ifeval541_at_equal_budget.py --jobs 2 ifeval_dpo      # one policy's answers, and what they need

Stop it at any point and run the same command again: a finished step is skipped, an interrupted training
continues from its checkpoint (``resume=true``), an interrupted evaluation keeps every answer it wrote. Only
the shipped answers survive the loss of the machine (``runs/`` is not in the repository), so a step runs only
when a step still to come needs what it makes: once a policy's answers are shipped, its training and the stage-1
model behind it are never run again. On a machine that is lost between sessions, name one policy's answers a
session (``ifeval_dvpo``: a GVM, DVPO and 541 answers) so that each chain finishes before the machine goes.
Each step's output goes to ``runs/ifeval541/logs/<step>.log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from _runs import REPO_ROOT

PY = sys.executable
IFEVAL = ["--benchmarks", "ifeval", "--batch-size", "64", "--max-new-tokens", "512"]
POLICIES = ("dvpo", "dpo", "ppo", "grpo")
PAIRS = "runs/gvm_pair.train.jsonl"
GVM, REWARD_MODEL = "runs/gvm_pair/heldout_accuracy.json", "runs/rm_pair/final/nemo_dvpo_checkpoint.json"
SAME_BUDGET = ["--reward-model", "runs/rm_pair/final", "--steps", "12", "--prompts", "16", "--epochs", "1",
               "--mini-batch", "2", "--micro-batch", "2", "--group-size", "4", "--response-tokens", "64",
               "--eval-prompts", "192", "--eval-tokens", "128", "--pairs", PAIRS]
BUDGET = ["--gvm", "runs/gvm_pair/final", *SAME_BUDGET, "--run-dir", "runs/quality_equal_budget"]
ALL_PAIRS_GVM = "runs/gvm_pair_all/heldout_accuracy.json"
# What each policy's training needs: DPO learns from the pairs themselves.
POLICY_NEEDS = {"dvpo": (GVM,), "dpo": (PAIRS,), "ppo": (REWARD_MODEL,), "grpo": (REWARD_MODEL,)}
SHIPPED = "docs/evals/ifeval541"


@dataclass
class Step:
    name: str
    command: list[str]
    done: str            # the file whose existence means the step has finished
    needs: tuple = ()    # files that must exist before it starts
    makes: tuple = ()    # other files it makes that later steps need
    after: tuple = ()    # steps that must have finished first if they run at all (order only, nothing needed)
    optional: bool = False  # run only when named (or needed by a named step), never as part of "everything"


def ifeval_step(name: str, model: str, needs: tuple = (), shown_as: str = "") -> Step:
    return Step(f"ifeval_{name}", [PY, "tools/eval_benchmarks.py", "--model", model, "--name", shown_as or name,
                                   *IFEVAL, "--output-dir", f"runs/ifeval541/{name}",
                                   "--ship-to", f"{SHIPPED}/{name}"],
                f"{SHIPPED}/{name}/provenance.json", needs)


def plan() -> list[Step]:
    """Every step, in the order they start when several are ready."""
    steps = [
        Step("training_pairs", [PY, "benchmarks/gvm_smollm2.py", "--labels", "pair", "--train-prompts", "600",
                                "--data-only"], PAIRS),
        Step("gvm_801_pairs", [PY, "benchmarks/gvm_smollm2.py", "--labels", "pair", "--train-prompts", "600",
                               "--steps", "100", "--eval-every", "25", "--eval-pairs", "100", "resume=true",
                               "model.activation_recompute=full"], GVM, needs=(PAIRS,)),
        Step("reward_model_801_pairs", [PY, "examples/train_reward_model.py", "run_dir=runs/rm_pair",
                                        f"data.train={PAIRS}", "train.steps=100",
                                        "train.global_batch_size=16", "train.micro_batch_size=8", "train.eval_every=50",
                                        "train.save_every=25", "train.eval_max_pairs=100", "optim.lr=2e-5",
                                        "optim.min_lr=2e-6", "optim.warmup_steps=3", "resume=true"],
             REWARD_MODEL, needs=(PAIRS,)),
        *[Step(f"policy_{name}", [PY, "benchmarks/quality_at_equal_budget.py", *BUDGET, "--algorithms", name,
                                  "optim.lr=3e-6"],
               f"runs/quality_equal_budget/{name}/summary.json", needs=POLICY_NEEDS[name]) for name in POLICIES],
        # The starting model's answers need no training; listed after the trainings so as not to delay them.
        ifeval_step("base", "smollm2_135m", shown_as="SmolLM2-135M-Instruct"),
        *[ifeval_step(name, f"runs/quality_equal_budget/{name}/final",
                      needs=(f"runs/quality_equal_budget/{name}/summary.json",)) for name in POLICIES],
    ]
    shipped = tuple(f"{SHIPPED}/{name}/provenance.json" for name in ("base", *POLICIES))
    folders = [f"{SHIPPED}/{name}" for name in ("base", *POLICIES)]
    steps += [
        Step("report_against_the_start", [PY, "tools/eval_benchmarks.py", "--compare", *folders,
                                          "--output-dir", f"{SHIPPED}/report_vs_base"],
             f"{SHIPPED}/report_vs_base/report.md", needs=shipped),
        Step("report_against_dvpo", [PY, "tools/eval_benchmarks.py", "--compare", *folders[1:],
                                     "--output-dir", f"{SHIPPED}/report_vs_dvpo"],
             f"{SHIPPED}/report_vs_dvpo/report.md", needs=shipped),
        Step("gvm_all_pairs", [PY, "benchmarks/gvm_smollm2.py", "--labels", "pair", "--train-prompts", "100000",
                               "--steps", "267", "--eval-every", "50", "--eval-pairs", "100", "--run-dir",
                               "runs/gvm_pair_all", "resume=true", "model.activation_recompute=full"],
             ALL_PAIRS_GVM, after=tuple(f"ifeval_{name}" for name in POLICIES)),
        # DVPO from the all-pairs GVM, the same budget, settings and learning rate as policy_dvpo.
        Step("policy_dvpo_all_pairs", [PY, "benchmarks/quality_at_equal_budget.py", "--gvm", "runs/gvm_pair_all/final",
                                       *SAME_BUDGET, "--run-dir", "runs/quality_equal_budget_all_pairs",
                                       "--algorithms", "dvpo", "optim.lr=3e-6"],
             "runs/quality_equal_budget_all_pairs/dvpo/summary.json", needs=(ALL_PAIRS_GVM,), optional=True),
    ]
    all_pairs_answers = ifeval_step("dvpo_all_pairs", "runs/quality_equal_budget_all_pairs/dvpo/final",
                                    needs=("runs/quality_equal_budget_all_pairs/dvpo/summary.json",),
                                    shown_as="DVPO, GVM on all pairs")
    steps.append(dataclasses.replace(all_pairs_answers, optional=True))
    return steps


def steps_to_run(steps: list[Step], targets: list[str], exists: Callable[[str], bool]) -> list[Step]:
    """The unfinished steps among ``targets`` and those that make what one of them still needs: the first
    target's chain first, then the next target's, each in plan order.

    So ``ifeval_dvpo ifeval_ppo`` ships DVPO's answers before the reward model of PPO's chain starts (on a machine
    lost between sessions, the first chain is the one that finishes). A finished step's inputs are never made
    again: shipped answers stand without the policy behind them.
    """
    maker = {made: step for step in steps for made in (step.done, *step.makes)}
    chain_of: dict[str, int] = {}  # step name -> the index of the first target that needs it
    for index, target in enumerate(targets):
        todo = [step for step in steps if step.name == target]
        while todo:
            step = todo.pop()
            if step.name in chain_of or exists(step.done):
                continue
            chain_of[step.name] = index
            todo += [maker[need] for need in step.needs if not exists(need)]
    plan_order = {step.name: position for position, step in enumerate(steps)}
    return sorted((step for step in steps if step.name in chain_of),
                  key=lambda step: (chain_of[step.name], plan_order[step.name]))


def final_steps(steps: list[Step]) -> list[str]:
    """The steps whose outputs no other step needs: finishing them finishes the plan (optional steps aside)."""
    needed = {need for step in steps if not step.optional for need in step.needs}
    return [step.name for step in steps if not step.optional and not {step.done, *step.makes} & needed]


def main() -> None:
    steps = plan()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", metavar="STEP",
                        help=f"the steps to finish, with what they need (default: the reports and the all-pairs "
                             f"GVM, so everything); one of "
                             f"{', '.join(step.name for step in steps)}")
    parser.add_argument("--jobs", type=int, default=2, help="steps run at the same time")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                        help="OMP threads of each step (default: the cores shared by two jobs)")
    parser.add_argument("--dry-run", action="store_true", help="print what is done, ready and waiting; run nothing")
    args = parser.parse_args()
    unknown = sorted(set(args.targets) - {step.name for step in steps})
    if unknown:
        parser.error(f"no step named {', '.join(unknown)}")
    targets = args.targets or final_steps(steps)
    logs = REPO_ROOT / "runs" / "ifeval541" / "logs"

    def exists(relative: str) -> bool:
        return (REPO_ROOT / relative).exists()
    pending = steps_to_run(steps, targets, exists)
    running: dict[str, subprocess.Popen] = {}

    def ready(step: Step) -> bool:
        unfinished = {other.name for other in pending} | set(running)
        return all(map(exists, step.needs)) and not unfinished & set(step.after)
    if args.dry_run:
        for step in steps:
            state = ("done" if exists(step.done) else "not needed" if step not in pending
                     else "ready" if ready(step) else "waiting")
            print(f"{state:10s} {step.name}: {' '.join(step.command[1:])}")
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    started: dict[str, Step] = {}
    while pending or running:
        for step in [step for step in pending if ready(step)][:max(0, args.jobs - len(running))]:
            logs.mkdir(parents=True, exist_ok=True)
            print(f"[ifeval541] start {step.name}", flush=True)
            with open(logs / f"{step.name}.log", "a") as log:
                running[step.name] = subprocess.Popen(step.command, cwd=REPO_ROOT, env=env, stdout=log,
                                                      stderr=subprocess.STDOUT)
            started[step.name] = step
            pending.remove(step)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode != 0 or not exists(started[name].done):
                    for other in running.values():
                        other.terminate()
                    raise SystemExit(f"[ifeval541] {name} failed (exit {process.returncode}): see {logs / name}.log; "
                                     "fix the cause and run the same command again")
                print(f"[ifeval541] done {name}", flush=True)
        if pending and not running and not any(map(ready, pending)):
            raise SystemExit(f"[ifeval541] {[step.name for step in pending]} wait for files no step makes")
        time.sleep(10)
    print(f"[ifeval541] done: {', '.join(targets)}")


if __name__ == "__main__":
    main()
