"""Render a GVM's token-level values for a prompt and its responses (the paper's Figure 4).

    python tools/visualize_gvm.py --gvm runs/gvm/final --prompt "What is 2+2?" \\
        --response "2 + 2 = 4." --response "It is 5." --out-dir gvm_view
    python tools/visualize_gvm.py --gvm runs/gvm/final --data data/preference/heldout_pairs.jsonl --index 3

Writes OUT_DIR/gvm_values.html (hover a token for its value) and OUT_DIR/gvm_values.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nemo_dvpo.utils.errors import exit_on_user_error, run_and_exit


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True, help="GVM checkpoint folder")
    parser.add_argument("--prompt", help="the prompt (a user turn)")
    parser.add_argument("--response", action="append", default=[], help="a response; repeat for several")
    parser.add_argument("--data", help="instead of --prompt/--response: a preference data file")
    parser.add_argument("--index", type=int, default=0, help="with --data: which record (0-based)")
    parser.add_argument("--out-dir", default="gvm_view")
    parser.add_argument("--value-range", type=float, default=1.0, help="|value| drawn fully saturated")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    from nemo_dvpo.data.preference import (
        PreferenceDataConfig,
        PreferenceRecord,
        collate_value_batch,
        read_preference_records,
        tokenize_preference_records,
    )
    from nemo_dvpo.evaluation.gvm_checkpoint import load_gvm
    from nemo_dvpo.evaluation.visualize import TokenValueRow, render_html, render_png
    from nemo_dvpo.models.value_model import token_values
    from nemo_dvpo.utils.distributed import destroy_distributed, is_rank_zero, print_rank_zero
    from nemo_dvpo.utils.errors import NemoDvpoError

    from nemo_dvpo.utils.paths import check_output_dir

    check_output_dir(args.out_dir, "--out-dir")
    if bool(args.data) == bool(args.prompt):
        raise NemoDvpoError("give either --prompt with one or more --response, or --data with --index")
    gvm = load_gvm(args.gvm)
    config = PreferenceDataConfig(chat_template=gvm.chat_template, max_length=100000)
    if args.data:
        records, _ = read_preference_records(args.data, dataclass_replace(config, max_records=args.index + 1))
        if len(records) <= args.index:
            raise NemoDvpoError(f"{args.data} has only {len(records)} valid records; "
                                f"--index {args.index} is out of range")
        record = records[args.index]
        titles = ["chosen", "rejected"] if len(record.responses) == 2 else ["response"]
    else:
        if not args.response:
            raise NemoDvpoError("give at least one --response")
        record = PreferenceRecord(prompt=[{"role": "user", "content": args.prompt}], responses=tuple(args.response),
                                  labels=tuple(0.0 for _ in args.response), index=0, where="command line")
        titles = [f"response {i + 1}" for i in range(len(args.response))]
    samples = tokenize_preference_records([record], gvm.tokenizer, config, eos_token_id=gvm.eos_token_id).samples
    batch = collate_value_batch(samples, gvm.pad_token_id)
    values = token_values(gvm.model, batch.tokens)

    rows = []
    for row, (sample, title) in enumerate(zip(samples, titles)):
        ids = [int(token) for token in sample.input_ids]
        response = range(sample.prompt_length, len(ids))
        rows.append(TokenValueRow(
            title=title,
            prompt_text=gvm.tokenizer.decode(ids[:sample.prompt_length]),
            token_texts=[gvm.tokenizer.decode([ids[t]]) for t in response],
            values=[values[row, t].item() for t in response]))
    if is_rank_zero():
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        title = f"GVM token values ({args.gvm})"
        (out_dir / "gvm_values.html").write_text(render_html(rows, title, args.value_range))
        render_png(rows, out_dir / "gvm_values.png", title, args.value_range)
        for row in rows:
            print_rank_zero(f"{row.title}: mean value {sum(row.values) / len(row.values):+.4f}, "
                            f"last token {row.values[-1]:+.4f}")
        print_rank_zero(f"wrote {out_dir / 'gvm_values.html'} and {out_dir / 'gvm_values.png'}")
    destroy_distributed()


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


if __name__ == "__main__":
    run_and_exit(main)
