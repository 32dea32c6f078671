"""Training curves of one or more runs, from their ``metrics.jsonl``, as one PNG (a panel per metric).

TensorBoard shows the same numbers live (every recipe writes ``run_dir/tensorboard``); this is the picture to
keep beside a result: e.g. a GVM's training loss and held-out accuracy for pair, score and mixed labels.
"""

from __future__ import annotations

from pathlib import Path

from nemo_dvpo.data.jsonl import read_jsonl
from nemo_dvpo.utils.errors import NemoDvpoError
from nemo_dvpo.utils.figures import png_bytes, pyplot


def read_run_metrics(run_dir: str | Path) -> list[dict]:
    """The per-step records a recipe logged (``run_dir/metrics.jsonl``; a line cut by a kill is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise NemoDvpoError(f"{run_dir}: no metrics.jsonl (expected the run_dir of a nemo_dvpo run)")
    return read_jsonl(path, "metrics file", tolerate_cut_last_line=True)


def metric_series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the records that logged ``name`` (evaluations log only every N steps). A resumed
    run may log a step twice; the later record wins."""
    by_step = {record["step"]: float(record[name]) for record in records if name in record}
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def curves_png(runs: dict[str, list[dict]], metrics: list[str]) -> bytes:
    """A panel per metric, a line per run (``runs``: label -> records). Unknown metrics are an error that lists
    what the runs logged."""
    logged = sorted({name for records in runs.values() for record in records for name in record} - {"step"})
    missing = [name for name in metrics if name not in logged]
    if missing:
        raise NemoDvpoError(f"no run logged {', '.join(missing)}; they logged: {', '.join(logged)}")
    plt = pyplot()
    figure, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.2 * len(metrics) + 0.4), squeeze=False, sharex=True)
    for axis, name in zip(axes[:, 0], metrics):
        for index, (label, records) in enumerate(runs.items()):
            steps, values = metric_series(records, name)
            axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label,
                      color=f"C{index}")
        axis.set_title(name, fontsize=9, loc="left")
        axis.grid(alpha=0.3)
        axis.tick_params(labelsize=8)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    return png_bytes(figure)
