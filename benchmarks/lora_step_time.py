"""DVPO time per step and peak memory with LoRA against full fine-tuning, interleaved (full, lora, full, lora).

The setting is :mod:`dvpo_step_time`'s (SmolLM2-135M-Instruct, fp32, 8 prompts x 64 response tokens, 4 PPO
epochs, mini-batch 2); the LoRA runs add ``lora.enabled=true`` (rank 16, alpha 32, all four linear layers of every
block). Interleaving spreads the machine's drift over both. Prints each run's medians over steps 2..N and peak RSS.

    python benchmarks/lora_step_time.py --gvm runs/gvm_bench/final [--steps 4] [--pairs 2]
"""

from __future__ import annotations

import argparse

from _runs import REPO_ROOT, run_entry_point
from dvpo_step_time import PHASES, peer_setting, summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True, help="a trained GVM checkpoint (examples/train_gvm.py's final/)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=2, help="(full, lora) pairs to run")
    parser.add_argument("--run-dir", default="runs/bench_lora_step_time")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for both kinds of run")
    args = parser.parse_args()
    rows = []
    for index in range(args.pairs):
        for kind, extra in (("full", []), ("lora", ["lora.enabled=true"])):
            run_dir = (REPO_ROOT / args.run_dir / f"{kind}_{index + 1}").resolve()
            wall = run_entry_point("train_dvpo.py", [*peer_setting(args.gvm, run_dir, args.steps), *extra,
                                                     *args.overrides])
            rows.append((f"{kind} {index + 1}", summarize(run_dir), wall))
    print(f"\nDVPO step, medians of steps 2..{args.steps}; peak RSS of the run:")
    print("| run | " + " | ".join(key.split("/")[1] for key in PHASES) + " | peak RSS | wall |")
    print("|---" * (len(PHASES) + 3) + "|")
    for name, summary, wall in rows:
        print(f"| {name} | " + " | ".join(f"{summary[key]:.2f}" for key in PHASES)
              + f" | {summary['perf/peak_memory_mib']:.0f} MiB | {wall:.0f} s |")


if __name__ == "__main__":
    main()
