"""``rollout/*``: what a step's rollout looked like, reduced over the global batch."""

from __future__ import annotations

from nemo_dvpo.algorithms.ppo import kl_estimate
from nemo_dvpo.data.verifiable import score_response
from nemo_dvpo.rlhf.rollout import Sample
from nemo_dvpo.rlhf.trajectory import Trajectory
from nemo_dvpo.training.data_parallel import DataParallel


def rollout_metrics(sample: Sample, trajectory: Trajectory, records: list[dict], values_name: str,
                    data_parallel: DataParallel, kl_coef: float) -> dict[str, float]:
    """``rollout/*`` means over the global batch: token means over response tokens, sequence means over rows, and
    the verifiable score over the rollouts whose prompts carry verifiable fields (every rank reduces the same
    names, whichever of its prompts are verifiable). ``values_name`` names ``trajectory.values`` (``gvm_value``,
    ``critic_value``, ``score``); ``rollout/kl`` is k1 summed over a response, mean over the batch."""
    mask = trajectory.response_mask.float()
    rows = float(mask.shape[0])
    kl = kl_estimate(trajectory.old_logprobs, trajectory.ref_logprobs, "k1") * mask
    last = (trajectory.sequence_lengths - 1).clamp(min=0)
    advantages = trajectory.advantages * mask
    tokens = float(mask.sum())
    sums = {
        f"{values_name}_mean": (float((trajectory.values * mask).sum()), tokens),
        f"{values_name}_last_token": (float(trajectory.values.gather(1, last[:, None]).sum()), rows),
        "advantage_mean": (float(advantages.sum()), tokens),
        "advantage_sq_mean": (float((advantages ** 2).sum()), tokens),
        "kl": (float(kl.sum()), rows),
        "kl_per_token": (float(kl.sum()), tokens),
        "response_length": (tokens, rows),
    }
    if sample.entropy is not None:
        sums["entropy"] = (float((sample.entropy * mask).sum()), tokens)
    verifiable = [score_response(record, text) for record, text in zip(records, sample.generation.response_texts)
                  if "instruction_id_list" in record]
    sums["verifiable_score"] = (float(sum(verifiable)), float(len(verifiable)))
    means = data_parallel.ratio({name: total for name, (total, _) in sums.items()},
                                {name: count for name, (_, count) in sums.items()})
    all_tokens = float(data_parallel.sum(mask.sum()))
    # The tokens' (Bessel-corrected) standard deviation from the global sums.
    mean_square = means.pop("advantage_sq_mean")
    variance = (mean_square - means["advantage_mean"] ** 2) * all_tokens / max(all_tokens - 1, 1)
    means["advantage_std"] = max(variance, 0.0) ** 0.5
    means["kl_coef"] = kl_coef
    # The engine's own measurements (every data-parallel rank's engine reports the same names).
    return {f"rollout/{name}": value for name, value in means.items()} | data_parallel.mean(sample.metrics)
