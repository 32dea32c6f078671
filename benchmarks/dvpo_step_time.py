"""DVPO time per step and peak memory in the peer-figure setting (docs/benchmarks.md, ../shared/notes/peer-figures.md).

SmolLM2-135M-Instruct, fp32, CPU: 8 prompts (at most 64 tokens) per step, responses of exactly 64 tokens
(no EOS stop), mini-batch 2, 4 PPO epochs, no gradient accumulation, Adam. Prints the median over steps
2..N (step 1 is the warm-up) of the step and of each phase, and the process's peak memory.

    python benchmarks/dvpo_step_time.py --gvm runs/gvm_bench/final [--steps 7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _runs import REPO_ROOT, median_of, read_metrics, run_entry_point

PHASES = ("time/step_s", "time/generation_s", "time/policy_forward_s", "time/reference_forward_s",
          "time/gvm_forward_s", "time/update_s")
# With rollout.engine=vllm: the weight refit before each rollout, and how far the engine's log-probs of its own
# samples are from the policy's (1.0: equal).
ENGINE = ("time/refit_s", "rollout/engine_token_mult_prob_error")


def peer_setting(gvm: str, run_dir: Path, steps: int) -> list[str]:
    """examples/train_dvpo.py overrides of the peer-figure setting (no KL budget: the official code has none, and
    the embedded default's keeps a host copy of the policy's trained weights)."""
    return [f"gvm={gvm}", f"run_dir={run_dir}", f"train.steps={steps}", f"train.save_every={steps + 1}",
            "train.kl_budget=null",
            "rollout.prompts_per_step=8", "rollout.sampling.max_new_tokens=64", "rollout.sampling.stop_on_eos=false",
            "data.max_prompt_tokens=64", "ppo.ppo_epochs=4", "ppo.mini_batch_size=2", "ppo.micro_batch_size=2",
            "eval.before=false", "eval.after=false", "export_hf=false"]


def summarize(run_dir: Path) -> dict[str, float]:
    """Medians of steps 2.. of each phase, generated tokens/s and the peak memory of the run."""
    records = [record for record in read_metrics(run_dir) if record["step"] > 1]
    summary = {key: median_of(records, key) for key in (*PHASES, *ENGINE)}
    summary["perf/generated_tokens_per_s"] = median_of(records, "perf/generated_tokens_per_s")
    summary["perf/peak_memory_mib"] = max(r["perf/peak_memory_mib"] for r in records)
    summary["steps"] = len(records)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True, help="a trained GVM checkpoint (examples/train_gvm.py's final/)")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--run-dir", default="runs/bench_dvpo_step_time")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for examples/train_dvpo.py")
    args = parser.parse_args()
    run_dir = (REPO_ROOT / args.run_dir).resolve()
    wall = run_entry_point("train_dvpo.py", [*peer_setting(args.gvm, run_dir, args.steps), *args.overrides])
    summary = summarize(run_dir)
    print(f"\nDVPO step, median of steps 2..{args.steps} ({summary['steps']} steps), total wall {wall:.0f} s:")
    for key in PHASES:
        print(f"  {key:28s} {summary[key]:8.2f}")
    for key in ENGINE:
        if summary[key] == summary[key]:  # not NaN: the run had an engine
            print(f"  {key:28s} {summary[key]:8.3f}")
    print(f"  {'generated tokens/s':28s} {summary['perf/generated_tokens_per_s']:8.1f}")
    print(f"  {'peak memory (MiB)':28s} {summary['perf/peak_memory_mib']:8.0f}")


if __name__ == "__main__":
    main()
