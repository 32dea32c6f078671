"""Plot training curves of one or more runs into one PNG (a panel per metric, a line per run).

    python tools/plot_curves.py runs/gvm_pairs runs/gvm_scores --labels pairs scores \\
        --metrics train/loss eval/accuracy_mean --output docs/gvm_curves.png
"""

from __future__ import annotations

import argparse

from nemo_dvpo.evaluation.benchmarks.store import write_bytes_atomic
from nemo_dvpo.evaluation.curves import curves_png, read_run_metrics
from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit
from nemo_dvpo.utils.paths import check_output_file


@exit_on_user_error
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--labels", nargs="+", help="one per run (default: the folders' names)")
    parser.add_argument("--metrics", nargs="+", default=["train/loss"], help="metric names as logged")
    parser.add_argument("--output", required=True, help="the PNG to write")
    args = parser.parse_args()
    labels = args.labels or [run_dir.rstrip("/").rsplit("/", 1)[-1] for run_dir in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        parser.error(f"{len(labels)} labels for {len(args.run_dirs)} runs")
    output = check_output_file(args.output, "output PNG")
    runs = {label: read_run_metrics(run_dir) for label, run_dir in zip(labels, args.run_dirs)}
    write_bytes_atomic(output, curves_png(runs, args.metrics))
    print(f"wrote {output}")


if __name__ == "__main__":
    run_and_exit(main)
