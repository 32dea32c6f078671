"""How well a GVM's sequence scores track verifiable scores on scored held-out responses (docs/benchmarks.md).

For every response in a scored file (prompt/response/score, e.g. data/smollm2_ifeval/scored_heldout.jsonl)
the GVM's token values are summarised (mean over the response, last token, P10, P90); printed per
summary: the Spearman rank correlation with the scores over all responses, and the accuracy over all
pairs of responses to the same prompt whose scores differ.

    python benchmarks/gvm_score_correlation.py --gvm runs/gvm_bench/final [--data ...scored_heldout.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def ranks(values):
    import torch

    # Average ranks for ties, so tied scores do not get an arbitrary order.
    values = torch.as_tensor(values, dtype=torch.float64)
    order = values.argsort()
    result = torch.empty_like(values)
    result[order] = torch.arange(len(values), dtype=torch.float64)
    for value in values.unique():
        tied = values == value
        result[tied] = result[tied].mean()
    return result


def spearman(a, b) -> float:
    import torch

    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True)
    parser.add_argument("--data", default=str(REPO_ROOT / "data/smollm2_ifeval/scored_heldout.jsonl"))
    args = parser.parse_args()

    import torch

    from nemo_dvpo.data.preference import PreferenceDataConfig, collate_value_batch, load_preference_data
    from nemo_dvpo.evaluation.gvm_checkpoint import load_gvm
    from nemo_dvpo.evaluation.value_accuracy import sequence_value_summaries
    from nemo_dvpo.models.value_model import token_values

    gvm = load_gvm(args.gvm)
    config = PreferenceDataConfig(chat_template=gvm.chat_template, max_length=1024, overlong="truncate_prompt")
    data = load_preference_data(args.data, config, gvm.tokenizer, eos_token_id=gvm.eos_token_id)
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    samples = data.samples
    summaries: dict[str, list[float]] = {}
    with torch.no_grad():
        for start in range(0, len(samples), 16):
            batch = collate_value_batch(samples[start:start + 16], gvm.pad_token_id)
            for name, values in sequence_value_summaries(token_values(gvm.model, batch.tokens),
                                                         batch.response_mask).items():
                summaries.setdefault(name, []).extend(values.tolist())
    scores = [records[sample.record_index]["score"] for sample in samples]
    prompts = [records[sample.record_index]["prompt"] for sample in samples]
    pairs = [(a, b) for a, b in itertools.combinations(range(len(samples)), 2)
             if prompts[a] == prompts[b] and scores[a] != scores[b]]
    print(f"{len(samples)} responses to {len(set(prompts))} prompts; {len(pairs)} same-prompt pairs with different scores")
    for name in ("mean", "last", "p10", "p90"):
        values = summaries[name]
        correct = sum((values[a] > values[b]) == (scores[a] > scores[b]) for a, b in pairs)
        print(f"  {name:5s} Spearman {spearman(values, scores):+.3f}   pair accuracy {correct}/{len(pairs)} = "
              f"{correct / max(len(pairs), 1):.3f}   mean value {sum(values) / len(values):+.3f}")


if __name__ == "__main__":
    from nemo_dvpo.utils.errors import run_and_exit

    run_and_exit(main)
