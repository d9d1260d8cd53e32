#!/usr/bin/env python3
"""Cold starts, before and after: one or more runner binaries, each on its
own runner (`--idle-timeout-s 1`, the default pre-started isolates), sent the
first request to the same never-seen deployments, interleaved request by
request and paced (`--gap-ms`, about one refill), so every binary meets the
machine in the same state.

    python3 bench/cold.py --binary A --binary B [--n 30] [--gap-ms 200]

Prints p50/p90/p99 of the first request (new connection, to the end of the
body) per binary. See docs/benchmarks.md.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Procs, ROOT, Runner, get, percentile  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", action="append", help="a runner binary (repeat to compare)")
    parser.add_argument("--n", type=int, default=30, help="never-seen deployments per binary")
    parser.add_argument("--gap-ms", type=int, default=200)
    args = parser.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "target/release/isocloud")]
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-cold-")
    try:
        apps = os.path.join(work, "apps")
        for i in range(args.n):
            os.makedirs(os.path.join(apps, f"c{i}"))
            with open(os.path.join(apps, f"c{i}", "main.ts"), "w") as f:
                f.write(f'Deno.serve(() => new Response("hello from c{i}"));\n')
        runners = [Runner(procs, b, apps, os.path.join(work, f"state{k}"), args.n + 10, idle_timeout_s=1)
                   for k, b in enumerate(binaries)]
        time.sleep(3)  # the pre-started isolates are up
        samples = {k: [] for k in range(len(binaries))}
        for i in range(args.n):
            for k, runner in enumerate(runners):
                samples[k].append(get(runner.port, f"c{i}.localhost"))
                time.sleep(args.gap_ms / 1000)
        print(f"\nfirst request to {args.n} never-seen deployments, {args.gap_ms} ms apart, interleaved\n")
        print("| runner | p50 ms | p90 ms | p99 ms |")
        print("| --- | --- | --- | --- |")
        for k, binary in enumerate(binaries):
            x = samples[k]
            print(f"| {k}: {os.path.relpath(binary, ROOT)} | {statistics.median(x):.2f} | {percentile(x, 90):.2f} "
                  f"| {percentile(x, 99):.2f} |")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
