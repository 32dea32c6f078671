"""DPO, PPO, GRPO and DVPO at equal budget: the same start, policy updates and held-out scoring (docs/benchmarks.md).

Every run starts from the same policy and makes the same number of policy optimizer steps:

* PPO and DVPO: ``--steps`` rollouts of ``--prompts`` prompts (one response each), ``--epochs`` passes of
  mini-batches of ``--mini-batch`` sequences: ``steps * epochs * prompts / mini_batch`` updates;
* GRPO: the same prompts and updates, ``--group-size`` responses per prompt (mini-batches of
  ``mini_batch * group_size`` sequences, so the count of updates is the same);
* DPO (offline): the same count of updates, ``--mini-batch`` pairs each, from the training pairs (it sees
  ``epochs`` times as many prompts, once each, where the online recipes see each prompt ``epochs`` times).

Each run scores the policy's greedy answers to the first ``--eval-prompts`` held-out verifiable prompts after
training (``eval.after``); the starting model is scored once, by the first run of the run directory
(``eval.before``), and every run is paired against that (greedy answers of one starting model are the same
in every run; where several runs did score it, the script checks they agree). Printed per algorithm: the
mean score before and after, the mean per-prompt change with its 95% interval, prompts better / worse and
the sign test. ``--algorithms`` picks and orders the runs; a finished run is reused and an interrupted one
continues from its latest checkpoint, unless ``--rerun``.
Runs may be started by separate invocations (e.g. two at a time on two cores): the budget and evaluation
settings are recorded in ``<run-dir>/settings.json`` by the first and must be the same in every later one.

    python benchmarks/quality_at_equal_budget.py --gvm runs/gvm_pair/final --reward-model runs/rm_pair/final \\
        --steps 12 --prompts 16 --epochs 1 --mini-batch 2 --micro-batch 2 --response-tokens 64 \\
        --eval-prompts 192 --eval-tokens 128 --pairs runs/gvm_pair.train.jsonl --run-dir runs/quality_equal_budget \\
        optim.lr=3e-6

(the measured setting, docs/benchmarks.md "Quality at equal budget: DPO, PPO, GRPO and DVPO"; ``--algorithms
dvpo,dpo`` and ``--algorithms ppo`` can run side by side on the same ``--run-dir``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _runs import REPO_ROOT, run_entry_point
from verifiable_paired import per_prompt_changes, sign_test_p

from nemo_dvpo.evaluation.verifiable import confidence_interval_95
from nemo_dvpo.utils.errors import run_and_exit

ENTRY_POINTS = {"dpo": "train_dpo.py", "ppo": "train_ppo.py", "grpo": "train_grpo.py", "dvpo": "train_dvpo.py"}


# The arguments that make runs comparable: every run of one run directory must share them.
SHARED_SETTINGS = ("gvm", "reward_model", "steps", "prompts", "epochs", "mini_batch", "micro_batch", "group_size",
                   "response_tokens", "eval_prompts", "eval_tokens", "pairs", "overrides")


def checkpoint_every(steps: int) -> int:
    """Four checkpoints a run: a killed run loses at most a quarter (resuming reproduces the uninterrupted run)."""
    return max(1, steps // 4)


def budget_overrides(algorithm: str, args, score_start: bool) -> list[str]:
    """The overrides that give ``algorithm`` the shared budget and evaluation (``score_start``: eval.before)."""
    evaluation = [f"eval.num_prompts={args.eval_prompts}", f"eval.max_new_tokens={args.eval_tokens}",
                  f"eval.before={str(score_start).lower()}", "eval.after=true", "export_hf=false"]
    if algorithm == "dpo":
        updates = args.steps * args.epochs * args.prompts // args.mini_batch
        pairs = [f"data.train={args.pairs}"] if args.pairs else []
        # The online recipes' confs keep held-out prompts of up to 128 tokens: DPO must score the same ones.
        return [f"train.steps={updates}", f"train.global_batch_size={2 * args.mini_batch}",
                f"train.micro_batch_size={2 * args.micro_batch}", f"train.save_every={checkpoint_every(updates)}",
                f"train.eval_every={updates}", f"train.eval_max_pairs={args.heldout_pairs}",
                "data.max_prompt_tokens=128", *pairs, *evaluation]
    rollout = [f"train.steps={args.steps}", f"train.save_every={checkpoint_every(args.steps)}",
               f"rollout.prompts_per_step={args.prompts}", f"rollout.sampling.max_new_tokens={args.response_tokens}",
               f"ppo.ppo_epochs={args.epochs}", f"ppo.micro_batch_size={args.micro_batch}", *evaluation]
    if algorithm == "dvpo":
        return [*rollout, f"gvm={args.gvm}", f"ppo.mini_batch_size={args.mini_batch}"]
    if algorithm == "ppo":
        # The critic makes as many passes over each rollout as the policy.
        return [*rollout, f"reward_model={args.reward_model}", f"ppo.mini_batch_size={args.mini_batch}",
                f"critic.epochs={args.epochs}"]
    return [*rollout, f"reward_model={args.reward_model}", f"rollout.samples_per_prompt={args.group_size}",
            f"ppo.mini_batch_size={args.mini_batch * args.group_size}"]


def check_settings(root: Path, args) -> None:
    """Record the shared settings in ``root/settings.json``, or refuse ones that differ from those recorded."""
    settings = {name: getattr(args, name) for name in SHARED_SETTINGS}
    path = root / "settings.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        differing = {name: (recorded.get(name), value) for name, value in settings.items()
                     if recorded.get(name) != value}
        if differing:
            raise SystemExit(f"{path}: the runs in {root} were made with other settings (recorded, given): "
                             f"{differing}; use another --run-dir for another budget")
    else:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n")


def start_evaluation(root: Path) -> dict | None:
    """The starting model's held-out scores, from the runs in ``root`` that scored it (they must agree)."""
    scored = {}
    for summary_path in sorted(root.glob("*/summary.json")):
        before = json.loads(summary_path.read_text()).get("verifiable_score_before")
        if before and "scores" in before:
            scored[summary_path.parent.name] = before
    if len({(tuple(b["prompt_ids"]), tuple(b["scores"])) for b in scored.values()}) > 1:
        raise SystemExit(f"the runs {sorted(scored)} in {root} scored different starting policies (their 'before' "
                         "answers differ): they did not start from the same model")
    return next(iter(scored.values()), None)


