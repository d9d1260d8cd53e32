#!/usr/bin/env python3
"""Where the tail latency at half of saturation comes from: a scheduler trace
(`perf sched record`, system-wide) taken while wrk sends paced keep-alive
requests at half of the runner's saturation, once through the runner and
once to the same handler served by deno directly, at the same rate.

    python3 bench/sched.py [--binary PATH] [--seconds 6] [--trace-seconds 2]

For each target, and for each party (wrk, the runner's threads, the
isolate's / deno's threads): how often it was woken per request, and its
scheduling delay (wake-up to running, from `perf sched timehist`) at p50,
p99 and max, with its CPU per request. Needs perf and root. See
docs/benchmarks.md ("p99 at half of saturation").
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (HANDLER, Procs, Runner, Wrk, cpu_ticks,  # noqa: E402
                    deno_direct, ensure_wrk, first_response, percentile)

DELAY_MS = 4  # wrk's pause after each answer, per connection
TASK = re.compile(r"^(?P<comm>.*)\[(?P<tid>\d+)(?:/(?P<pid>\d+))?\]$")


def tids(pid):
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except FileNotFoundError:
        return set()


def trace(work, name, seconds):
    data = os.path.join(work, f"{name}.data")
    subprocess.run(["perf", "sched", "record", "-o", data, "--", "sleep", str(seconds)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = subprocess.run(["perf", "sched", "timehist", "-i", data], capture_output=True, text=True, check=True)
    events = []
    for line in out.stdout.splitlines()[3:]:
        parts = line.split()
        if len(parts) < 6:
            continue
        match = TASK.match(" ".join(parts[2:-3]))
        if not match:
            continue
        try:
            sch_delay_ms, run_ms = float(parts[-2]), float(parts[-1])
        except ValueError:
            continue
        events.append((match["comm"], int(match["tid"]), sch_delay_ms, run_ms))
    return events


def summarize(events, parties, requests):
    """Per party: wake-ups per request, sch delay p50/p99/max (ms), run time
    per wake-up p50/p99 (ms: the batch a request may queue behind), CPU µs/req."""
    rows = []
    for party, belongs in parties:
        mine = [(delay, run) for comm, tid, delay, run in events if belongs(comm, tid)]
        delays = [d for d, _ in mine]
        if not mine:
            continue
        runs = [r for _, r in mine]
        rows.append((party, len(mine) / requests, statistics.median(delays), percentile(delays, 99), max(delays),
                     statistics.median(runs), percentile(runs, 99), sum(runs) * 1000 / requests))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         "target/release/isocloud"))
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--trace-seconds", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("perf is missing: apt-get install -y linux-perf")
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-sched-")
    try:
        wrk = Wrk(ensure_wrk(), work)
        apps = os.path.join(work, "apps")
        os.makedirs(os.path.join(apps, "t0"))
        with open(os.path.join(apps, "t0", "main.ts"), "w") as f:
            f.write(HANDLER)
        runner = Runner(procs, args.binary, apps, os.path.join(work, "state"), 10)
        dproc, dport = deno_direct(procs, os.path.join(apps, "t0"), os.path.join(work, "deno-dir"))
        first_response(dport)
        wrk.run(runner.port, ["t0.localhost"], 2)
        sat = wrk.run(runner.port, ["t0.localhost"], 4)["rps"]
        # the isolate serving t0, not a pre-started one waiting
        isolate = max(runner.isolates(), key=cpu_ticks)

        def paced_conns(port, host):
            conns = max(2, round(sat / 2 * (DELAY_MS + 1) / 1000))
            calib = wrk.run(port, [host], 2, conns=conns, delay_ms=DELAY_MS)
            return max(2, round(conns * (sat / 2) / calib["rps"]))

        targets = [
            ("through the runner", runner.port, "t0.localhost", [
                ("wrk", lambda comm, tid: comm.startswith("wrk")),
                ("runner", lambda comm, tid, t=tids(runner.proc.pid): tid in t),
                ("isolate (deno)", lambda comm, tid, t=tids(isolate): tid in t),
            ]),
            ("deno directly", dport, "localhost", [
                ("wrk", lambda comm, tid: comm.startswith("wrk")),
                ("deno", lambda comm, tid, t=tids(dproc.pid): tid in t),
            ]),
        ]
        print(f"\nsaturation through the runner: {sat:,.0f} req/s; both targets paced to about half, "
              f"{DELAY_MS} ms between requests per connection; trace {args.trace_seconds} s\n")
        print("| target | req/s | wrk p50 / p99 ms | party | wake-ups per req | sch delay p50 / p99 / max ms "
              "| run per wake-up p50 / p99 ms | CPU µs/req |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, port, host, parties in targets:
            conns = paced_conns(port, host)
            result = {}
            load = threading.Thread(target=lambda: result.update(
                wrk.run(port, [host], args.seconds, conns=conns, delay_ms=DELAY_MS)))
            load.start()
            time.sleep(1.5)
            events = trace(work, name.replace(" ", "-"), args.trace_seconds)
            load.join()
            requests = result["rps"] * args.trace_seconds
            for i, (party, wakeups, p50, p99, worst, run50, run99, cpu_us) in enumerate(
                    summarize(events, parties, requests)):
                head = (f"| {name} ({conns} conns) | {result['rps']:,.0f} | {result['p50_us'] / 1000:.2f} / "
                        f"{result['p99_us'] / 1000:.2f}" if i == 0 else "| | |")
                print(f"{head} | {party} | {wakeups:.2f} | {p50:.3f} / {p99:.3f} / {worst:.3f} "
                      f"| {run50:.3f} / {run99:.3f} | {cpu_us:.1f} |")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
