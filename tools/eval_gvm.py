"""Held-out pairwise accuracy of a trained GVM, in the paper's forms (its Table 4).

    python tools/eval_gvm.py --gvm runs/gvm/final --data data/smollm2_ifeval/pairs_heldout.jsonl

A pair is correct when the chosen response scores strictly higher, where a response's score is
the mean of its token values, its last token's value, or a percentile (P1 ... P99) of them. Each
accuracy is printed with its Wilson 95% interval over the pairs. ``--output`` also keeps every pair's scores
(``pair_ids`` and, per form, the chosen and rejected responses' scores), so the accuracies can be recounted and
two GVMs compared pair by pair.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True, help="GVM checkpoint folder (e.g. runs/gvm/final)")
    parser.add_argument("--data", required=True, help="pairwise preference data (any supported format)")
    parser.add_argument("--split", default=None, help="split name for multi-split sources")
    parser.add_argument("--max-pairs", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--pipeline-parallel", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    from nemo_dvpo.utils.paths import check_output_file

    if args.output:
        check_output_file(args.output, "--output")  # before the evaluation, not after it
    from nemo_dvpo.data.preference import PreferenceDataConfig, collate_value_batch, load_preference_data
    from nemo_dvpo.evaluation.gvm_checkpoint import load_gvm
    from nemo_dvpo.evaluation.value_accuracy import SUMMARIES, evaluate_pairs, wilson_interval
    from nemo_dvpo.utils.distributed import destroy_distributed, is_rank_zero, print_rank_zero
    from nemo_dvpo.utils.errors import NemoDvpoError

    gvm = load_gvm(args.gvm, args.tensor_parallel, args.pipeline_parallel)
    config = PreferenceDataConfig(chat_template=gvm.chat_template, max_length=args.max_length,
                                  overlong="truncate_prompt", max_records=args.max_pairs)
    data = load_preference_data(args.data, config, gvm.tokenizer, eos_token_id=gvm.eos_token_id, split=args.split)
    pairs: dict[int, dict[bool, object]] = {}
    for sample in data.samples:
        if sample.pair_id is not None and sample.pair_id >= 0:
            pairs.setdefault(sample.pair_id, {})[bool(sample.is_chosen)] = sample
    complete_ids = [pair_id for pair_id, p in sorted(pairs.items()) if True in p and False in p]
    complete = [(pairs[pair_id][True], pairs[pair_id][False]) for pair_id in complete_ids]
    if not complete:
        raise NemoDvpoError(f"{args.data} holds no chosen/rejected pairs (pairwise schema needed)")

    def batches(samples):
        return [collate_value_batch(samples[i:i + args.micro_batch_size], gvm.pad_token_id)
                for i in range(0, len(samples), args.micro_batch_size)]

    accuracy, chosen, rejected = evaluate_pairs(gvm.model, batches([c for c, _ in complete]),
                                                batches([r for _, r in complete]))
    intervals = {name: wilson_interval(round(accuracy[name] * len(complete)), len(complete)) for name in SUMMARIES}
    print_rank_zero(f"GVM {args.gvm} on {len(complete)} held-out pairs from {args.data}")
    print_rank_zero(f"{'score':>8}  {'accuracy':>8}  {'Wilson 95%':>15}  {'mean chosen':>12}  {'mean rejected':>13}")
    for name in SUMMARIES:
        low, high = intervals[name]
        print_rank_zero(f"{name:>8}  {accuracy[name]:8.4f}  {f'[{low:.3f}, {high:.3f}]':>15}  "
                        f"{chosen[name].mean().item():+12.4f}  {rejected[name].mean().item():+13.4f}")
    if args.output and is_rank_zero():
        scores = {name: {"chosen": chosen[name].tolist(), "rejected": rejected[name].tolist()} for name in SUMMARIES}
        Path(args.output).write_text(json.dumps({"gvm": args.gvm, "data": args.data, "pairs": len(complete),
                                                 "accuracy": accuracy, "wilson_95": intervals,
                                                 "pair_ids": complete_ids, "scores": scores}, indent=2))
    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
