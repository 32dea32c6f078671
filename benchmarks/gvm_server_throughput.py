"""GVM server throughput and latency with 1, 8 and 32 concurrent clients (docs/benchmarks.md).

Starts examples/serve_gvm.py on a free loopback port, then for each concurrency runs that many client
threads, each sending ``--requests`` requests of ``--sequences`` sequences of ``--tokens`` random tokens
(binary tensors, the form RemoteGVM sends), after one warm-up request. Prints sequences/s over the run,
the p50 / p99 request latency and the mean sequences per model batch (from the server's /metrics); with
``--trials N``, of the fastest of N runs per concurrency (on a machine shared with other jobs, the least
disturbed).

    python benchmarks/gvm_server_throughput.py --gvm runs/gvm_timing/final [--clients 1 8 32]

``--server-repo DIR`` serves with another checkout's code (e.g. ``git worktree add /tmp/before HEAD~1``) and this
client, so that two versions of the server are measured with the same client, interleaved.
"""

from __future__ import annotations

import argparse
from pathlib import Path
import statistics
import threading
import time
import urllib.request

import numpy as np

from _runs import REPO_ROOT, start_gvm_server, stop_process

from nemo_dvpo.serving.kserve import HEADER_LENGTH, infer_request_body, parse_infer_response
from nemo_dvpo.utils.errors import run_and_exit


def request(url: str, tokens: np.ndarray, lengths: np.ndarray) -> float:
    body, headers = infer_request_body({"tokens": tokens, "lengths": lengths})
    started = time.perf_counter()
    call = urllib.request.Request(url + "/v2/models/gvm/infer", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(call, timeout=600) as response:
        answer = response.read()
        values = parse_infer_response(answer, response.headers.get(HEADER_LENGTH))["values"]
    assert values.shape == tokens.shape
    return time.perf_counter() - started


def batch_totals(url: str) -> tuple[float, float]:
    """The server's (model batches, sequences in them) so far, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        samples = {sample.name: sample.value for family in text_string_to_metric_families(response.read().decode())
                   for sample in family.samples}
    return samples["gvm_batch_sequences_count"], samples["gvm_batch_sequences_sum"]


def trial(url: str, clients: int, args, shape: tuple[int, int], lengths: np.ndarray) -> tuple[float, str]:
    """``clients`` threads sending ``args.requests`` requests each: (sequences/s, the printed row)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(args.requests):
            elapsed = request(url, rng.integers(0, args.vocab, shape, dtype=np.int64), lengths)
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    batches_before, sequences_before = batch_totals(url)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    batches, sequences = (now - before for now, before in zip(batch_totals(url), (batches_before, sequences_before)))
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    rate = len(latencies) * args.sequences / wall
    return rate, (f"{clients:>8} {rate:>12.2f} {statistics.median(ordered):>14.3f} {p99:>14.3f} "
                  f"{len(latencies):>9} {sequences / batches:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gvm", required=True)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--sequences", type=int, default=1, help="sequences per request")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--trials", type=int, default=1,
                        help="runs per concurrency; the fastest is printed (the least disturbed on a shared machine)")
    parser.add_argument("--server-repo", type=Path, default=REPO_ROOT,
                        help="the checkout whose examples/serve_gvm.py serves (default: this one)")
    parser.add_argument("server_overrides", nargs="*", help="extra serve_gvm.py overrides")
    args = parser.parse_args()
    generator = np.random.default_rng(0)
    log = REPO_ROOT / "runs" / "gvm_server_bench.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    process, url = start_gvm_server(args.gvm, *args.server_overrides, log=log, repo=args.server_repo.resolve())
    try:
        shape = (args.sequences, args.tokens)
        lengths = np.full(args.sequences, args.tokens, dtype=np.int64)
        request(url, generator.integers(0, args.vocab, shape, dtype=np.int64), lengths)  # warm-up
        print(f"GVM server {args.gvm} (code: {args.server_repo.resolve()}): requests of {args.sequences} x "
              f"{args.tokens} tokens")
        print(f"{'clients':>8} {'sequences/s':>12} {'p50 latency s':>14} {'p99 latency s':>14} {'requests':>9} "
              f"{'sequences/batch':>16}" + (f"   (best of {args.trials} trials)" if args.trials > 1 else ""))
        for clients in args.clients:
            # The best of the trials: on a machine shared with other jobs, the least disturbed one.
            rows = [trial(url, clients, args, shape, lengths) for _ in range(args.trials)]
            print(max(rows, key=lambda row: row[0])[1], flush=True)
    finally:
        stop_process(process)


if __name__ == "__main__":
    run_and_exit(main)
