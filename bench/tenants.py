#!/usr/bin/env python3
"""The long tail (issue 14, target 2): N active deployments taking turns.

    python3 bench/tenants.py --binary target/release/isocloud [--binary OLD]
        [--variant 'label=--runner-flag value ...'] [--tenants 1,100,1000]
        [--rounds 3] [--seconds 5] [--bare] [--bare-variant 'label=deno flags'] [--bare-workers]

For every binary × variant, one apps-mode runner serves N hello-world apps;
wrk (-t2 -c32) sends each request to the next Host in turn, so with N
tenants every isolate sees one request in N. Printed per target and N:
req/s, the runner's and the isolates' CPU per request, and the isolates'
context switches per request (every thread of every deno). `--bare` adds the
same taking of turns against bare deno processes on unix sockets (no
runner, no harness, no sandbox), driven by a small Python client: its req/s
is the client's, its CPU per request is deno's own. `--bare-workers` adds
the same again against ONE deno process whose main module spawns N module
Workers, each with its own narrowed permissions (read and write of its own
directory, net only for its own socket, no env/run/ffi/sys) serving the same
handler on its own unix socket: what a cordon mode (deployments of one owner
sharing a process) would cost, measured before one is built. With only bare
targets asked for and no `--binary`, no runner is started. Targets are
measured round by round, interleaved, so a noisy machine shifts them
together.
"""
import argparse
import json
import os
import selectors
import shlex
import socket
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (CLK_TCK, DENO, HANDLER, ROOT, Procs, Runner, Wrk, cpu_ticks,  # noqa: E402
                    deno_on_socket, ensure_wrk, get, log, med, private_kib, read_stat)


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
    IN_FLIGHT = 32

    def __init__(self, procs, work, apps, n, deno_flags=(), label="bare"):
        self.procs = []
        for i in range(n):
            deno_dir = os.path.join(work, f"{label}{n}", str(i))
            path = os.path.join(deno_dir, "s.sock")
            self.procs.append((deno_on_socket(procs, os.path.join(apps, f"t{i}"), deno_dir, path, deno_flags), path))
        self.connect([path for _, path in self.procs])

    def private_kib_per_isolate(self):
        return med([k for k in (private_kib(p) for p in self.pids()) if k is not None])

    def connect(self, paths):
        """Connections taken in turn, each answered once: one per socket, or
        with fewer than 32 sockets as many per socket as make 32 in flight
        (as wrk's 32 connections to one tenant), so that 1 tenant is not
        held to one request at a time."""
        self.conns = []
        for _ in range(max(1, self.IN_FLIGHT // len(paths))):
            for path in paths:
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

    def run(self, seconds, in_flight=IN_FLIGHT):
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


# The cordon's main module: waits for a line on stdin (so the process can be
# measured with no worker), then spawns one module Worker per directory, each
# allowed only its own directory and its own socket.
WORKERS_MAIN = """const dirs = JSON.parse(Deno.readTextFileSync(Deno.args[0]));
console.log("ready");
await Deno.stdin.read(new Uint8Array(64));
for (const dir of dirs) {
  new Worker(new URL(`file://${dir}/socket_main.ts`), { type: "module", deno: { permissions: {
    read: [dir], write: [dir], net: [`unix:${dir}/s.sock`],
    env: false, run: false, ffi: false, sys: false, import: false } } });
}
"""


class BareWorkers(Bare):
    """One deno process serving N tenants' handlers, each in its own module
    Worker (own V8 isolate and thread, own permissions) on its own unix
    socket: a cordon mode's cost without a runner. The handler is rewritten
    to a socket exactly as `common.deno_on_socket` does."""

    def __init__(self, procs, work, apps, n):
        root = os.path.join(work, f"workers{n}")
        dirs, paths = [], []
        for i in range(n):
            d = os.path.join(root, str(i))
            os.makedirs(d)
            path = os.path.join(d, "s.sock")
            source = open(os.path.join(apps, f"t{i}", "main.ts")).read()
            with open(os.path.join(d, "socket_main.ts"), "w") as f:
                f.write(source.replace('{ port: Number(Deno.env.get("PORT") ?? 8000), onListen() {} }',
                                       f"{{ path: {json.dumps(path)}, onListen() {{}} }}"))
            dirs.append(d)
            paths.append(path)
        with open(os.path.join(root, "dirs.json"), "w") as f:
            json.dump(dirs, f)
        with open(os.path.join(root, "main.ts"), "w") as f:
            f.write(WORKERS_MAIN)
        self.proc = procs.start(
            [DENO, "run", "--no-config", "--unstable-worker-options", "-A", os.path.join(root, "main.ts"),
             os.path.join(root, "dirs.json")],
            env={"DENO_DIR": os.path.join(root, "deno_dir"), "NO_COLOR": "1"},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if self.proc.stdout.readline().strip() != b"ready":
            raise SystemExit("the workers' main module did not start")
        time.sleep(2)
        self.baseline_kib = private_kib(self.proc.pid)
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        deadline = time.time() + 60 + n * 0.2
        for path in paths:
            while not os.path.exists(path):
                if time.time() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"the worker for {path} did not listen")
                time.sleep(0.05)
        self.procs = [(self.proc, path) for path in paths]
        self.n = n
        self.connect(paths)

    def pids(self):
        return [self.proc.pid]

    def private_kib_per_isolate(self):
        return (private_kib(self.proc.pid) - self.baseline_kib) / self.n

    def thread_ticks(self):
        """(ticks of the `worker-N` threads, ticks of every thread): how
        much of the process's CPU a runner could attribute to one worker by
        its thread."""
        workers = total = 0
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            stat = read_stat(f"/proc/{self.proc.pid}/task/{tid}/stat")
            if stat is None:
                continue
            comm, rest = stat
            ticks = int(rest[11]) + int(rest[12])
            total += ticks
            if comm.startswith("worker-"):
                workers += ticks
        return workers, total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", action="append", default=[])
    ap.add_argument("--variant", action="append", default=[],
                    help="label=extra runner flags (applied to every --binary)")
    ap.add_argument("--tenants", default="1,100,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--bare", action="store_true", help="also N bare deno processes (one per tenant)")
    ap.add_argument("--bare-variant", action="append", default=[],
                    help="label=deno flags: also N bare deno processes started with these flags "
                    "(e.g. 'stgc=--v8-flags=--single-threaded-gc'), beside --bare")
    ap.add_argument("--bare-workers", action="store_true",
                    help="also one deno process with N module Workers (a cordon mode's cost)")
    ap.add_argument("--handler", help="a main.ts for every tenant instead of the hello-world one "
                    "(it must serve with Deno.serve on PORT; with --bare, with the hello-world one's options literally, "
                    "which common.deno_on_socket rewrites to a socket)")
    args = ap.parse_args()
    only_bare = (args.bare or args.bare_variant or args.bare_workers) and not args.binary and not args.variant
    binaries = [] if only_bare else args.binary or [os.path.join(ROOT, "target/release/isocloud")]
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
    memory = {}  # (target, n) -> (private KiB per isolate, isolates, how)
    attributed = {}  # n -> [share of the workers' process CPU on `worker-N` threads, per round]
    try:
        for n in counts:
            targets = []
            for b, binary in enumerate(binaries):
                for label, flags in variants:
                    name = f"{os.path.basename(binary)}#{b} {label}" if len(binaries) > 1 else label
                    runner = Runner(procs, binary, apps, os.path.join(work, f"state-{n}-{b}-{label}"), n + 20,
                                    extra=shlex.split(flags))
                    targets.append((name, runner))
            log(f"{n} tenants: booting")
            bares = []
            if args.bare:
                bares.append(("bare deno", Bare(procs, work, apps, n)))
            for label, flags in (v.split("=", 1) for v in args.bare_variant):
                bares.append((f"bare deno {label}", Bare(procs, work, apps, n, shlex.split(flags), f"bare-{label}-")))
            if args.bare_workers:
                bares.append(("bare workers", BareWorkers(procs, work, apps, n)))
            for name, runner in targets:
                for i in range(n):
                    get(runner.port, f"t{i}.localhost")
            time.sleep(2)
            for name, runner in targets:
                kib = [k for k in (private_kib(p) for p in runner.isolates()) if k is not None]
                memory[(name, n)] = (med(kib), len(kib), "median over isolates")
            for name, bare in bares:
                how = ("(process − the same process with 0 workers) / N" if isinstance(bare, BareWorkers)
                       else "median over processes")
                memory[(name, n)] = (bare.private_kib_per_isolate(), n, how)
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
                for name, bare in bares:
                    pids = bare.pids()
                    before = {p: cpu_ticks(p) for p in pids}
                    switches = context_switches(pids)
                    threads = bare.thread_ticks() if isinstance(bare, BareWorkers) else None
                    res = bare.run(args.seconds)
                    cpu = sum(cpu_ticks(p) - before[p] for p in pids) / CLK_TCK
                    if threads:
                        workers, total = (b - a for a, b in zip(threads, bare.thread_ticks()))
                        attributed.setdefault(n, []).append(workers / total if total else float("nan"))
                    results.setdefault((name, n), []).append({
                        "rps": res["rps"], "runner_us": 0.0,
                        "isolates_us": cpu / res["requests"] * 1e6,
                        "switches": (context_switches(pids) - switches) / res["requests"], "errors": 0,
                    })
            for _, runner in targets:
                procs.stop(runner.proc)
            for _, bare in bares:
                for p in {p for p, _ in bare.procs}:
                    procs.stop(p)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(wrk.work, ignore_errors=True)
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
    print("| target | tenants | isolates | private MiB per isolate | how |")
    print("| --- | --- | --- | --- | --- |")
    for (name, n), (kib, count, how) in memory.items():
        print(f"| {name} | {n} | {count} | {kib / 1024:.1f} | {how} |")
    if attributed:
        print("\nShare of the workers' process CPU spent on the `worker-N` threads themselves (what a runner "
              "could attribute per worker by thread; the rest is the main thread, tokio and V8 platform threads)\n")
        print("| tenants | share (median of rounds) |")
        print("| --- | --- |")
        for n, shares in attributed.items():
            print(f"| {n} | {med(shares):.0%} |")


if __name__ == "__main__":
    main()
