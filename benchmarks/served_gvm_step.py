"""The DVPO step with the GVM served (examples/serve_gvm.py) vs in the actor's process, in the peer setting.

Runs benchmarks/dvpo_step_time.py's setting alternately with ``gvm=PATH`` and ``gvm=http://...`` (a server
started on a free loopback port for each served run), ``--repeats`` times each, back to back. Prints the
median step, the GVM phase, the update, the actor's peak memory (the training process) and the server's.
Both processes share this machine's cores, so the served step also pays for the server's forward pass.

    python benchmarks/served_gvm_step.py --gvm runs/gvm_timing/final [--steps 5 --repeats 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _runs import REPO_ROOT, run_entry_point, start_gvm_server, stop_process
from dvpo_step_time import peer_setting, summarize


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for repeat in range(args.repeats):
        for mode in ("in-process", "served"):
            run_dir = (REPO_ROOT / "runs" / f"bench_served_gvm_{mode}_{repeat}").resolve()
            server_peak = None
            if mode == "served":
                process, url = start_gvm_server(args.gvm, log=run_dir.with_suffix(".server.log"))
                try:
                    run_entry_point("train_dvpo.py", peer_setting(url, run_dir, args.steps))
                    server_peak = peak_rss_mib(process.pid)
                finally:
                    stop_process(process)
            else:
                run_entry_point("train_dvpo.py", peer_setting(args.gvm, run_dir, args.steps))
            rows.append((mode, repeat, summarize(run_dir), server_peak))
    print(f"\nDVPO step in the peer setting, median of steps 2..{args.steps}:")
    print(f"{'run':>14} {'s/step':>8} {'GVM phase s':>12} {'update s':>9} {'actor peak MiB':>15} {'server peak MiB':>16}")
    for mode, repeat, summary, server_peak in rows:
        print(f"{mode + ' ' + str(repeat + 1):>14} {summary['time/step_s']:>8.2f} {summary['time/gvm_forward_s']:>12.2f} "
              f"{summary['time/update_s']:>9.2f} {summary['perf/peak_memory_mib']:>15.0f} "
              f"{server_peak if server_peak is not None else float('nan'):>16.0f}")


if __name__ == "__main__":
    main()
