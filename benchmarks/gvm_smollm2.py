"""Stage-1 benchmark: a GVM from SmolLM2-135M-Instruct on the shipped verifiable data (docs/benchmarks.md).

Trains a GVM on the training prompts' data labelled one of three ways, then measures its pairwise
accuracy on every held-out pair in the paper's forms (mean over response tokens, last token, P1..P99),
each with a Wilson 95% interval, and draws the loss and held-out accuracy curves:

* ``pair``  - the chosen/rejected pairs, labels +1 / -1 (the paper's preference setting);
* ``score`` - every scored response of those prompts, label 2 x IFEval score - 1 (in [-1, 1]);
* ``both``  - every response once: a paired one with its pair label, an unpaired one with its score label.

The three see the same prompts (the first ``--train-prompts`` training prompts that have a pair) and,
for a fair comparison, the same number of optimizer steps of the same batch size.

    python benchmarks/gvm_smollm2.py --labels pair --train-prompts 600 --steps 75 [--run-dir runs/gvm_pair]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _runs import REPO_ROOT, median_of, read_metrics, run_entry_point

from nemo_dvpo.data.jsonl import read_jsonl
from nemo_dvpo.utils.errors import run_and_exit
from nemo_dvpo.utils.paths import atomic_write_text

DATA = REPO_ROOT / "data" / "smollm2_ifeval"
LABELS = ("pair", "score", "both")


def score_label(score: float) -> float:
    """An IFEval score (fraction of instructions followed, in [0, 1]) on the pair labels' [-1, 1] scale."""
    return 2.0 * score - 1.0


def labelled_sequences(pairs: list[dict], scored: list[dict], labels: str, train_prompts: int) -> list[dict]:
    """Training records for the first ``train_prompts`` prompts with a pair.

    ``pair``: the pairwise records themselves (the default recipe's data, on fewer prompts); ``score``
    and ``both``: scored-schema records (prompt / response / score), ``score`` holding the label.
    """
    chosen = set(list(dict.fromkeys(pair["prompt_id"] for pair in pairs))[:train_prompts])
    if labels == "pair":
        return [pair for pair in pairs if pair["prompt_id"] in chosen]
    pair_labels = {}
    for pair in pairs:
        if pair["prompt_id"] in chosen:
            pair_labels[(pair["prompt_id"], pair["chosen_sample"])] = 1.0
            pair_labels[(pair["prompt_id"], pair["rejected_sample"])] = -1.0
    records = []
    for response in scored:
        key = (response["prompt_id"], response["sample"])
        if response["prompt_id"] not in chosen:
            continue
        if labels == "score":
            label = score_label(response["score"])
        else:  # both: a paired response keeps its pair label
            label = pair_labels.get(key, score_label(response["score"]))
        records.append({"prompt_id": response["prompt_id"], "prompt": response["prompt"],
                        "response": response["response"], "score": label})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", choices=LABELS, default="pair")
    parser.add_argument("--train-prompts", type=int, default=600)
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-pairs", type=int, default=100,
                        help="held-out pairs evaluated during training (the curve); the end uses all of them")
    parser.add_argument("--run-dir", default=None, help="default: runs/gvm_<labels>")
    parser.add_argument("--data-only", action="store_true",
                        help="write the training file (<run-dir>.train.jsonl: DPO and the reward model learn from "
                        "it too) and stop")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for examples/train_gvm.py")
    args = parser.parse_args()
    run_dir = (REPO_ROOT / (args.run_dir or f"runs/gvm_{args.labels}")).resolve()

    records = labelled_sequences(read_jsonl(DATA / "pairs_train.jsonl"), read_jsonl(DATA / "scored_train.jsonl"),
                                 args.labels, args.train_prompts)
    train_file = run_dir.parent / f"{run_dir.name}.train.jsonl"  # outside run_dir: a fresh run clears that
    atomic_write_text(train_file, "".join(json.dumps(record) + "\n" for record in records))
    prompts = len({record["prompt_id"] for record in records})
    sequences = len(records) * (2 if args.labels == "pair" else 1)
    print(f"{args.labels} labels: {sequences} sequences from {prompts} training prompts -> {train_file}")
    if args.data_only:
        return
    run_dir.mkdir(parents=True, exist_ok=True)

    wall = run_entry_point("train_gvm.py", [
        f"run_dir={run_dir}", f"data.train={train_file}", f"data.eval={DATA / 'pairs_heldout.jsonl'}",
        f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch_size}",
        "train.micro_batch_size=8", f"train.eval_every={args.eval_every}", f"train.save_every={args.eval_every}",
        f"train.eval_max_pairs={args.eval_pairs}", "optim.lr=2e-5", "optim.min_lr=2e-6", "optim.warmup_steps=3",
        *args.overrides])
    metrics = read_metrics(run_dir)
    epochs = args.steps * args.global_batch_size / sequences
    print(f"\nwall {wall:.0f} s ({epochs:.2f} epochs); median training tokens/s "
          f"{median_of(metrics, 'perf/tokens_per_s'):.0f}; peak memory "
          f"{max(r['perf/peak_memory_mib'] for r in metrics):.0f} MiB")
    curve = [(r["step"], round(r["eval/accuracy_mean"], 3)) for r in metrics if "eval/accuracy_mean" in r]
    print(f"mean-token accuracy on the first {args.eval_pairs} held-out pairs during training: {curve}\n", flush=True)

    subprocess.run([sys.executable, "tools/eval_gvm.py", "--gvm", str(run_dir / "final"),
                    "--data", str(DATA / "pairs_heldout.jsonl"), "--max-length", "512",
                    "--output", str(run_dir / "heldout_accuracy.json")], cwd=REPO_ROOT, check=True)
    subprocess.run([sys.executable, "tools/plot_curves.py", str(run_dir), "--labels", args.labels,
                    "--metrics", "train/loss", "eval/accuracy_mean", "eval/accuracy_last",
                    "--output", str(run_dir / "curves.png")], cwd=REPO_ROOT, check=True)


if __name__ == "__main__":
    run_and_exit(main)
