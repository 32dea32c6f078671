"""How a policy run reports: the held-out verifiable score before and after training, ``summary.json``'s policy
fields, and the end-of-run summary for the terminal (RL recipes and DPO)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from nemo_dvpo.data.prompts import PromptSet
from nemo_dvpo.evaluation.value_accuracy import wilson_interval
from nemo_dvpo.evaluation.verifiable import EvaluationInterrupted, evaluate_verifiable, paired_change
from nemo_dvpo.rlhf.config import EvalConfig
from nemo_dvpo.training.run import Run
from nemo_dvpo.utils.distributed import print_rank_zero


class HeldOutEvaluation:
    """The verifiable score of the policy's greedy answers to held-out prompts, before and after training.

    ``before`` is part of the run's resumable state (a resumed run does not score its start again). A stop
    signal during an evaluation ends the run: before training, at the checkpoint it resumed from; after it, with
    a checkpoint of the last step, so that ``resume=true`` only scores and saves.
    """

    def __init__(self, run: Run, prompts: Optional[PromptSet], cfg: EvalConfig):
        self.run, self.prompts, self.cfg = run, prompts, cfg
        self.before: Optional[dict] = None
        self.after: Optional[dict] = None

    def score_before(self, policy) -> None:
        if self.before is None and self.cfg.before:
            run = self.run
            self.before = self._evaluate(policy, "before", on_stop=lambda: (run.start_step, run.checkpoint))

    def score_after(self, policy) -> None:
        if self.cfg.after:
            total = self.run.total_steps
            self.after = self._evaluate(policy, "after", on_stop=lambda: (total, self.run.save(total)))

    def _evaluate(self, policy, when: str, on_stop: Callable[[], tuple]) -> Optional[dict]:
        run = self.run
        if self.prompts is None:
            return None
        started = time.perf_counter()
        try:
            result = evaluate_verifiable(policy, run.tokenizer, self.prompts, run.data_parallel,
                                         batch_size=self.cfg.batch_size, max_new_tokens=self.cfg.max_new_tokens,
                                         should_stop=run.stop.should_stop)
        except EvaluationInterrupted:
            raise run.stopped(*on_stop()) from None
        print_rank_zero(f"[{run.tag}] held-out verifiable score {when} training: {result['mean']:.4f} +- "
                        f"{result['ci95']:.4f} over {result['num_prompts']} prompts "
                        f"({time.perf_counter() - started:.0f} s)")
        return result

    def summary_fields(self) -> dict:
        return {"verifiable_score_change": paired_change(self.before, self.after),
                "verifiable_score_before": self.before, "verifiable_score_after": self.after}


def policy_summary(run: Run, fields: dict, evaluation: HeldOutEvaluation, final: Path,
                   hf_dir: Optional[Path]) -> dict:
    """``summary.json`` of a policy run: the recipe's ``fields``, the held-out scores, where the policy is."""
    return run.write_summary({**fields, **evaluation.summary_fields(), "policy_checkpoint": str(final),
                              "hf_export": str(hf_dir) if hf_dir else None})


def _number(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _gvm_accuracy(accuracy: dict) -> str:
    text = f"mean-token {accuracy['mean']:.3f}, last-token {accuracy['last']:.3f}"
    pairs = accuracy.get("pairs")
    if not pairs:  # GVMs saved before the pair count was recorded
        return text
    low, high = wilson_interval(round(accuracy["mean"] * pairs), pairs)
    return f"{text} on {pairs} pairs (mean-token 95% interval {low:.2f}-{high:.2f})"


def what_the_change_shows(change: dict, steps: Optional[int]) -> str:
    """One plain sentence on what a run's paired held-out change can and cannot support.

    A change inside its own 95% interval is no evidence either way, and the interval's half-width is the
    smallest effect that evaluation could have seen - a short run (the embedded default: 6 steps, 32
    prompts) shows the pipeline working, not the method's effect.
    """
    mean, half_width, prompts = change["mean"], change["ci95"], change["num_prompts"]
    ran = f"a run of {steps} steps" if steps else "this run"
    if half_width != half_width or abs(mean) <= half_width:  # NaN (one prompt) or an interval spanning 0
        return (f"no measurable change: {prompts} held-out prompts only detect changes beyond +-{half_width:.3f}; "
                f"{ran} shows the pipeline working (rollouts, scoring, KL, updates), not whether the policy improved. "
                "A measured gain takes hundreds of held-out prompts and tens of steps (docs/results.md)")
    direction = "raised" if mean > 0 else "lowered"
    return (f"{ran} {direction} the held-out verifiable score by {abs(mean):.3f} (95% interval excludes 0, "
            f"{prompts} prompts); check it on a benchmark nobody here wrote (tools/eval_benchmarks.py)")


def format_summary(title: str, summary: dict) -> str:
    """The end-of-run summary of an RL (or DPO) run, for the terminal: the lines its ``summary.json`` supports."""
    def score(result: Optional[dict]) -> str:
        if not result:
            return "not evaluated"
        return (f"{result['mean']:.4f} +- {result['ci95']:.4f} (95% CI, {result['num_prompts']} prompts; "
                f"all instructions followed: {result['all_followed']:.1%})")

    change = summary.get("verifiable_score_change")
    step_s = summary.get("median_step_s")
    lines = [f"{title} summary"]
    if "gvm" in summary:
        accuracy = summary.get("gvm_heldout_accuracy")
        lines += [f"  GVM                        {summary['gvm']}",
                  "  GVM held-out accuracy      " + (_gvm_accuracy(accuracy) if accuracy
                                                     else "not recorded in the GVM checkpoint")]
    if "reward_model" in summary:
        lines.append(f"  reward model               {summary['reward_model']}")
    if "heldout_pair_accuracy" in summary:
        lines.append(f"  held-out pair accuracy     {_number(summary['heldout_pair_accuracy'], 3)}")
    lines += [
        f"  verifiable score before    {score(summary.get('verifiable_score_before'))}",
        f"  verifiable score after     {score(summary.get('verifiable_score_after'))}",
        "  change (paired)            " + (f"{change['mean']:+.4f} +- {change['ci95']:.4f} (95% CI)" if change
                                            else "not evaluated"),
    ]
    if change:
        lines.append("  what this shows            " + what_the_change_shows(change, summary.get("steps_this_run")))
    if "final_kl" in summary:
        lines.append(f"  final KL (sequence, k1)    {_number(summary['final_kl'])}   "
                     f"KL coefficient {summary['final_kl_coef']:.4f}")
    budget = summary.get("kl_budget")
    if budget:
        lines.append(f"  KL budget                  {budget['budget']:g}: " + (
            f"passed at step {budget['passed_at_step']} (KL {budget['passed_with_kl']:.3g}); the final policy is "
            f"the one after {budget['final_policy_step']} steps" if budget["passed_at_step"] else "never passed"))
    runtime = ", ".join(f"{label}: {summary[key]}" for key, label in (("cpu_allocator", "CPU allocator"),
                                                                       ("cpu_openmp", "OpenMP")) if key in summary)
    lines += [
        "  time per step (median)     " + (f"{step_s:.1f} s over {summary['steps_this_run']} steps" if step_s
                                            else "no step ran"),
        f"  peak memory                {summary['peak_memory_mib']:.0f} MiB" + (f" ({runtime})" if runtime else ""),
        f"  policy checkpoint          {summary['policy_checkpoint']}",
        f"  Hugging Face export        {summary['hf_export']}",
    ]
    return "\n".join(lines)
