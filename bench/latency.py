#!/usr/bin/env python3
"""Cold start and warm latency through the isocloud runner, side by side with
the same handler served by deno directly. Loopback only; stops by itself.

    python3 bench/latency.py [--cold N] [--warm N] [--binary PATH] [--runner-arg=ARG ...]

`--runner-arg` passes one argument on to `isocloud serve` (repeatable), e.g.
the cost of the sandbox on cold starts, with and without it:

    python3 bench/latency.py --cold 20 --warm 200
    python3 bench/latency.py --cold 20 --warm 200 --runner-arg=--landlock=off \
        --runner-arg=--seccomp=off --runner-arg=--rlimits=off --runner-arg=--isolate-uid=off

Prints medians and p99 in milliseconds. Build first: cargo build --release.
"""
import argparse
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from common import DENO, HANDLER, ROOT, free_port, percentile, start_apps_runner


def get(conn, host, path="/"):
    start = time.perf_counter()
    conn.request("GET", path, headers={"Host": host})
    response = conn.getresponse()
    body = response.read()
    elapsed = (time.perf_counter() - start) * 1000
    if response.status != 200:
        raise SystemExit(f"unexpected {response.status} from {host}: {body[:200]!r}")
    return elapsed


def warm(port, host, n):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(min(200, n)):
        get(conn, host)
    samples = [get(conn, host) for _ in range(n)]
    conn.close()
    return samples


def wait_listening(port, deadline_s=10):
    end = time.time() + deadline_s
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.005)
    raise SystemExit(f"nothing listens on {port}")


def bare_deno_start(app_dir, n):
    """deno run of the same code, process start to first response."""
    samples = []
    for _ in range(n):
        port = free_port()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [DENO, "run", "--no-config", "--allow-net", "--allow-env", os.path.join(app_dir, "main.ts")],
            env={"PORT": str(port), "DENO_DIR": os.path.join(app_dir, ".deno"), "NO_COLOR": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/")
                conn.getresponse().read()
                break
            except OSError:
                time.sleep(0.001)
        samples.append((time.perf_counter() - start) * 1000)
        proc.kill()
        proc.wait()
    return samples


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cold", type=int, default=40, help="deployments never seen, one request each")
    parser.add_argument("--warm", type=int, default=3000, help="sequential keep-alive requests")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    parser.add_argument("--runner-arg", action="append", default=[], metavar="ARG",
                        help="an extra argument for `isocloud serve` (repeatable; write --runner-arg=--flag=value)")
    args = parser.parse_args()
    if not os.path.exists(args.binary):
        raise SystemExit(f"{args.binary} is missing: run `cargo build --release` first")

    work = tempfile.mkdtemp(prefix="isocloud-bench-")
    apps = os.path.join(work, "apps")
    for i in range(args.cold + 1):
        os.makedirs(os.path.join(apps, f"app{i}"))
        with open(os.path.join(apps, f"app{i}", "main.ts"), "w") as f:
            f.write(HANDLER)

    runner, port = start_apps_runner(args.binary, apps, os.path.join(work, "state"), args.runner_arg)
    try:

        # Cold: first request to a deployment never seen (origin on the same
        # machine: the apps folder), one fresh connection each.
        cold = []
        for i in range(1, args.cold + 1):
            conn = http.client.HTTPConnection("127.0.0.1", port)
            cold.append(get(conn, f"app{i}.localhost"))
            conn.close()
        through_runner = warm(port, "app0.localhost", args.warm)

        direct_port = free_port()
        direct = subprocess.Popen(
            [DENO, "run", "--no-config", "--allow-net", "--allow-env", os.path.join(apps, "app0", "main.ts")],
            env={"PORT": str(direct_port), "DENO_DIR": os.path.join(work, "deno-direct"), "NO_COLOR": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(direct_port)
            straight = warm(direct_port, "localhost", args.warm)
        finally:
            direct.kill()
            direct.wait()
        bare = bare_deno_start(os.path.join(apps, "app0"), min(args.cold, 20))
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("cold start through runner (never-seen deployment)", cold),
        ("bare `deno run` start to first response", bare),
        ("warm request through runner (keep-alive)", through_runner),
        ("warm request straight to deno (keep-alive)", straight),
    ]
    print(f"{'figure':<52} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}")
    for name, samples in rows:
        print(f"{name:<52} {len(samples):>5} {statistics.median(samples):>8.3f} {percentile(samples, 99):>8.3f}")
    added = statistics.median(through_runner) - statistics.median(straight)
    print(f"runner adds {added:.3f} ms at the median to a warm request")


if __name__ == "__main__":
    sys.exit(main())
