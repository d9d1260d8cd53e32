#!/usr/bin/env python3
"""How long after the CPU limit a runaway `while (true) {}` handler dies.

    python3 bench/cpu_limit.py [--runs 20] [--cpu-limit-ms 50] [--binary PATH]

Each run boots a fresh deployment, warms it with one request, then sends a
request whose handler never returns, and measures the wall time until the
runner answers 502 CPU_TIME_LIMIT. The loop burns one core, so its CPU time
is close to the wall time; the figure printed is the time past the limit.
Loopback only; stops by itself.
"""
import argparse
import http.client
import os
import shutil
import signal
import statistics
import tempfile
import time

from common import ROOT, start_apps_runner

APP = 'Deno.serve((req) => { if (new URL(req.url).pathname === "/loop") { while (true) {} } return new Response("ok"); });\n'


def request(port, host, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    conn.request("GET", path, headers={"Host": host})
    response = conn.getresponse()
    response.read()
    return response.status, response.getheader("x-isocloud-error"), (time.perf_counter() - start) * 1000


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--cpu-limit-ms", type=int, default=50)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="isocloud-cpu-bench-")
    apps = os.path.join(work, "apps")
    for i in range(args.runs):
        os.makedirs(os.path.join(apps, f"loop{i}"))
        with open(os.path.join(apps, f"loop{i}", "main.ts"), "w") as f:
            f.write(APP)
    runner, port = start_apps_runner(
        args.binary, apps, os.path.join(work, "state"), ["--cpu-limit-ms", str(args.cpu_limit_ms)])
    past_limit = []
    try:
        for i in range(args.runs):
            host = f"loop{i}.localhost"
            status, _, _ = request(port, host, "/")
            assert status == 200, status
            status, code, elapsed = request(port, host, "/loop")
            if status != 502 or code != "CPU_TIME_LIMIT":
                raise SystemExit(f"run {i}: expected 502 CPU_TIME_LIMIT, got {status} {code}")
            past_limit.append(elapsed - args.cpu_limit_ms)
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"cpu limit {args.cpu_limit_ms} ms, {len(past_limit)} runaway loops")
    print(f"killed after the limit: median {statistics.median(past_limit):.1f} ms, max {max(past_limit):.1f} ms")


if __name__ == "__main__":
    main()
