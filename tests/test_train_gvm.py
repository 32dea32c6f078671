"""The GVM recipe end to end on the tiny model: it trains, evaluates, and a killed run resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, entry_point_env as _env, kill_after_first_checkpoint

pytestmark = pytest.mark.slow  # every test here trains, converts or launches ranks (see pyproject.toml)

FIXTURE = "tests/fixtures/ultrafeedback_binarized_mini.jsonl"


def _command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "examples/train_gvm.py", "model=tiny", f"run_dir={run_dir}",
            f"data.train={FIXTURE}", f"data.eval={FIXTURE}", "train.steps=12", "train.global_batch_size=8",
            "train.micro_batch_size=4", "train.eval_every=1", "train.save_every=2", "train.eval_max_pairs=8",
            "optim.lr=1e-3", "optim.warmup_steps=2", *overrides]


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: (record["train/loss"], record["eval/accuracy_mean"]) for record in records}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, smollm2_hf_folder) -> Path:
    """One complete 12-step run of the recipe on the tiny model."""
    run_dir = tmp_path_factory.mktemp("gvm") / "uninterrupted"
    completed = subprocess.run(_command(run_dir), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                               timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return run_dir


def test_final_gvm_carries_its_value_statistics(uninterrupted):
    final = json.loads((uninterrupted / "final" / "nemo_dvpo_checkpoint.json").read_text())
    assert final["kind"] == "gvm" and final["step"] == 12
    assert final["gvm"]["value_stats"]["num_tokens"] > 0 and final["gvm"]["value_stats"]["std"] > 0
    assert (final["gvm"]["gamma"], final["gvm"]["lam"]) == (1.0, 0.95)


def test_killed_and_resumed_run_reproduces_the_uninterrupted_curve(uninterrupted, tmp_path):
    # Kill a second run with SIGKILL as soon as it has written its first checkpoint.
    killed = tmp_path / "killed"
    kill_after_first_checkpoint(_command(killed), killed)
    resumed_from = (killed / "checkpoints" / "latest").read_text().strip()

    completed = subprocess.run(_command(killed, "resume=true"), cwd=REPO_ROOT, env=_env(), capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "resumed from" in completed.stdout + completed.stderr
    expected, actual = _losses(uninterrupted), _losses(killed)
    assert sorted(actual) == list(range(1, 13)), f"resumed from {resumed_from}, logged {sorted(actual)}"
    assert actual == expected
    # Training moved the loss: equality is not a frozen model's.
    assert expected[12][0] != expected[1][0]


def test_eval_tool_reproduces_the_recipes_held_out_accuracy(uninterrupted, tmp_path):
    completed = subprocess.run(
        [sys.executable, "tools/eval_gvm.py", "--gvm", str(uninterrupted / "final"), "--data", FIXTURE,
         "--max-pairs", "8", "--output", str(tmp_path / "eval.json")],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["pairs"] == 8
    logged = json.loads((uninterrupted / "metrics.jsonl").read_text().splitlines()[-1])
    for name in ("mean", "last", "p1", "p99"):
        assert result["accuracy"][name] == pytest.approx(logged[f"eval/accuracy_{name}"], abs=1e-6), name
        # The interval is the Wilson interval of the 8 pairs' count of wins.
        from nemo_dvpo.evaluation.value_accuracy import wilson_interval

        wins = round(result["accuracy"][name] * 8)
        assert result["wilson_95"][name] == pytest.approx(list(wilson_interval(wins, 8))), name
        assert result["wilson_95"][name][0] <= result["accuracy"][name] <= result["wilson_95"][name][1]
        # Every pair's scores are kept, and recount to the accuracy (chosen strictly higher).
        scores = result["scores"][name]
        assert len(scores["chosen"]) == len(scores["rejected"]) == 8
        assert sum(c > r for c, r in zip(scores["chosen"], scores["rejected"])) == wins, name
    assert result["pair_ids"] == sorted(result["pair_ids"]) and len(set(result["pair_ids"])) == 8


def test_visualize_tool_writes_html_and_png(uninterrupted, tmp_path):
    completed = subprocess.run(
        [sys.executable, "tools/visualize_gvm.py", "--gvm", str(uninterrupted / "final"), "--prompt", "What is 2+2?",
         "--response", "2 + 2 = 4.", "--response", "It is 5.", "--out-dir", str(tmp_path / "view")],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    page = (tmp_path / "view" / "gvm_values.html").read_text()
    assert page.count("class='row'") == 2 and "It is 5." not in page  # tokens are spans, not one string
    assert "title='" in page
    from PIL import Image

    with Image.open(tmp_path / "view" / "gvm_values.png") as image:
        assert image.size[0] == 1000 and image.size[1] > 100


def test_bad_config_is_a_clear_error(tmp_path):
    completed = subprocess.run(_command(tmp_path / "run", "train.global_batch_size=6"), cwd=REPO_ROOT, env=_env(),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 2
    assert "train.global_batch_size=6" in completed.stderr and "Traceback" not in completed.stderr
    completed = subprocess.run(_command(tmp_path / "run", "data.train=missing.jsonl"), cwd=REPO_ROOT, env=_env(),
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 2 and "missing.jsonl" in completed.stderr
