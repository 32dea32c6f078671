"""Several evaluations side by side: ``report.md`` and PNG charts (``tools/eval_benchmarks.py --compare``).

Each evaluation folder's ``scores.json`` (or a shipped evaluation's ``provenance.json``: ``shipped``) gives one
column; charts show each score with its 95% interval
(``scores.png``) and MT-Bench's per-category means (``mt_bench_categories.png``, where any turn was rated). IFEval answers are
also compared prompt by prompt: each later folder against the first (the starting model, say), with a
paired 95% interval, which is far tighter than the difference of the two scores' own intervals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from nemo_dvpo.evaluation.benchmarks import assets
from nemo_dvpo.evaluation.benchmarks.ifeval import RESULT_KEYS, ifeval_paired_change, ifeval_results
from nemo_dvpo.evaluation.benchmarks.shipped import is_shipped, shipped_file, shipped_records, shipped_scores
from nemo_dvpo.evaluation.benchmarks.store import RecordFile, record_key, write_bytes_atomic
from nemo_dvpo.utils.errors import NemoDvpoError
from nemo_dvpo.utils.figures import png_bytes, pyplot


def load_scores(folder: Path) -> dict:
    path = folder / "scores.json"
    if not path.is_file() and is_shipped(folder):
        return shipped_scores(folder)
    if not path.is_file():
        raise NemoDvpoError(f"--compare {folder}: no scores.json or provenance.json (evaluate into that folder "
                            "first, or name a folder --ship-to wrote)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NemoDvpoError(f"{path} is not valid JSON ({error})") from None


def score_rows(scores: dict) -> list[tuple[str, Optional[float], Optional[float], Optional[float]]]:
    """(metric, value, interval low, interval high) for each headline score of one evaluation.

    IFEval accuracies and win rates are shown in %, MT-Bench on its 1-10 scale.
    """
    rows = []
    ifeval = scores.get("ifeval")
    if ifeval:
        for metric in ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict",
                       "instruction_level_loose"):
            value, half = ifeval.get(metric), (ifeval.get("ci95") or {}).get(metric)
            rows.append((f"IFEval {metric.replace('_', ' ')} (%)", _pct(value), *_interval(_pct(value), _pct(half))))
    mt_bench = scores.get("mt_bench")
    if mt_bench:
        rows.append(("MT-Bench score (1-10)", mt_bench.get("score"),
                     *_interval(mt_bench.get("score"), mt_bench.get("ci95"), 1.0, 10.0)))
        rows.append(("MT-Bench turn 1", mt_bench.get("turn_1"), None, None))
        rows.append(("MT-Bench turn 2", mt_bench.get("turn_2"), None, None))
    arena = scores.get("arena_hard")
    if arena:
        # arena-hard-auto's own numbers first - per category, as its leaderboard (it never pools the categories,
        # which have different baselines) - then ours.
        for category, part in sorted((arena.get("categories") or {}).items()):
            auto = part.get("arena_hard_auto") or {}
            low, high = auto.get("interval90") or (None, None)
            rows.append((f"Arena-Hard {category}: score (%), arena-hard-auto 90% interval", _pct(auto.get("score")),
                         _pct(low), _pct(high)))
        # Files written before arena-hard-auto's interval was added name ours "ci95".
        low, high = arena.get("ci95_question_bootstrap", arena.get("ci95")) or (None, None)
        rows.append(("Arena-Hard all categories: win rate (%), question-bootstrap 95% interval (ours)",
                     _pct(arena.get("win_rate")), _pct(low), _pct(high)))
    alpaca = scores.get("alpaca_eval")
    if alpaca:
        win, error = alpaca.get("win_rate"), alpaca.get("standard_error")
        rows.append(("AlpacaEval 2 win rate (%)", win, *_interval(win, None if error is None else 1.96 * error)))
        lc, lc_error = alpaca.get("length_controlled_winrate"), alpaca.get("lc_standard_error")
        rows.append(("AlpacaEval 2 LC win rate (%)", lc, *_interval(lc, None if lc_error is None else 1.96 * lc_error)))
    return rows


def _pct(value):
    return None if value is None else 100 * value


def _interval(value, half_width, low: float = 0.0, high: float = 100.0):
    """A normal-approximation interval, clipped to the score's range."""
    if value is None or half_width is None:
        return None, None
    return max(low, value - half_width), min(high, value + half_width)