def paired_result(start: dict, summary: dict) -> dict:
    after = summary["verifiable_score_after"]
    changes = per_prompt_changes(start, after, "the starting model's and the run's evaluations")
    change, half_width = confidence_interval_95(changes)
    better, worse = sum(c > 0 for c in changes), sum(c < 0 for c in changes)
    return {"before": start["mean"], "after": after["mean"], "change": change,
            "ci95": (change - half_width, change + half_width), "better": better, "worse": worse,
            "sign_test_p": sign_test_p(better, worse), "prompts": len(changes),
            "median_step_s": summary.get("median_step_s"), "peak_memory_mib": summary.get("peak_memory_mib")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True, help="the GVM DVPO uses (examples/train_gvm.py's final/)")
    parser.add_argument("--reward-model", required=True, help="the reward model PPO and GRPO use")
    parser.add_argument("--algorithms", default="dpo,ppo,grpo,dvpo")
    parser.add_argument("--steps", type=int, default=20, help="rollout steps of the online recipes")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per rollout step")
    parser.add_argument("--epochs", type=int, default=2, help="passes over each rollout")
    parser.add_argument("--mini-batch", type=int, default=8, help="sequences (DPO: pairs) per policy update")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4, help="GRPO's responses per prompt")
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=192, help="held-out verifiable prompts scored")
    parser.add_argument("--eval-tokens", type=int, default=160, help="greedy answer length when scoring")
    parser.add_argument("--pairs", default=None, help="DPO's training pairs (default: the DPO recipe's); give "
                        "the file the GVM and reward model learnt from for the same offline data")
    parser.add_argument("--heldout-pairs", type=int, default=100, help="held-out pairs of DPO's pairwise accuracy")
    parser.add_argument("--run-dir", default="runs/quality_at_equal_budget")
    parser.add_argument("--rerun", action="store_true", help="train again even where a run has finished")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every recipe (e.g. model=...)")
    args = parser.parse_args()
    if (args.prompts * args.epochs) % args.mini_batch:
        parser.error("--prompts x --epochs must be a multiple of --mini-batch (whole policy updates per step)")

    root = (REPO_ROOT / args.run_dir).resolve()
    check_settings(root, args)
    summaries = {}
    for algorithm in args.algorithms.split(","):
        run_dir = root / algorithm
        if args.rerun or not (run_dir / "summary.json").exists():
            score_start = start_evaluation(root) is None
            # An interrupted run continues from its latest checkpoint; --rerun starts it over.
            start_over = "overwrite=true" if args.rerun else "resume=true"
            run_entry_point(ENTRY_POINTS[algorithm], [f"run_dir={run_dir}", start_over,
                                                      *budget_overrides(algorithm, args, score_start),
                                                      *args.overrides])
        summaries[algorithm] = json.loads((run_dir / "summary.json").read_text())
    start = start_evaluation(root)
    results = {algorithm: paired_result(start, summary) for algorithm, summary in summaries.items()}

    updates = args.steps * args.epochs * args.prompts // args.mini_batch
    print(f"\n{updates} policy updates each; {next(iter(results.values()))['prompts']} held-out verifiable prompts, "
          "greedy; change = after - before per prompt")
    print(f"{'':6s} {'before':>7s} {'after':>7s} {'change':>8s} {'95% CI':>18s} {'better':>6s} {'worse':>6s} "
          f"{'sign p':>7s} {'s/step':>7s} {'peak MiB':>9s}")
    for algorithm, r in results.items():
        print(f"{algorithm:6s} {r['before']:7.4f} {r['after']:7.4f} {r['change']:+8.4f} "
              f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] {r['better']:6d} {r['worse']:6d} {r['sign_test_p']:7.3f} "
              f"{r['median_step_s'] or float('nan'):7.1f} {r['peak_memory_mib'] or float('nan'):9.0f}")
    (root / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_and_exit(main)
