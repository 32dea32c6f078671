"""Label responses with a reward model's scores: the data for a GVM trained on reward-model scores.

The DVPO authors' later recipe trains the GVM not on pair labels (+1 / -1) but on a reward model's score of
each sampled response. This tool writes that data: every response of ``--data`` (pairwise records give two,
scored records one; e.g. the shipped ``scored_train.jsonl`` of SmolLM2's own samples) scored by the reward
model at its last token, as scored records that stage 1 reads directly::

    python examples/train_reward_model.py                                          # the reward model
    python tools/label_with_reward_model.py --reward-model runs/reward_model/final \\
        --data data/smollm2_ifeval/scored_train.jsonl --output runs/rm_scored_train.jsonl
    python examples/train_gvm.py data.train=runs/rm_scored_train.jsonl run_dir=runs/gvm_rm_scores

Output lines: ``{"prompt", "response", "score", "source_label"}`` (the prompt as chat messages, the score the
reward model's, ``source_label`` the input's own label: +1/-1 for a pair's responses or the input's score).
The responses are tokenized exactly as stage 1 tokenizes them (same readers, the reward model's chat template
and EOS), so the score is the reward of the sequence the GVM will be trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward-model", required=True, help="reward-model checkpoint (kind reward_model)")
    parser.add_argument("--data", required=True, help="pairwise or scored preference data (any supported format)")
    parser.add_argument("--output", required=True, help="JSON Lines file to write (scored records)")
    parser.add_argument("--split", default=None, help="split name for multi-split sources")
    parser.add_argument("--max-records", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser.parse_args(argv)


def reward_scores(model, samples, pad_token_id: int, micro_batch_size: int) -> list[float]:
    """Each sample's reward: the model's value at its last response token (the EOS the response ends with)."""
    from nemo_dvpo.algorithms.gvm import last_response_index
    from nemo_dvpo.data.preference import collate_value_batch
    from nemo_dvpo.models.value_model import token_values

    scores: list[float] = []
    for start in range(0, len(samples), micro_batch_size):
        batch = collate_value_batch(samples[start:start + micro_batch_size], pad_token_id)
        values = token_values(model, batch.tokens)
        scores += values.gather(1, last_response_index(batch.response_mask)[:, None]).squeeze(1).tolist()
    return scores


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    from nemo_dvpo.utils.paths import check_output_file

    check_output_file(args.output, "--output", overwrite=args.overwrite)
    from nemo_dvpo.data.preference import PreferenceDataConfig, read_preference_records, tokenize_preference_records
    from nemo_dvpo.evaluation.gvm_checkpoint import load_gvm
    from nemo_dvpo.utils.distributed import destroy_distributed, is_rank_zero, print_rank_zero
    from nemo_dvpo.utils.errors import CheckpointError
    from nemo_dvpo.utils.paths import atomic_write_text

    reward_model = load_gvm(args.reward_model)
    if reward_model.metadata["kind"] != "reward_model":
        raise CheckpointError(f"--reward-model {args.reward_model} holds a {reward_model.metadata['kind']!r} "
                              "checkpoint; a reward model (examples/train_reward_model.py) is needed")
    config = PreferenceDataConfig(chat_template=reward_model.chat_template, max_length=args.max_length,
                                  overlong="truncate_prompt", max_records=args.max_records)
    records, stats = read_preference_records(args.data, config, args.split)
    data = tokenize_preference_records(records, reward_model.tokenizer, config, reward_model.eos_token_id, stats,
                                       label=args.data)
    by_index = {record.index: record for record in records}
    scores = reward_scores(reward_model.model, data.samples, reward_model.pad_token_id, args.micro_batch_size)
    lines = []
    for sample, score in zip(data.samples, scores):
        record = by_index[sample.record_index]
        response = record.responses[0 if not record.is_pair or sample.is_chosen else 1]
        lines.append(json.dumps({"prompt": record.prompt, "response": response, "score": score,
                                 "source_label": sample.label}, ensure_ascii=False))
    if is_rank_zero():
        atomic_write_text(Path(args.output), "\n".join(lines) + "\n")
    mean = sum(scores) / len(scores)
    print_rank_zero(f"labelled {len(scores)} responses of {args.data} ({data.stats.summary()}) with "
                    f"{args.reward_model}: mean score {mean:+.4f}; wrote {args.output}")
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