def _cell(value, low, high) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if low is None else f"{value:.2f} [{low:.2f}, {high:.2f}]"


def write_report(folders: list[Path], output_dir: Path) -> Path:
    """Write ``report.md`` and ``scores.png`` into ``output_dir``, and ``mt_bench_categories.png`` where any
    evaluation has rated MT-Bench turns."""
    evaluations = [(folder, load_scores(folder)) for folder in folders]
    names = [scores.get("model") or folder.name for folder, scores in evaluations]
    if len(set(names)) < len(names):
        names = [f"{name} ({folder.name})" for name, (folder, _) in zip(names, evaluations)]
    table = {name: {row[0]: row[1:] for row in score_rows(scores)} for name, (_, scores) in zip(names, evaluations)}
    metrics = list(dict.fromkeys(metric for rows in table.values() for metric in rows))
    lines = ["# Benchmark comparison", "",
             "Scores with intervals in brackets, 95% unless named (IFEval: normal approximation clipped to 0-100; "
             "MT-Bench: normal approximation over rated turns; Arena-Hard: arena-hard-auto's score and 90% interval "
             "(mean and 5th / 95th percentiles of 100 resamples of the per-game entries), then the exact win rate "
             "with our bootstrap over questions; AlpacaEval: 1.96 x alpaca_eval's standard error). `-`: not "
             "evaluated or nothing could be scored.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric in metrics:
        lines.append(f"| {metric} | " + " | ".join(_cell(*table[name].get(metric, (None, None, None)))
                                                 for name in names) + " |")
    lines += ["", "| evaluation | folder | answers from | judge | questions per benchmark |", "|---|---|---|---|---|"]
    for name, (folder, scores) in zip(names, evaluations):
        judges = sorted({scores[b]["judge"]["model"] for b in ("mt_bench", "arena_hard", "alpaca_eval")
                         if b in scores and "judge" in scores[b]})
        counts = ", ".join(f"{b} {scores[b].get('questions')}" for b in ("ifeval", "mt_bench", "arena_hard",
                                                                       "alpaca_eval") if b in scores)
        lines.append(f"| {name} | {folder} | {scores.get('answers_from', '-')} | {', '.join(judges) or '-'} | "
                     f"{counts} |")
    categories = sorted({category for _, scores in evaluations
                         for category in (scores.get("mt_bench") or {}).get("categories", {})})
    if categories:
        lines += ["", "## MT-Bench by category", "", "| category | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for category in categories:
            values = [(scores.get("mt_bench") or {}).get("categories", {}).get(category) for _, scores in evaluations]
            lines.append(f"| {category} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    lines += ifeval_paired_lines([folder for folder, _ in evaluations], names)
    categories_chart = output_dir / "mt_bench_categories.png"
    lines += ["", "Charts: `scores.png` (every score with its interval)"
              + (", `mt_bench_categories.png`." if categories else "."), ""]
    write_bytes_atomic(output_dir / "scores.png", _scores_chart(names, metrics, table))
    if categories:
        write_bytes_atomic(categories_chart, _categories_chart(names, categories, evaluations))
    else:  # an empty chart says nothing; one left by an earlier report in this folder would say something false
        categories_chart.unlink(missing_ok=True)
    report = output_dir / "report.md"
    write_bytes_atomic(report, "\n".join(lines).encode("utf-8"))
    return report


def ifeval_paired_lines(folders: list[Path], names: list[str]) -> list[str]:
    """The report's section on each folder's IFEval change against the first folder, prompt by prompt.

    Only prompts both folders answered are paired, and only answers made with the same generation settings
    (a 1280-token answer against a 128-token one would measure the cap, not the model).
    """
    with_answers = [(folder, name) for folder, name in zip(folders, names)
                    if (folder / "ifeval" / "answers.jsonl").is_file() or shipped_file(folder, "ifeval").is_file()]
    if len(with_answers) < 2:
        return []
    docs = {record_key(doc["key"]): doc for doc in assets.ifeval_prompts()}
    (base_folder, base_name), others = with_answers[0], with_answers[1:]
    base_answers = _ifeval_answers(base_folder)
    lines = ["", f"## IFEval: change against {base_name}, prompt by prompt", "",
             "Percentage points; 95% interval of the paired per-prompt difference (instruction level: prompts are "
             "the units, since one answer decides all of a prompt's instructions); better / worse: prompts whose "
             "result rose / fell.", "",
             "| evaluation | prompts | " + " | ".join(metric.replace("_", " ") for metric in RESULT_KEYS) + " |",
             "|---|---|" + "---|" * len(RESULT_KEYS)]
    for folder, name in others:
        answers = _ifeval_answers(folder)
        common = [key for key in base_answers if key in answers and key in docs]
        if not common:
            lines.append(f"| {name} | 0 | " + " | ".join("-" for _ in RESULT_KEYS) + " |")
            continue
        _check_same_generation(base_folder, base_answers, folder, answers, common)
        ordered_docs = [docs[key] for key in common]
        change = ifeval_paired_change(ifeval_results(ordered_docs, [base_answers[key]["answer"] for key in common]),
                                      ifeval_results(ordered_docs, [answers[key]["answer"] for key in common]))
        cells = []
        for metric in RESULT_KEYS:
            entry = change[metric]
            interval = "" if entry["ci95"] is None else (f" [{100 * (entry['change'] - entry['ci95']):+.2f}, "
                                                         f"{100 * (entry['change'] + entry['ci95']):+.2f}]")
            cells.append(f"{100 * entry['change']:+.2f}{interval}, {entry['better']} / {entry['worse']}")
        lines.append(f"| {name} | {len(common)} | " + " | ".join(cells) + " |")
    return lines


def _ifeval_answers(folder: Path) -> dict:
    if not (folder / "ifeval" / "answers.jsonl").is_file() and is_shipped(folder):
        return shipped_records(folder, "ifeval")
    return RecordFile(folder / "ifeval" / "answers.jsonl", f"{folder} IFEval answers").load()


def _check_same_generation(base_folder: Path, base_answers: dict, folder: Path, answers: dict, keys: list) -> None:
    settings = ("max_new_tokens", "temperature")
    for key in keys:
        base = {name: base_answers[key].get("generation", {}).get(name) for name in settings}
        other = {name: answers[key].get("generation", {}).get(name) for name in settings}
        if base != other:
            raise NemoDvpoError(f"--compare: IFEval answer {key} was generated with {other} in {folder} but with "
                                f"{base} in {base_folder}; pair only answers made with the same settings")


def _scores_chart(names: list[str], metrics: list[str], table: dict) -> bytes:
    plt = pyplot()
    rows = max(1, len(metrics))
    figure, axes = plt.subplots(rows, 1, figsize=(7, 1.1 * rows + 0.6), squeeze=False)
    for axis, metric in zip(axes[:, 0], metrics or ["(no scores)"]):
        for position, name in enumerate(names):
            value, low, high = table[name].get(metric, (None, None, None))
            if value is None:
                continue
            error = [[value - low], [high - value]] if low is not None else None
            axis.barh(position, value, xerr=error, color=f"C{position}", capsize=3)
        axis.set_yticks(range(len(names)), names, fontsize=7)
        axis.set_title(metric, fontsize=8, loc="left")
        axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    return png_bytes(figure)


def _categories_chart(names: list[str], categories: list[str], evaluations: list) -> bytes:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(5, 1.1 * len(categories) + 2), 3.2))
    width = 0.8 / max(1, len(names))
    for index, (name, (_, scores)) in enumerate(zip(names, evaluations)):
        values = [(scores.get("mt_bench") or {}).get("categories", {}).get(category) for category in categories]
        positions = [c + index * width for c, value in enumerate(values) if value is not None]
        axis.bar(positions, [value for value in values if value is not None], width, label=name, color=f"C{index}")
    axis.set_xticks([c + 0.4 - width / 2 for c in range(len(categories))], categories, fontsize=8)
    axis.set_ylim(0, 10)
    axis.set_ylabel("MT-Bench score (1-10)")
    axis.set_title("MT-Bench by category")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return png_bytes(figure)
