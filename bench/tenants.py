#!/usr/bin/env python3
"""The long tail (issue 14, target 2): N active deployments taking turns.

    python3 bench/tenants.py --binary target/release/isocloud [--binary OLD]
        [--variant 'label=--runner-flag value ...'] [--tenants 1,100,1000]
        [--rounds 3] [--seconds 5] [--bare]

For every binary × variant, one apps-mode runner serves N hello-world apps;
wrk (-t2 -c32) sends each request to the next Host in turn, so with N
tenants every isolate sees one request in N. Printed per target and N:
req/s, the runner's and the isolates' CPU per request, and the isolates'
context switches per request (every thread of every deno). `--bare` adds the
same taking of turns against bare deno processes on unix sockets (no
runner, no harness, no sandbox), driven by a small Python client: its req/s
is the client's, its CPU per request is deno's own. Targets are measured
round by round, interleaved, so a noisy machine shifts them together.
"""
import argparse
import os
import selectors
import shlex
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (CLK_TCK, HANDLER, ROOT, Procs, Runner, Wrk, cpu_ticks, deno_on_socket,  # noqa: E402
                    ensure_wrk, get, log, med, private_kib)


def context_switches(pids):
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if "ctxt_switches" in line:
                            total += int(line.split()[1])
        except OSError:
            pass
    return total


