"""DVPO time per step and peak memory in the peer-figure setting (docs/benchmarks.md, ../shared/notes/peer-figures.md).

SmolLM2-135M-Instruct, fp32, CPU: 8 prompts (at most 64 tokens) per step, responses of exactly 64 tokens
(no EOS stop), mini-batch 2, 4 PPO epochs, no gradient accumulation, Adam. Prints the median over steps
2..N (step 1 is the warm-up) of the step and of each phase, and the process's peak memory.

    python benchmarks/dvpo_step_time.py --gvm runs/gvm_bench/final [--steps 7]
"""

from __future__ import annotations

import argparse

from _runs import REPO_ROOT, median_of, read_metrics, run_entry_point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True, help="a trained GVM checkpoint (examples/train_gvm.py's final/)")
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--run-dir", default="runs/bench_dvpo_step_time")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for examples/train_dvpo.py")
    args = parser.parse_args()
    run_dir = (REPO_ROOT / args.run_dir).resolve()
    wall = run_entry_point("train_dvpo.py", [
        f"gvm={args.gvm}", f"run_dir={run_dir}", f"train.steps={args.steps}", f"train.save_every={args.steps + 1}",
        "rollout.prompts_per_step=8", "rollout.sampling.max_new_tokens=64", "rollout.sampling.stop_on_eos=false",
        "data.max_prompt_tokens=64", "ppo.ppo_epochs=4", "ppo.mini_batch_size=2", "ppo.micro_batch_size=2",
        "eval.before=false", "eval.after=false", "export_hf=false", *args.overrides])
    records = [record for record in read_metrics(run_dir) if record["step"] > 1]
    print(f"\nDVPO step, median of steps 2..{args.steps} ({len(records)} steps), total wall {wall:.0f} s:")
    for key in ("time/step_s", "time/generation_s", "time/policy_forward_s", "time/reference_forward_s",
                "time/gvm_forward_s", "time/update_s"):
        print(f"  {key:28s} {median_of(records, key):8.2f}")
    print(f"  {'generated tokens/s':28s} {median_of(records, 'perf/generated_tokens_per_s'):8.1f}")
    print(f"  {'peak memory (MiB)':28s} {max(r['perf/peak_memory_mib'] for r in records):8.0f}")


if __name__ == "__main__":
    main()
