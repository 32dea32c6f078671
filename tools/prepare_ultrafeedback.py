"""Split UltraFeedback into the DVPO paper's stages - SFT, value (GVM) learning, RL prompts - by prompt.

    python tools/prepare_ultrafeedback.py --source /data/ultrafeedback_binarized --split train_prefs \\
        --output-dir data/ultrafeedback

The paper's base setting splits UltraFeedback 30% SFT / 50% reward-or-value learning / 20% RL
prompts. A held-out test split (default 5%) is taken first, for evaluation (e.g. the GVM's pairwise
accuracy); the rest is divided 30/50/20. All fractions are of distinct prompts: every record of a
prompt lands in the same split, so no prompt is trained on in one stage and evaluated in another.
A prompt's split depends only on the prompt text and --seed.

--source is a local copy (a .jsonl/.json/.parquet file, a save_to_disk folder, or a downloaded hub
snapshot folder such as data/train_prefs-00000-of-00001.parquet) or a hub id where a hub is
reachable, e.g. HuggingFaceH4/ultrafeedback_binarized with --split train_prefs. Records are read in
the pairwise schema of nemo_dvpo.data.preference (prompt, chosen, rejected; strings or conversations)
and validated; --skip-invalid drops malformed ones (e.g. chosen == rejected) and counts them.

Written to --output-dir:
  sft.jsonl, value.jsonl, test.jsonl  the source records as they were (all columns), in source order
  rl.jsonl                            one {"prompt": str} per distinct prompt ({"messages": [...]} for
                                      multi-turn prompts) - the prompts_file format of examples/generate.py
  manifest.json                       source, seed, fractions, counts per split, skipped records
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError, exit_on_user_error, run_and_exit

STAGES = ("sft", "value", "rl")
SPLITS = ("test",) + STAGES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="UltraFeedback: local file or folder, or a hub id")
    parser.add_argument("--split", default=None, help="split of a DatasetDict / hub dataset, e.g. train_prefs")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "json", "parquet", "disk", "hub"])
    parser.add_argument("--schema", default="pairwise", choices=["auto", "pairwise", "scored"])
    parser.add_argument("--output-dir", required=True, help="folder for the split JSONL files and manifest.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.05, help="held out first, of all prompts")
    parser.add_argument("--sft-fraction", type=float, default=0.3, help="of the prompts left after the test split")
    parser.add_argument("--value-fraction", type=float, default=0.5, help="of the prompts left after the test split")
    parser.add_argument("--rl-fraction", type=float, default=0.2, help="of the prompts left after the test split")
    parser.add_argument("--skip-invalid", action="store_true", help="skip (and count) malformed records")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser.parse_args(argv)


def _check_fractions(args: argparse.Namespace) -> dict[str, float]:
    if not 0.0 <= args.test_fraction < 1.0:
        raise ConfigError(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    fractions = {stage: getattr(args, f"{stage}_fraction") for stage in STAGES}
    for stage, fraction in fractions.items():
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"--{stage}-fraction must be in [0, 1], got {fraction}")
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ConfigError(f"--sft-fraction, --value-fraction and --rl-fraction must sum to 1, got "
                          f"{' + '.join(str(f) for f in fractions.values())} = {sum(fractions.values()):g}")
    return fractions


def _rl_prompt(prompt: list[dict]) -> dict:
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return {"prompt": prompt[0]["content"]}
    return {"messages": prompt}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # Write beside, then rename: an interrupted run never leaves a truncated file that looks complete.
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(partial, path)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    from nemo_dvpo.data.preference import PreferenceDataStats, iter_preference_records
    from nemo_dvpo.data.readers import iter_source_records
    from nemo_dvpo.data.splits import assign_by_key, split_counts

    from nemo_dvpo.utils.paths import check_output_dir

    fractions = _check_fractions(args)
    output_dir = check_output_dir(args.output_dir, "--output-dir")
    paths = {name: output_dir / f"{name}.jsonl" for name in SPLITS}
    manifest_path = output_dir / "manifest.json"
    existing = [str(p) for p in [*paths.values(), manifest_path] if p.exists()]
    if existing and not args.overwrite:
        raise NemoDvpoError(f"output files exist: {', '.join(existing)}; pass --overwrite to replace them")

    stats = PreferenceDataStats()
    records = list(iter_preference_records(iter_source_records(args.source, args.format, args.split),
                                           args.schema, args.skip_invalid, stats))
    if not records:
        raise NemoDvpoError(f"{args.source}: no valid records ({stats.read_summary()})")

    # Test first (of all prompts), then the paper's stage fractions of what is left.
    prompt_keys = {record.prompt_key for _, record in records}
    test_count = split_counts(len(prompt_keys), [1.0 - args.test_fraction, args.test_fraction])[1]
    stage_counts = split_counts(len(prompt_keys) - test_count, list(fractions.values()))
    split_of = assign_by_key(prompt_keys, {"test": test_count, **dict(zip(STAGES, stage_counts))}, args.seed)

    rows: dict[str, list[dict]] = {name: [] for name in SPLITS}
    prompts_in: dict[str, set[str]] = {name: set() for name in SPLITS}
    for source, record in records:
        name = split_of[record.prompt_key]
        if name == "rl":
            if record.prompt_key not in prompts_in[name]:
                rows[name].append(_rl_prompt(record.prompt))
        else:
            rows[name].append(source.fields)
        prompts_in[name].add(record.prompt_key)

    output_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name in SPLITS:
        _write_jsonl(paths[name], rows[name])
        counts[name] = {"prompts": len(prompts_in[name]), "records": sum(split_of[r.prompt_key] == name
                                                                         for _, r in records)}
        print(f"{name:>5}: {counts[name]['prompts']:6d} prompts, {counts[name]['records']:6d} records -> {paths[name]}")
    print(f"{args.source}: {stats.read_summary()}")
    manifest = {
        "source": args.source,
        "split": args.split,
        "schema": "pairwise" if records[0][1].is_pair else "scored",
        "seed": args.seed,
        "split_by": "prompt",
        "test_fraction": args.test_fraction,
        "fractions": fractions,
        "counts": counts,
        "records_read": stats.records_read,
        "records_invalid": stats.records_invalid,
        "files": {name: paths[name].name for name in SPLITS},
    }
    partial = manifest_path.with_name(f".{manifest_path.name}.partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, manifest_path)
    print(f"wrote {manifest_path}")
    return manifest


if __name__ == "__main__":
    run_and_exit(main)
