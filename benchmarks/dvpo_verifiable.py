"""Does DVPO raise the held-out verifiable score of SmolLM2-135M-Instruct? (docs/benchmarks.md)

Runs examples/train_dvpo.py with a trained GVM, scoring the policy's greedy answers to N held-out
verifiable prompts (IFEval strict, fraction of instructions followed) before and after training, and
prints the summary: both means with 95% confidence intervals and the paired change.

    python benchmarks/dvpo_verifiable.py --gvm runs/gvm_bench/final [--steps 30] [--eval-prompts 200]

The starting model's greedy answers are deterministic, so ``--before-from runs/<earlier>/summary.json``
reuses the per-prompt scores of an earlier run from the same starting model and eval settings instead of
scoring the starting model again (11 minutes on the CPU machine); it refuses a summary scored on other
prompts.
"""

from __future__ import annotations

import argparse
import json

from _runs import REPO_ROOT, median_of, read_metrics, run_entry_point
from verifiable_paired import confidence_interval_95, load_evaluation, per_prompt_changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--run-dir", default="runs/bench_dvpo_verifiable")
    parser.add_argument("--before-from", help="an earlier run's summary.json whose 'before' scores to reuse")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for examples/train_dvpo.py")
    args = parser.parse_args()
    run_dir = (REPO_ROOT / args.run_dir).resolve()
    reused_before = load_evaluation(f"{args.before_from}:verifiable_score_before") if args.before_from else None
    wall = run_entry_point("train_dvpo.py", [
        f"gvm={args.gvm}", f"run_dir={run_dir}", f"train.steps={args.steps}", f"eval.num_prompts={args.eval_prompts}",
        "export_hf=false", *(["eval.before=false"] if reused_before else []), *args.overrides])
    summary = json.loads((run_dir / "summary.json").read_text())
    if reused_before:
        summary["verifiable_score_before"] = reused_before
        changes = per_prompt_changes(reused_before, summary["verifiable_score_after"],
                                     f"{args.before_from} and this run")
        mean, half_width = confidence_interval_95(changes)
        summary["verifiable_score_change"] = {"mean": mean, "ci95": half_width, "num_prompts": len(changes)}
        summary["verifiable_score_before_from"] = args.before_from
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    records = read_metrics(run_dir)
    print(f"\nwall {wall:.0f} s; median step {median_of(records, 'time/step_s'):.1f} s; "
          f"peak memory {max(r['perf/peak_memory_mib'] for r in records):.0f} MiB")
    for name in ("verifiable_score_before", "verifiable_score_after", "verifiable_score_change"):
        result = summary[name]
        print(f"{name:26s} {result['mean']:+.4f} +- {result['ci95']:.4f} (95% CI, n={result['num_prompts']})")
    first, last = records[0], records[-1]
    print(f"rollout verifiable score: step 1 {first.get('rollout/verifiable_score')}, "
          f"step {last['step']} {last.get('rollout/verifiable_score')}")


if __name__ == "__main__":
    main()
