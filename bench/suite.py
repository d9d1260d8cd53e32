#!/usr/bin/env python3
"""The one-command benchmark suite of the performance issue (issue 5).

    python3 bench/suite.py [--quick] [--profile] [--binary PATH] [--out bench/results/latest.md]

Every figure is measured in the same run next to its reference, on loopback
only, and the script stops by itself and kills everything it started. It
prints one Markdown table and writes it to bench/results/latest.md.

Needs: the release binary (cargo build --release -p isocloud), the pinned deno
(./scripts/install-deno), wrk and h2load (Debian packages wrk and
nghttp2-client; installed here when root), node and npm (workerd is installed
from bench/package-lock.json into bench/node_modules with `npm ci --prefix
bench`, @deno/eszip into tools/eszip). See docs/benchmarks.md.
"""
import argparse
import concurrent.futures
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import eszip_boot
import relay as relay_bench
from common import (CLK_TCK, DENO, HANDLER, PRESTARTED, ROOT, Procs, Runner, Wrk, cpu_ticks, deno_direct,
                    ensure_wrk, first_response, free_port, get, log, med, percentile, private_kib)
from subhost import Origin

BENCH = os.path.dirname(os.path.abspath(__file__))
WORKER = 'export default { fetch() { return new Response("Hello, world!"); } };\n'
# The gap between paced cold starts: about what one pre-started isolate's
# refill takes.
COLD_GAP_S = 0.15


# ---------------------------------------------------------------- tools

def ensure_workerd():
    def find():
        base = os.path.join(BENCH, "node_modules", "@cloudflare")
        if os.path.isdir(base):
            for d in sorted(os.listdir(base)):
                candidate = os.path.join(base, d, "bin", "workerd")
                if d.startswith("workerd-") and os.access(candidate, os.X_OK):
                    return candidate
        return None

    found = find()
    if found:
        return found
    log("installing workerd (npm ci --prefix bench)")
    # npm ci wants every platform package of workerd's optionalDependencies
    # in the lock; a registry mirror without the darwin/windows ones makes it
    # refuse, so fall back to npm install, which still follows the lock and
    # the exact pin of package.json
    if subprocess.call(["npm", "ci", "--prefix", BENCH, "--no-audit", "--no-fund"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) != 0:
        subprocess.check_call(["npm", "install", "--prefix", BENCH, "--no-audit", "--no-fund"],
                              stdout=subprocess.DEVNULL)
    found = find()
    if not found:
        raise SystemExit("workerd binary not found under bench/node_modules/@cloudflare/*/bin")
    return found


# ---------------------------------------------------------------- targets

def deno_fleet(procs, app_dir, work, n, seconds):
    """`n` bare deno processes serving the same handler; one client sends
    sequential requests round-robin over one keep-alive connection to each.
    Returns deno's CPU per request (all n processes) and the request rate."""
    fleet = [deno_direct(procs, app_dir, os.path.join(work, "deno-fleet")) for _ in range(n)]
    try:
        for _, port in fleet:
            first_response(port)
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _, port in fleet]

        def one(conn):
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"deno answered {response.status}")

        for conn in conns:
            one(conn)
        before = sum(cpu_ticks(p.pid) for p, _ in fleet)
        start, served = time.time(), 0
        while time.time() - start < seconds:
            for conn in conns:
                one(conn)
            served += len(conns)
        elapsed = time.time() - start
        used = sum(cpu_ticks(p.pid) for p, _ in fleet) - before
        for conn in conns:
            conn.close()
        return {"us": used / CLK_TCK / served * 1e6, "rps": served / elapsed}
    finally:
        for p, _ in fleet:
            procs.stop(p, sig=signal.SIGKILL)


def workerd_config(work, port):
    path = os.path.join(work, f"workerd-{port}.capnp")
    with open(path, "w") as f:
        f.write(f"""using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [ (name = "main", worker = .hello) ],
  sockets = [ (name = "http", address = "127.0.0.1:{port}", http = (), service = "main") ],
);
const hello :Workerd.Worker = (
  modules = [ (name = "worker.js", esModule = embed "worker.js") ],
  compatibilityDate = "2024-09-01",
);
""")
    return path


