"""Training curves from metrics.jsonl: the series a panel plots, the PNG, the CLI's errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from nemo_dvpo.evaluation.curves import curves_png, metric_series, read_run_metrics
from nemo_dvpo.utils.errors import NemoDvpoError
from tests.conftest import REPO_ROOT, entry_point_env

RECORDS = [{"step": 1, "train/loss": 0.9}, {"step": 2, "train/loss": 0.7, "eval/accuracy_mean": 0.55},
           {"step": 3, "train/loss": 0.6}, {"step": 2, "train/loss": 0.65, "eval/accuracy_mean": 0.6},
           {"step": 4, "train/loss": 0.5, "eval/accuracy_mean": 0.7}]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_a_series_holds_the_steps_that_logged_the_metric_and_a_repeated_step_keeps_its_last_record():
    assert metric_series(RECORDS, "eval/accuracy_mean") == ([2, 4], [0.6, 0.7])
    assert metric_series(RECORDS, "train/loss") == ([1, 2, 3, 4], [0.9, 0.65, 0.6, 0.5])


def test_one_panel_per_metric_and_unknown_metrics_name_what_was_logged():
    one = _png_size(curves_png({"a": RECORDS, "b": RECORDS[:2]}, ["train/loss"]))
    two = _png_size(curves_png({"a": RECORDS}, ["train/loss", "eval/accuracy_mean"]))
    assert two[1] > 1.5 * one[1]
    with pytest.raises(NemoDvpoError, match=r"no run logged eval/loss; they logged: eval/accuracy_mean, train/loss"):
        curves_png({"a": RECORDS}, ["eval/loss"])


@pytest.mark.slow
def test_the_cli_writes_the_png_and_reads_a_run_cut_by_a_kill(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + '{"step": 5, "tra')
    assert len(read_run_metrics(run)) == len(RECORDS)
    output = tmp_path / "curves.png"
    completed = subprocess.run([sys.executable, "tools/plot_curves.py", str(run), "--metrics", "train/loss",
                                "eval/accuracy_mean", "--output", str(output)], cwd=REPO_ROOT, env=entry_point_env(),
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert _png_size(output.read_bytes())[0] > 0
    missing = subprocess.run([sys.executable, "tools/plot_curves.py", str(tmp_path / "nowhere"), "--output",
                              str(output)], cwd=REPO_ROOT, env=entry_point_env(), capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2
    assert "no metrics.jsonl" in missing.stderr + missing.stdout
