"""Stage-1 benchmark: a GVM from SmolLM2-135M-Instruct on the shipped verifiable pairs (docs/benchmarks.md).

Trains with examples/train_gvm.py, then prints the held-out pairwise accuracy in the paper's forms
(mean over response tokens, last token, P1..P99 percentiles), training tokens/s and peak memory.

    python benchmarks/gvm_smollm2.py [--steps 36] [--run-dir runs/gvm_bench]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

from _runs import REPO_ROOT, median_of, read_metrics, run_entry_point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--run-dir", default="runs/gvm_bench")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for examples/train_gvm.py")
    args = parser.parse_args()
    run_dir = (REPO_ROOT / args.run_dir).resolve()
    wall = run_entry_point("train_gvm.py", [
        f"run_dir={run_dir}", f"train.steps={args.steps}", "train.global_batch_size=16", "train.micro_batch_size=8",
        "train.eval_every=12", "train.save_every=12", "optim.lr=2e-5", "optim.min_lr=2e-6", "optim.warmup_steps=3",
        *args.overrides])
    records = read_metrics(run_dir)
    final = json.loads((run_dir / "final" / "nemo_dvpo_checkpoint.json").read_text())
    accuracy = final["gvm"]["eval_accuracy"]
    print(f"\nwall {wall:.0f} s; median training tokens/s {median_of(records, 'train/tokens_per_s'):.0f}; "
          f"peak memory {max(r['train/peak_memory_mib'] for r in records):.0f} MiB")
    print("held-out pairwise accuracy: " + ", ".join(f"{name} {value:.3f}" for name, value in accuracy.items()))
    curve = [(r["step"], round(r["eval/accuracy_mean"], 3)) for r in records if "eval/accuracy_mean" in r]
    print(f"mean-token accuracy during training (step, accuracy): {curve}")

    # The shipped held-out split has only 12 pairs; every two held-out responses to the same prompt
    # whose IFEval scores differ make a larger (correlated) test set.
    all_pairs = run_dir / "heldout_all_pairs.jsonl"
    count = write_all_pairs(REPO_ROOT / "data" / "smollm2_ifeval" / "scored_heldout.jsonl", all_pairs)
    print(f"\nall {count} held-out response pairs with different scores:", flush=True)
    subprocess.run([sys.executable, "tools/eval_gvm.py", "--gvm", str(run_dir / "final"), "--data", str(all_pairs),
                    "--output", str(run_dir / "heldout_all_pairs_accuracy.json")], cwd=REPO_ROOT, check=True)


def write_all_pairs(scored_file: Path, output: Path) -> int:
    by_prompt: dict[str, list[dict]] = {}
    for line in scored_file.read_text().splitlines():
        record = json.loads(line)
        by_prompt.setdefault(record["prompt_id"], []).append(record)
    pairs = []
    for records in by_prompt.values():
        for first, second in itertools.combinations(records, 2):
            if first["score"] != second["score"]:
                chosen, rejected = (first, second) if first["score"] > second["score"] else (second, first)
                pairs.append({"prompt": chosen["prompt"], "chosen": chosen["response"], "rejected": rejected["response"]})
    output.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return len(pairs)


if __name__ == "__main__":
    main()