def workerd_start(procs, binary, work):
    port = free_port()
    p = procs.start([binary, "serve", workerd_config(work, port)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, port


def profile_runner(wrk, runner, work, seconds, out):
    """perf record of the runner process (all threads, call graphs) during a
    warm wrk run at saturation; the top of the report goes to `out`."""
    if not shutil.which("perf"):
        log("--profile: perf is missing (apt-get install linux-perf); skipped")
        return
    log("profiling the runner under load")
    data = os.path.join(work, "perf.data")
    perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-p", str(runner.proc.pid), "-o", data],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        res = wrk.run(runner.port, ["t0.localhost"], seconds)
    finally:
        os.killpg(perf.pid, signal.SIGINT)
        perf.wait(timeout=60)
    report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                             "--sort", "dso,sym", "--percent-limit", "0.7"],
                            capture_output=True, text=True).stdout
    lines = [l for l in report.splitlines() if l.strip() and not l.startswith("#")]
    by_dso = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                             "--sort", "dso", "--percent-limit", "0.5"],
                            capture_output=True, text=True).stdout
    dso_lines = [l for l in by_dso.splitlines() if l.strip() and not l.startswith("#")]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(f"perf record -F 499 -g of the runner during wrk -t2 -c32 -d{seconds}s "
                f"({res['rps']:,.0f} req/s), self time by dso/symbol:\n\n")
        f.write("\n".join(dso_lines[:10]) + "\n\n")
        f.write("\n".join(lines[:40]) + "\n")
    log(f"wrote {out}")


# ---------------------------------------------------------------- the suite

