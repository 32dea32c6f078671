"""DVPO vs PPO vs GRPO: time per step by phase and peak memory, one invocation, the same setting for all.

The three recipes run back to back (``--order``, repeated ``--repeats`` times, interleaved) on the same preset,
prompts, batch of sequences per step, response length, PPO epochs, mini-batches and parallel layout:

* DVPO: policy (trains), reference and the frozen GVM;
* PPO: policy and critic (both train, the critic from the reward model), reference and the frozen reward model;
* GRPO: policy (trains), reference and the frozen reward model; the same number of sequences per step as
  groups (``--group-size`` responses per prompt, so ``prompts / group-size`` prompts).

Each run is a separate process (peak memory is per process: RSS on CPU, max allocated and reserved on GPU).
Printed: the median over steps 2..N of the step and of each phase, peak memory, and the DVPO/PPO and
DVPO/GRPO ratios of time and memory. The default setting is the peer-figure setting of
``benchmarks/dvpo_step_time.py`` (SmolLM2-135M, fp32, 8 sequences of at most 64 prompt tokens + exactly 64
response tokens, 4 PPO epochs of mini-batches of 2).

    python benchmarks/efficiency.py --gvm runs/gvm_timing/final --reward-model runs/rm_timing/final
    python benchmarks/efficiency.py ... --steps 5 --repeats 2 -- model=llama3_2_3b model.precision=bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _runs import REPO_ROOT, median_of, read_metrics, run_entry_point

ENTRY_POINTS = {"dvpo": "train_dvpo.py", "ppo": "train_ppo.py", "grpo": "train_grpo.py"}
# Phases in the order a step runs them; a recipe logs the ones it has.
PHASES = ("generation", "reference_forward", "gvm_forward", "reward_forward", "critic_forward", "critic_update",
          "update")


def setting(args) -> list[str]:
    """Overrides shared by every recipe (no KL budget: the embedded DVPO default's keeps a host copy of the policy,
    which would count against DVPO only)."""
    return [f"train.steps={args.steps}", f"train.save_every={args.steps + 1}", "train.kl_budget=null",
            f"rollout.sampling.max_new_tokens={args.response_tokens}", "rollout.sampling.stop_on_eos=false",
            f"data.max_prompt_tokens={args.prompt_tokens}", f"ppo.ppo_epochs={args.epochs}",
            f"ppo.mini_batch_size={args.mini_batch}", f"ppo.micro_batch_size={args.micro_batch}",
            "eval.before=false", "eval.after=false", "export_hf=false"]


def recipe_overrides(algorithm: str, args) -> list[str]:
    if algorithm == "dvpo":
        return [f"gvm={args.gvm}", f"rollout.prompts_per_step={args.sequences}", "rollout.samples_per_prompt=1"]
    if algorithm == "ppo":
        # The critic trains as many epochs as the policy: the PPO of the papers DVPO compares against.
        return [f"reward_model={args.reward_model}", f"rollout.prompts_per_step={args.sequences}",
                "rollout.samples_per_prompt=1", f"critic.epochs={args.epochs}", "critic.warmup_steps=0"]
    return [f"reward_model={args.reward_model}", f"rollout.prompts_per_step={args.sequences // args.group_size}",
            f"rollout.samples_per_prompt={args.group_size}"]


def summarize(run_dir: Path) -> dict[str, float]:
    records = [record for record in read_metrics(run_dir) if record["step"] > 1]
    summary = {"step": median_of(records, "time/step_s")}
    for phase in PHASES:
        if any(f"time/{phase}_s" in record for record in records):
            summary[phase] = median_of(records, f"time/{phase}_s")
    summary["peak_mib"] = max(record["perf/peak_memory_mib"] for record in records)
    if any("perf/peak_reserved_mib" in record for record in records):
        summary["reserved_mib"] = max(record["perf/peak_reserved_mib"] for record in records)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True, help="a GVM checkpoint (examples/train_gvm.py's final/)")
    parser.add_argument("--reward-model", required=True,
                        help="a reward-model checkpoint (examples/train_reward_model.py's final/)")
    parser.add_argument("--steps", type=int, default=5, help="steps per run; step 1 is the warm-up")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each recipe, interleaved")
    parser.add_argument("--order", default="dvpo,ppo,grpo")
    parser.add_argument("--sequences", type=int, default=8, help="sequences per step (all recipes)")
    parser.add_argument("--group-size", type=int, default=4, help="GRPO's responses per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--mini-batch", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--run-dir", default="runs/bench_efficiency")
    parser.add_argument("--json-out", help="write every run's summary here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every recipe (after --)")
    args = parser.parse_args()
    algorithms = args.order.split(",")
    if unknown := set(algorithms) - set(ENTRY_POINTS):
        parser.error(f"--order: unknown recipes {sorted(unknown)} (choose from {sorted(ENTRY_POINTS)})")
    if args.sequences % args.group_size:
        parser.error(f"--sequences {args.sequences} must be a multiple of --group-size {args.group_size}")

    runs: dict[str, list[dict]] = {name: [] for name in algorithms}
    for repeat in range(args.repeats):
        for algorithm in algorithms:
            run_dir = (REPO_ROOT / args.run_dir / f"{algorithm}_{repeat}").resolve()
            wall = run_entry_point(ENTRY_POINTS[algorithm], [f"run_dir={run_dir}", *setting(args),
                                                             *recipe_overrides(algorithm, args), *args.overrides])
            runs[algorithm].append({**summarize(run_dir), "wall_s": wall})

    print(f"\nmedian of steps 2..{args.steps}, {args.sequences} sequences x {args.response_tokens} response tokens, "
          f"{args.epochs} epochs of mini-batches of {args.mini_batch}; overrides {args.overrides or 'none'}")
    columns = ["step", *PHASES, "peak_mib", "reserved_mib"]
    shown = [c for c in columns if any(c in run for name in algorithms for run in runs[name])]
    print(f"{'run':10s}" + "".join(f"{c:>19s}" for c in shown))
    for name in algorithms:
        for repeat, run in enumerate(runs[name]):
            print(f"{name + ' ' + str(repeat + 1):10s}" + "".join(
                f"{run[c]:19.2f}" if c in run else f"{'-':>19s}" for c in shown))

    def median(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    for other in ("ppo", "grpo"):
        if "dvpo" in runs and other in runs:
            print(f"DVPO/{other.upper()}: time per step {median('dvpo', 'step') / median(other, 'step'):.2f}, "
                  f"peak memory {median('dvpo', 'peak_mib') / median(other, 'peak_mib'):.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
