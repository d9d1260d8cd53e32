#!/usr/bin/env python3
"""A subhoster's relay in front of the runner: HTTP/1.1 keep-alive
connections against h2c (HTTP/2 with prior knowledge) streams multiplexed on
a few connections, both driven by h2load (Debian `nghttp2-client`) so the
load generator is the same program. Every request carries its relay token
(`x-deno-subhost`, HS256); the deployment is a hello-world ESZIP served by a
subhoster's origin (bench/subhost.py).

    python3 bench/relay.py [--binary A --binary B] [--seconds 10] [--rounds 3] [--concurrency 32]

Per binary and protocol: median req/s, p50/p99 latency, and the CPU per
request of the runner and of the isolate, over `--rounds` alternating runs.
See docs/benchmarks.md.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CLK_TCK, Procs, ROOT, cpu_ticks, descendants, percentile  # noqa: E402
from subhost import Origin, build_eszip, start_subhost_runner, subhost_get, token  # noqa: E402

HELLO = 'Deno.serve(() => new Response("Hello, world!"));\n'


def ensure_h2load():
    if shutil.which("h2load"):
        return shutil.which("h2load")
    if os.geteuid() == 0 and shutil.which("apt-get"):
        if subprocess.call(["apt-get", "install", "-y", "nghttp2-client"], stdout=subprocess.DEVNULL) != 0:
            subprocess.call(["apt-get", "update"], stdout=subprocess.DEVNULL)
            subprocess.check_call(["apt-get", "install", "-y", "nghttp2-client"], stdout=subprocess.DEVNULL)
        return shutil.which("h2load")
    raise SystemExit("h2load is missing: sudo apt-get install -y nghttp2-client (or run bench/install.sh)")


def h2load(binary, port, deployment_id, seconds, conns, streams, h1, work, watch):
    """One h2load run; req/s, p50/p99 ms, and CPU seconds of each pid in `watch`."""
    log_file = os.path.join(work, "h2load.log")
    argv = [binary, "-t", "1", "-c", str(conns), "-m", str(streams), "-D", str(seconds), "--warm-up-time", "1",
            "-H", f"x-deno-subhost: {token(deployment_id)}", "--log-file", log_file,
            f"http://127.0.0.1:{port}/"]
    if h1:
        argv.insert(1, "--h1")
    if os.path.exists(log_file):
        os.remove(log_file)  # h2load appends
    before = {pid: cpu_ticks(pid) for pid in watch}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    after = {pid: cpu_ticks(pid) for pid in watch}
    if out.returncode != 0:
        raise RuntimeError(f"h2load failed: {out.stdout}\n{out.stderr}")
    durations, failed = [], 0
    with open(log_file) as f:
        for line in f:
            _, status, duration_us = line.split("\t")[:3]
            if status != "200":
                failed += 1
            durations.append(int(duration_us) / 1000)
    if failed:
        raise RuntimeError(f"{failed} requests failed: {out.stdout}")
    return {
        "rps": len(durations) / seconds,
        "p50": statistics.median(durations),
        "p99": percentile(durations, 99),
        "cpu_s": {pid: (after[pid] - before[pid]) / CLK_TCK for pid in watch},
    }


def measure(procs, binaries, origin, work, seconds, rounds, concurrency=32, h2_connections=2):
    """Each binary on its own subhosting runner serving a hello-world ESZIP
    from `origin`; `rounds` alternating h2load runs per binary and protocol.
    Returns {(binary index, "HTTP/1.1" | "h2c"): medians of req/s, p50, p99
    (ms), runner_us and isolate_us (CPU per request)}; stops its runners."""
    h2load_bin = ensure_h2load()
    src = os.path.join(work, "relay-src")
    os.makedirs(src)
    with open(os.path.join(src, "main.ts"), "w") as f:
        f.write(HELLO)
    origin.layers["hello"] = build_eszip(src, "main.ts", os.path.join(work, "hello.eszip"))
    origin.deployments["hello"] = "hello"
    runners = []
    for k, binary in enumerate(binaries):
        proc, port = start_subhost_runner(binary, origin, os.path.join(work, f"state-relay{k}"), spawn=procs.start,
                                          extra=["--cpu-limit-ms", "1000"])
        subhost_get(port, "hello")
        runners.append((proc, port))
    modes = [("HTTP/1.1", True, concurrency, 1), ("h2c", False, h2_connections, concurrency // h2_connections)]
    samples = {(k, mode[0]): [] for k in range(len(binaries)) for mode in modes}
    for _ in range(rounds):
        for k, (proc, port) in enumerate(runners):
            isolates = [pid for pid, comm in descendants(proc.pid) if comm == "deno"]
            for label, h1, conns, streams in modes:
                r = h2load(h2load_bin, port, "hello", seconds, conns, streams, h1, work, [proc.pid, *isolates])
                requests = r["rps"] * seconds
                r["runner_us"] = r["cpu_s"][proc.pid] / requests * 1e6
                r["isolate_us"] = sum(r["cpu_s"][pid] for pid in isolates) / requests * 1e6
                samples[(k, label)].append(r)
                time.sleep(1)
    for proc, _ in runners:
        procs.stop(proc)
    return {key: {figure: statistics.median(r[figure] for r in runs)
                  for figure in ("rps", "p50", "p99", "runner_us", "isolate_us")}
            for key, runs in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", action="append", help="a runner binary (repeat to compare)")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--h2-connections", type=int, default=2, help="h2c connections the streams share")
    args = parser.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "target/release/isocloud")]
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-relay-")
    origin = Origin()
    try:
        medians = measure(procs, binaries, origin, work, args.seconds, args.rounds, args.concurrency,
                          args.h2_connections)
        print(f"\nrelay → runner, hello-world ESZIP, {args.concurrency} requests in flight (HTTP/1.1: as many "
              f"connections; h2c: {args.h2_connections} connections), h2load, {args.rounds} × {args.seconds} s, "
              "medians\n")
        print("| runner | protocol | req/s | p50 ms | p99 ms | runner CPU µs/req | isolate CPU µs/req |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for (k, label), m in medians.items():
            print(f"| {k}: {os.path.relpath(binaries[k], ROOT)} | {label} | {m['rps']:,.0f} | {m['p50']:.2f} "
                  f"| {m['p99']:.2f} | {m['runner_us']:.1f} | {m['isolate_us']:.1f} |")
    finally:
        procs.stop_all()
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