class Bare:
    """N bare deno processes, each serving tenant `t{i}`'s handler on a
    unix socket (`common.deno_on_socket`, as behind the proxy hops)."""
    REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    def __init__(self, procs, work, apps, n):
        self.procs = []
        for i in range(n):
            deno_dir = os.path.join(work, f"bare{n}", str(i))
            path = os.path.join(deno_dir, "s.sock")
            self.procs.append((deno_on_socket(procs, os.path.join(apps, f"t{i}"), deno_dir, path), path))
        self.conns = []
        for _, path in self.procs:
            c = socket.socket(socket.AF_UNIX)
            c.connect(path)
            self.conns.append(c)
        for c in self.conns:
            c.sendall(self.REQUEST)
            buf = b""
            while not buf.endswith(b"Hello, world!"):
                buf += c.recv(4096)
            c.setblocking(False)

    def pids(self):
        return [p.pid for p, _ in self.procs]

    def run(self, seconds, in_flight=32):
        sel = selectors.DefaultSelector()
        for i, c in enumerate(self.conns):
            sel.register(c, selectors.EVENT_READ, i)
        bufs = [b""] * len(self.conns)
        busy = set()
        nxt = 0
        done = 0
        start = time.time()

        def receive(timeout):
            nonlocal done
            for key, _ in sel.select(timeout):
                i = key.data
                bufs[i] += self.conns[i].recv(4096)
                if bufs[i].endswith(b"Hello, world!"):
                    bufs[i] = b""
                    busy.discard(i)
                    done += 1
        while time.time() - start < seconds:
            while len(busy) < min(in_flight, len(self.conns)):
                while nxt in busy:
                    nxt = (nxt + 1) % len(self.conns)
                self.conns[nxt].send(self.REQUEST)
                busy.add(nxt)
                nxt = (nxt + 1) % len(self.conns)
            receive(1)
        elapsed = time.time() - start
        while busy:
            receive(1)
        sel.close()
        return {"requests": done, "rps": done / elapsed}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append", default=[])
    ap.add_argument("--variant", action="append", default=[],
                    help="label=extra runner flags (applied to every --binary)")
    ap.add_argument("--tenants", default="1,100,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--bare", action="store_true")
    ap.add_argument("--handler", help="a main.ts for every tenant instead of the hello-world one "
                    "(it must serve with Deno.serve on PORT; with --bare, with the hello-world one's options literally, "
                    "which common.deno_on_socket rewrites to a socket)")
    args = ap.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "target/release/isocloud")]
    variants = [v.split("=", 1) for v in args.variant] or [["defaults", ""]]
    counts = [int(n) for n in args.tenants.split(",")]
    wrk = Wrk(ensure_wrk(), tempfile.mkdtemp(prefix="isocloud-tenants-wrk-"))
    work = tempfile.mkdtemp(prefix="isocloud-tenants-")
    apps = os.path.join(work, "apps")
    for i in range(max(counts)):
        os.makedirs(os.path.join(apps, f"t{i}"))
        with open(os.path.join(apps, f"t{i}", "main.ts"), "w") as f:
            f.write(open(args.handler).read() if args.handler else HANDLER)
    procs = Procs()
    results = {}  # (target, n) -> [round figures]
    memory = {}  # (target, n) -> (median private KiB per isolate, isolates)
    try:
        for n in counts:
            targets = []
            for b, binary in enumerate(binaries):
                for label, flags in variants:
                    name = f"{os.path.basename(binary)}#{b} {label}" if len(binaries) > 1 else label
                    runner = Runner(procs, binary, apps, os.path.join(work, f"state-{n}-{b}-{label}"), n + 20,
                                    extra=shlex.split(flags))
                    targets.append((name, runner))
            bare = Bare(procs, work, apps, n) if args.bare else None
            log(f"{n} tenants: booting")
            for name, runner in targets:
                for i in range(n):
                    get(runner.port, f"t{i}.localhost")
            time.sleep(2)
            for name, runner in targets:
                kib = [k for k in (private_kib(p) for p in runner.isolates()) if k is not None]
                memory[(name, n)] = (med(kib), len(kib))
            hosts = [f"t{i}.localhost" for i in range(n)]
            for r in range(args.rounds):
                for name, runner in targets:
                    isolates = runner.isolates()
                    switches = context_switches(isolates)
                    res = wrk.run(runner.port, hosts, args.seconds, watch=[runner.proc.pid, *isolates])
                    switches = context_switches(isolates) - switches
                    results.setdefault((name, n), []).append({
                        "rps": res["rps"],
                        "runner_us": res["cpu_s"][runner.proc.pid] / res["requests"] * 1e6,
                        "isolates_us": sum(res["cpu_s"][p] for p in isolates) / res["requests"] * 1e6,
                        "switches": switches / res["requests"],
                        "errors": res["errors"] + res["status_errors"],
                    })
                if bare:
                    pids = bare.pids()
                    before = {p: cpu_ticks(p) for p in pids}
                    switches = context_switches(pids)
                    res = bare.run(args.seconds)
                    cpu = sum(cpu_ticks(p) - before[p] for p in pids) / CLK_TCK
                    results.setdefault(("bare deno", n), []).append({
                        "rps": res["rps"], "runner_us": 0.0,
                        "isolates_us": cpu / res["requests"] * 1e6,
                        "switches": (context_switches(pids) - switches) / res["requests"], "errors": 0,
                    })
            for _, runner in targets:
                procs.stop(runner.proc)
            if bare:
                for p, _ in bare.procs:
                    procs.stop(p)
    finally:
        procs.stop_all()
    print(f"\n{args.rounds} rounds × {args.seconds:g} s, wrk -t2 -c32 rotating Host; medians over rounds\n")
    print("| target | tenants | req/s | vs 1 tenant | runner CPU µs/req | isolates' CPU µs/req "
          "| isolates' context switches/req | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, n), rounds in results.items():
        one = results.get((name, 1))
        ratio = f"{med([x['rps'] for x in rounds]) / med([x['rps'] for x in one]):.2f}×" if one else "–"
        print(f"| {name} | {n} | {med([x['rps'] for x in rounds]):,.0f} | {ratio} "
              f"| {med([x['runner_us'] for x in rounds]):.1f} | {med([x['isolates_us'] for x in rounds]):.1f} "
              f"| {med([x['switches'] for x in rounds]):.2f} | {sum(x['errors'] for x in rounds)} |")


    print("\nPrivate memory per isolate once every tenant has served one request and idled 2 s "
          "(Private_Clean + Private_Dirty of /proc/PID/smaps_rollup; the runner's pre-started isolates included)\n")
    print("| target | tenants | isolates | private MiB per isolate (median) |")
    print("| --- | --- | --- | --- |")
    for (name, n), (kib, count) in memory.items():
        print(f"| {name} | {n} | {count} | {kib / 1024:.1f} |")


if __name__ == "__main__":
    main()