def fmt_ms(x):
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def dist(samples):
    return f"p50 {fmt_ms(med(samples))} ms, p99 {fmt_ms(percentile(samples, 99))} ms (n={len(samples)})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small version (a couple of minutes)")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    parser.add_argument("--out", default=os.path.join(BENCH, "results", "latest.md"))
    parser.add_argument("--profile", action="store_true",
                        help="also record the runner with `perf record -g` during one extra warm wrk run "
                             "and write the top of `perf report` next to --out (profile.txt)")
    args = parser.parse_args()
    q = args.quick
    cfg = {
        "seconds": 3 if q else 10,
        "rounds": 2 if q else 5,
        "cold": 10 if q else 40,
        "burst": 10 if q else 20,
        "bare": 10 if q else 20,
        "per_size": 3 if q else 10,
        "tenants": [1, 10, 100] if q else [1, 10, 100, 1000],
        "tenant_rounds": 1 if q else 3,
        "fleet_seconds": 3 if q else 6,
    }
    if not os.path.exists(args.binary):
        raise SystemExit(f"{args.binary} is missing: cargo build --release -p isocloud")
    if not os.path.exists(DENO):
        raise SystemExit(f"{DENO} is missing: ./scripts/install-deno")
    wrk_bin = ensure_wrk()
    workerd_bin = ensure_workerd()
    started = time.time()

    work = tempfile.mkdtemp(prefix="isocloud-suite-")
    procs = Procs()
    rows = []  # (figure, isocloud, reference, notes)
    raw = {}
    try:
        wrk = Wrk(wrk_bin, work)
        apps = os.path.join(work, "apps")
        max_tenants = max(cfg["tenants"])
        # hello apps t0..t{N-1} (the tenants; t0 is the warm one), cold apps c*
        for i in range(max_tenants):
            os.makedirs(os.path.join(apps, f"t{i}"))
            with open(os.path.join(apps, f"t{i}", "main.ts"), "w") as f:
                f.write(HANDLER)
        for name in [f"c{i}" for i in range(cfg["cold"])] + [f"b{i}" for i in range(cfg["burst"])]:
            os.makedirs(os.path.join(apps, name))
            with open(os.path.join(apps, name, "main.ts"), "w") as f:
                f.write(HANDLER)
        with open(os.path.join(work, "worker.js"), "w") as f:
            f.write(WORKER)

        runner = Runner(procs, args.binary, apps, os.path.join(work, "state"), max_tenants + 100)
        log(f"runner on 127.0.0.1:{runner.port} (pid {runner.proc.pid})")

        # ---- 2. cold start (first, while the machine is quiet), on a runner
        # of its own whose isolates idle out after a second: a first request
        # to a deployment never seen, then, once its isolate is gone, a
        # first request to it again (cached: its layers and deno cache dir
        # are on the runner). Paced COLD_GAP_S apart, an arrival rate the
        # pre-started pool refills for; then a burst, back to back, where the
        # pool runs dry and boots start their own process.
        log("cold starts")
        cold_runner = Runner(procs, args.binary, apps, os.path.join(work, "state-cold"), max_tenants + 100,
                             idle_timeout_s=1)
        time.sleep(1)  # its pre-started isolates
        cold = []
        for i in range(cfg["cold"]):
            cold.append(get(cold_runner.port, f"c{i}.localhost"))
            time.sleep(COLD_GAP_S)
        deadline = time.time() + 30
        while len(cold_runner.isolates()) > PRESTARTED and time.time() < deadline:
            time.sleep(0.2)
        cached = []
        for i in range(cfg["cold"]):
            cached.append(get(cold_runner.port, f"c{i}.localhost"))
            time.sleep(COLD_GAP_S)
        burst = [get(cold_runner.port, f"b{i}.localhost") for i in range(cfg["burst"])]
        procs.stop(cold_runner.proc)
        bare = []
        for i in range(cfg["bare"]):
            start = time.perf_counter()
            p, port = deno_direct(procs, os.path.join(apps, "t0"), os.path.join(work, "deno-bare"))
            first_response(port)
            bare.append((time.perf_counter() - start) * 1000)
            procs.stop(p, signal.SIGKILL)
        wcold = []
        for i in range(cfg["bare"]):
            start = time.perf_counter()
            p, port = workerd_start(procs, workerd_bin, work)
            first_response(port)
            wcold.append((time.perf_counter() - start) * 1000)
            procs.stop(p, signal.SIGKILL)
        raw["cold"] = {"runner": cold, "cached": cached, "burst": burst, "deno": bare, "workerd": wcold}

        # ---- 3. boot time vs code size: ESZIPs from a subhoster's origin
        log("boot vs code size (ESZIP, subhosting mode)")
        origin = Origin()
        try:
            eszips = eszip_boot.build_sizes(work, log=log)
            sizes = eszip_boot.measure(procs, [args.binary], origin, eszips, cfg["per_size"], COLD_GAP_S, work)[0]
            bare_sizes = eszip_boot.bare_deno(procs, work, eszips, cfg["per_size"])
        finally:
            origin.stop()
        raw["code_size"] = {"runner": sizes, "deno": bare_sizes, "bytes": {k: len(v) for k, v in eszips.items()}}

        # ---- 1. warm throughput + 6. runner CPU per request
        log("warm throughput")
        get(runner.port, "t0.localhost")
        # the isolate of t0: the deno child whose CPU moves under load
        dproc, dport = deno_direct(procs, os.path.join(apps, "t0"), os.path.join(work, "deno-direct"))
        first_response(dport)
        wproc, wport = workerd_start(procs, workerd_bin, work)
        first_response(wport)
        warm = {"runner": [], "deno": [], "workerd": []}
        for r in range(cfg["rounds"]):
            probe = runner.isolates()
            res = wrk.run(runner.port, ["t0.localhost"], cfg["seconds"], watch=[runner.proc.pid, *probe])
            busiest = max(probe, key=lambda pid: res["cpu_s"][pid]) if probe else None
            res["runner_cpu_s"] = res["cpu_s"][runner.proc.pid]
            res["isolate_cpu_s"] = res["cpu_s"][busiest] if busiest else float("nan")
            warm["runner"].append(res)
            res = wrk.run(dport, ["localhost"], cfg["seconds"], watch=[dproc.pid])
            res["isolate_cpu_s"] = res["cpu_s"][dproc.pid]
            warm["deno"].append(res)
            warm["workerd"].append(wrk.run(wport, ["localhost"], cfg["seconds"], watch=[wproc.pid]))
        raw["warm"] = warm

        # ---- relay connections: HTTP/1.1 against h2c, subhosting mode
        log("relay → runner: HTTP/1.1 and h2c")
        origin = Origin()
        try:
            relay = {label: figures for (_, label), figures in
                     relay_bench.measure(procs, [args.binary], origin, work, cfg["seconds"], cfg["rounds"]).items()}
        finally:
            origin.stop()
        raw["relay"] = relay

        # p99 at half of saturation: paced connections (each waits D ms after
        # each answer), same rate for runner and deno
        sat = med([x["rps"] for x in warm["runner"]])
        # the pacing leaves each connection at 1 / (delay + latency): calibrate
        # the connection count on the runner with a short run first
        # (each target separately, so that both run at the same rate)
        delay_ms = 4

        def paced_conns(port, host):
            conns = max(2, round(sat / 2 * (delay_ms + 1) / 1000))
            calib = wrk.run(port, [host], 2, conns=conns, delay_ms=delay_ms)
            return max(2, round(conns * (sat / 2) / calib["rps"]))

        conns = paced_conns(runner.port, "t0.localhost")
        dconns = paced_conns(dport, "localhost")
        half = {"runner": [], "deno": []}
        for r in range(cfg["rounds"]):
            half["runner"].append(wrk.run(runner.port, ["t0.localhost"], cfg["seconds"], conns=conns, delay_ms=delay_ms))
            half["deno"].append(wrk.run(dport, ["localhost"], cfg["seconds"], conns=dconns, delay_ms=delay_ms))
        raw["half"] = half
        if args.profile:
            profile_runner(wrk, runner, work, cfg["seconds"],
                           os.path.join(os.path.dirname(args.out), "profile.txt"))
        procs.stop(dproc)
        procs.stop(wproc)

        # ---- 4. tenants, and 5. idle isolates resident at the largest count
        log("tenants")
        tenants = {}
        booted = 1
        idle = None
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        before_tenants = set(runner.isolates())
        for n in cfg["tenants"]:
            if n > booted:
                log(f"booting t{booted}..t{n - 1}")
                list(pool.map(lambda i: get(runner.port, f"t{i}.localhost"), range(booted, n)))
                booted = n
            if n == max_tenants:
                time.sleep(2)
                # only the hello-world tenants booted here (not t0, the cold
                # or the code-size deployments booted before)
                pids = [p for p in runner.isolates() if p not in before_tenants]
                mem = [k for k in (private_kib(p) for p in pids) if k is not None]
                idle_p = wrk.run(runner.port, ["t0.localhost"], cfg["seconds"], threads=1, conns=1)
                idle = {"n": len(pids), "all": len(runner.isolates()), "mem_kib": mem, "warm": idle_p}
            hosts = [f"t{i}.localhost" for i in range(n)]
            tenants[n] = []
            for _ in range(cfg["tenant_rounds"]):
                isolates = [p for p in runner.isolates()]
                res = wrk.run(runner.port, hosts, cfg["seconds"], watch=[runner.proc.pid, *isolates])
                res["runner_us"] = res["cpu_s"][runner.proc.pid] / res["requests"] * 1e6
                res["isolates_us"] = sum(res["cpu_s"][p] for p in isolates) / res["requests"] * 1e6
                tenants[n].append(res)
        pool.shutdown()
        raw["tenants"] = tenants
        raw["idle"] = idle
        procs.stop(runner.proc)

        # ---- 4b. the same taking of turns without the runner: deno alone
        log("bare deno processes taking turns")
        fleet = {n: deno_fleet(procs, os.path.join(apps, "t0"), work, n, cfg["fleet_seconds"]) for n in (1, 100)}
        raw["fleet"] = fleet
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    # ---------------------------------------------------------------- table
    def wsum(runs):
        return (med([x["rps"] for x in runs]), med([x["p50_us"] / 1000 for x in runs]),
                med([x["p99_us"] / 1000 for x in runs]), sum(x["errors"] + x["status_errors"] for x in runs))

    rr, dd, ww = wsum(warm["runner"]), wsum(warm["deno"]), wsum(warm["workerd"])
    rows.append(("warm req/s, hello world, keep-alive (wrk 2 threads, 32 conns)",
                 f"{rr[0]:,.0f}", f"deno direct {dd[0]:,.0f}; workerd {ww[0]:,.0f}",
                 f"{rr[0] / dd[0]:.2f}x of deno (target ≥ 0.8x: {'met' if rr[0] / dd[0] >= 0.8 else 'NOT met'}); "
                 f"{rr[0] / ww[0]:.2f}x of workerd"))
    rows.append(("warm latency at saturation, p50 / p99",
                 f"{rr[1]:.2f} / {rr[2]:.2f} ms", f"deno {dd[1]:.2f} / {dd[2]:.2f} ms; workerd {ww[1]:.2f} / {ww[2]:.2f} ms",
                 f"errors: runner {rr[3]}, deno {dd[3]}, workerd {ww[3]}"))
    hr, hd = wsum(half["runner"]), wsum(half["deno"])
    added = hr[2] - hd[2]
    rows.append((f"p99 at half of saturation (~{hr[0]:,.0f} req/s: {conns} conns paced {delay_ms} ms)",
                 f"p50 {hr[1]:.2f} / p99 {hr[2]:.2f} ms", f"deno direct p50 {hd[1]:.2f} / p99 {hd[2]:.2f} ms (~{hd[0]:,.0f} req/s, {dconns} conns)",
                 f"runner adds {added:.2f} ms at p99 (target < 1 ms: {'met' if added < 1 else 'NOT met'})"))
    rows.append(("cold start: first request, deployment never seen (paced)",
                 dist(cold), f"bare `deno run`: {dist(bare)}; workerd start: {dist(wcold)}",
                 f"p50 {med(cold) - med(bare):+.1f} ms vs bare deno (target ≤ +15 ms: "
                 f"{'met' if med(cold) - med(bare) <= 15 else 'NOT met'})"))
    rows.append(("cold start: cached deployment, its isolate gone (paced)",
                 dist(cached), f"bare `deno run`: {dist(bare)}",
                 f"target p50 ≤ 10 / p99 ≤ 30 ms: "
                 f"{'met' if med(cached) <= 10 and percentile(cached, 99) <= 30 else 'NOT met'}"))
    rows.append((f"cold start: burst of {len(burst)} new deployments back to back",
                 dist(burst), f"bare `deno run`: {dist(bare)}",
                 f"the pool ({PRESTARTED} per profile) runs dry: later boots start their own deno"))
    for label, figures in sizes.items():
        first, again = bare_sizes[label]
        rows.append((f"boot time vs code size: {label} ESZIP ({raw['code_size']['bytes'][label]:,} bytes), "
                     "subhosting origin, first request",
                     f"never seen: {dist(figures['never seen'])}; layer cached: {dist(figures['layer cached'])}; "
                     f"re-boot (isolate gone): {dist(figures['re-boot'])}",
                     f"bare `deno run` of the same code: first start {dist(first)}; second start {dist(again)}",
                     f"never seen {med(figures['never seen']) - med(first):+.1f} ms, re-boot "
                     f"{med(figures['re-boot']) - med(again):+.1f} ms vs bare deno (p50)"))
    h1, h2 = relay["HTTP/1.1"], relay["h2c"]
    rows.append(("relay → runner in subhosting mode (signed token per request, 32 in flight, h2load): "
                 "h2c on 2 connections",
                 f"{h2['rps']:,.0f} req/s, p50 {h2['p50']:.2f} / p99 {h2['p99']:.2f} ms, runner {h2['runner_us']:.1f} µs/req",
                 f"HTTP/1.1 on 32 connections: {h1['rps']:,.0f} req/s, p50 {h1['p50']:.2f} / p99 {h1['p99']:.2f} ms, "
                 f"runner {h1['runner_us']:.1f} µs/req",
                 f"{h2['rps'] / h1['rps']:.2f}x the requests/s of HTTP/1.1"))
    base = wsum(tenants[1])
    for n in cfg["tenants"]:
        t = wsum(tenants[n])
        note = f"{t[0] / base[0]:.2f}x of 1 deployment"
        if n == 1000:
            note += f" (target ≥ 0.7x: {'met' if t[0] / base[0] >= 0.7 else 'NOT met'})"
        if t[3]:
            note += f"; {t[3]} errors"
        note += (f"; CPU per request: runner {med([x['runner_us'] for x in tenants[n]]):.0f} µs, "
                 f"isolates {med([x['isolates_us'] for x in tenants[n]]):.0f} µs")
        rows.append((f"throughput, {n} active deployment{'s' if n > 1 else ''} (Host rotated)",
                     f"{t[0]:,.0f} req/s, p99 {t[2]:.2f} ms", f"1 deployment: {base[0]:,.0f} req/s, p99 {base[2]:.2f} ms", note))
    f1, f100 = fleet[1], fleet[100]
    rows.append(("reference: bare `deno run` processes taking turns, no runner (one client, sequential requests "
                 "round-robin over keep-alive connections)",
                 f"100 processes: {f100['us']:.0f} µs of deno CPU per request ({f100['rps']:,.0f} req/s)",
                 f"1 process: {f1['us']:.0f} µs ({f1['rps']:,.0f} req/s)",
                 f"a request costs deno {f100['us'] / f1['us']:.1f}x more when 100 processes take turns: "
                 "the floor of one process per deployment"))
    if idle:
        mem = [k / 1024 for k in idle["mem_kib"]]
        wp = idle["warm"]["p99_us"] / 1000
        rows.append((f"idle isolates resident: private memory per hello-world isolate ({idle['n']} measured, {idle['all']} resident)",
                     f"median {med(mem):.1f} MiB, p99 {percentile(mem, 99):.1f} MiB, total {sum(mem) / 1024:.2f} GiB", "—",
                     f"≈ {24 * 1024 / med(mem):,.0f} would fit in 24 GiB by private memory alone"))
        rows.append((f"warm request with {idle['all']} isolates resident (wrk 1 conn, sequential)",
                     f"p50 {idle['warm']['p50_us'] / 1000:.2f} / p99 {wp:.2f} ms", "—",
                     "target p99 ≤ 5 ms with 1,000 resident: "
                     + ("met" if wp <= 5 and idle["all"] >= 1000 else f"{'p99 ok' if wp <= 5 else 'p99 NOT met'} at {idle['all']} (1,000 only in the full run)")))
    rcpu = [x["runner_cpu_s"] / x["requests"] * 1e6 for x in warm["runner"]]
    icpu = [x["isolate_cpu_s"] / x["requests"] * 1e6 for x in warm["runner"]]
    dcpu = [x["isolate_cpu_s"] / x["requests"] * 1e6 for x in warm["deno"]]
    rows.append(("runner's own CPU per request (utime+stime / requests, at saturation)",
                 f"{med(rcpu):.1f} µs", f"the isolate behind it {med(icpu):.1f} µs; deno serving directly {med(dcpu):.1f} µs",
                 f"the proxy costs {med(rcpu) / med(dcpu):.2f}x the handler's own deno CPU"))

    elapsed = time.time() - started
    mode = "--quick" if q else "full"
    header = (f"isocloud benchmark suite ({mode}), {datetime.date.today().isoformat()}, "
              f"{os.cpu_count()} cores, {platform.platform()}, {elapsed:.0f} s; "
              f"wrk {cfg['seconds']} s × {cfg['rounds']} rounds (medians over rounds); runner --cpu-limit-ms 1000 "
              f"--idle-timeout-s 3600 (memory limit default 512 MB), every sandbox layer at its default")
    table = ["| figure | isocloud | reference | ratio / notes |", "| --- | --- | --- | --- |"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = header + "\n\n" + "\n".join(table) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(raw, f, default=str)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
