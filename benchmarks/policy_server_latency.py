"""How long a short request waits while a long reply is generated, with and without slicing (docs/benchmarks.md).

Starts examples/serve_policy.py on a free loopback port once per setting of ``server.slice_tokens``; in each,
sends one long completion request (``--long-tokens``; by default 10**9, which the server clamps to the room
the prompt leaves in the context), and ``--delay`` seconds later a short one (``--short-tokens``), both greedy.
Prints each request's latency and the long reply's tokens/s. slice_tokens=0 is static batching as before:
the short request waits behind the whole long reply.

    python benchmarks/policy_server_latency.py [--policy tiny --max-sequence-length 8192 --slices 0 256]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request

from _runs import REPO_ROOT, start_server, stop_process


def complete(url: str, max_tokens: int, results: dict, name: str) -> None:
    body = json.dumps({"model": "policy", "prompt": "Once upon a time", "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    started = time.perf_counter()
    call = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=3600) as response:
        answer = json.loads(response.read())
    results[name] = (time.perf_counter() - started, answer["usage"]["completion_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="tiny")
    parser.add_argument("--max-sequence-length", type=int, default=8192)
    parser.add_argument("--slices", type=int, nargs="+", default=[0, 256], help="server.slice_tokens settings")
    parser.add_argument("--long-tokens", type=int, default=10**9)
    parser.add_argument("--short-tokens", type=int, default=4)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds between the long and the short request")
    args = parser.parse_args()
    print(f"policy {args.policy}, context {args.max_sequence_length}; long max_tokens={args.long_tokens}, short "
          f"max_tokens={args.short_tokens} sent {args.delay} s later")
    print(f"{'slice_tokens':>12} {'short s':>9} {'long s':>9} {'long tokens':>12} {'long tokens/s':>14}")
    for slice_tokens in args.slices:
        process, url = start_server("serve_policy.py", "/health", f"policy={args.policy}", "served_model_name=policy",
                                    f"max_sequence_length={args.max_sequence_length}",
                                    f"server.slice_tokens={slice_tokens}",
                                    log=REPO_ROOT / "runs" / f"policy_latency_{slice_tokens}.log")
        try:
            complete(url, 2, {}, "warm-up")
            results: dict = {}
            long = threading.Thread(target=complete, args=(url, args.long_tokens, results, "long"))
            long.start()
            time.sleep(args.delay)
            complete(url, args.short_tokens, results, "short")
            long.join()
        finally:
            stop_process(process)
        long_s, long_tokens = results["long"]
        print(f"{slice_tokens:>12} {results['short'][0]:>9.2f} {long_s:>9.1f} {long_tokens:>12} "
              f"{long_tokens / long_s:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
