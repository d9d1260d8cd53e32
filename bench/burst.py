#!/usr/bin/env python3
"""A burst of never-seen deployments, before and after boot admission: N
deployments requested at once (what a runner sees after a restart behind a
busy load balancer, or when a crawler walks a subhoster's domains), each on
a fresh runner (fresh state dir, the default pre-started isolates, up).

    python3 bench/burst.py [--binary A [--binary B]] [--n 200 --n 1000]
                           [--variant 'off=--max-concurrent-boots 10000 --max-boot-queue 100000'
                            --variant 'default=']

Every (binary, variant) pair meets every N, `--rounds` times interleaved
(the table: medians; on a shared machine, use a few). Without --variant: `off`
(admission effectively off: every boot starts at once) and `default`; a
binary that predates `--max-concurrent-boots` is run as it is. Prints per
run: time to answer first/p10/p50/p90/max (ms, from the burst's start),
answers other than 200, the CPU the runner and its deno processes used, the most deno processes at once and the most of them still
unanswered (starting), the peak PSS of the runner and its deno processes
(sampled every second and at the end) and the peak memory of the isolates' cgroups. Also
the memory one boot costs: the private memory (USS) of a hello-world
isolate when it serves. See docs/benchmarks.md.
"""
import argparse
import http.client
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (CLK_TCK, Procs, ROOT, cpu_ticks, descendants,  # noqa: E402
                    percentile, private_kib, start_apps_runner)


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(runner_pid):
    """CPU seconds used so far by the runner and its deno processes."""
    ticks = 0
    for pid in [runner_pid] + [pid for pid, comm in descendants(runner_pid) if comm == "deno"]:
        try:
            ticks += cpu_ticks(pid)
        except OSError:
            pass
    return ticks / CLK_TCK


def cgroup_bytes(runner_pid):
    """Memory charged to the isolates' cgroups (`isocloud-<pid>`, v2 or v1)."""
    with open("/proc/self/cgroup") as f:
        own = f.read().splitlines()
    candidates = []
    for line in own:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            candidates.append(os.path.join("/sys/fs/cgroup", path.lstrip("/"), f"isocloud-{runner_pid}", "memory.current"))
        elif "memory" in controllers.split(","):
            candidates.append(os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"), f"isocloud-{runner_pid}",
                                           "memory.usage_in_bytes"))
    for path in candidates:
        try:
            with open(path) as f:
                return int(f.read())
        except (OSError, ValueError):
            continue
    return None


def one(port, host, results, index, barrier):
    barrier.wait()
    start = time.perf_counter()
    status, retry_after = 0, None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        response.read()
        status, retry_after = response.status, response.getheader("retry-after")
        conn.close()
    except OSError as e:
        status = f"{type(e).__name__}"
    results[index] = (status, retry_after, (time.perf_counter() - start) * 1000)


def supports_admission(binary):
    out = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True).stdout
    return "--max-concurrent-boots" in out


def run_burst(procs, binary, extra, n, work, tag, logs):
    apps = os.path.join(work, f"apps-{n}")
    if not os.path.isdir(apps):
        for i in range(n):
            os.makedirs(os.path.join(apps, f"b{i}"))
            with open(os.path.join(apps, f"b{i}", "main.ts"), "w") as f:
                f.write(f'Deno.serve(() => new Response("hello from b{i}"));\n')
    state = os.path.join(work, f"state-{tag}-{n}")
    runner, port = start_apps_runner(
        binary, apps, state,
        ["--max-isolates", str(max(1000, n + 10)), "--idle-timeout-s", "3600", "--cpu-limit-ms", "1000", *extra],
        log="info", stderr=open(os.path.join(logs or work, f"log-{tag}-{n}.txt"), "w"), spawn=procs.start)
    threading.Thread(target=runner.stdout.read, daemon=True).start()
    time.sleep(3)  # the template and the pre-started isolates are up
    results = [None] * n
    barrier = threading.Barrier(n + 1)
    threads = [threading.Thread(target=one, args=(port, f"b{i}.localhost", results, i, barrier)) for i in range(n)]
    for t in threads:
        t.start()
    peak = {"deno": 0, "starting": 0, "pss_kib": 0, "cgroup": 0}
    done = threading.Event()

    def sample_counts():
        while not done.is_set():
            deno = [pid for pid, comm in descendants(runner.pid) if comm == "deno"]
            answered = sum(1 for r in results if r is not None)
            peak["deno"] = max(peak["deno"], len(deno))
            peak["starting"] = max(peak["starting"], len(deno) - answered)
            memory = cgroup_bytes(runner.pid)
            if memory is not None:
                peak["cgroup"] = max(peak["cgroup"], memory)
            # Each scan of /proc costs the machine a few ms of the CPU the
            # boots are measured on: a few a second.
            time.sleep(0.1)

    def sample_pss():
        # Reading smaps_rollup of hundreds of deno processes costs more:
        # once a second, and once when every answer is in (the isolates
        # stay up, so that is near the peak).
        while True:
            pids = [runner.pid] + [pid for pid, comm in descendants(runner.pid) if comm == "deno"]
            peak["pss_kib"] = max(peak["pss_kib"], sum(pss_kib(pid) for pid in pids))
            if done.is_set():
                return
            done.wait(1.0)

    samplers = [threading.Thread(target=sample_counts), threading.Thread(target=sample_pss)]
    cpu_before = cpu_s(runner.pid)
    for s in samplers:
        s.start()
    barrier.wait()
    for t in threads:
        t.join()
    cpu = cpu_s(runner.pid) - cpu_before
    done.set()
    for s in samplers:
        s.join()
    # What one boot costs: a served hello-world isolate's own memory.
    deno = [pid for pid, comm in descendants(runner.pid) if comm == "deno"]
    uss = sorted(filter(None, (private_kib(pid) for pid in deno[:50])))
    procs.stop(runner)
    shutil.rmtree(state, ignore_errors=True)
    ok = [ms for status, _, ms in results if status == 200]
    failures = {}
    for status, retry_after, _ in results:
        if status != 200:
            key = f"{status}" + (" (Retry-After)" if retry_after else "")
            failures[key] = failures.get(key, 0) + 1
    return {"ok": ok, "failures": failures, "peak": peak, "uss_kib": uss[len(uss) // 2] if uss else None,
            "cpu_s": cpu}


def summary(r):
    ok = r["ok"]
    timing = (f"first {min(ok):.0f} p50 {percentile(ok, 50):.0f} max {max(ok):.0f} ms" if ok else "no answer")
    return f"{timing}, not 200: {r['failures'] or 0}, deno at once {r['peak']['deno']}, CPU {r['cpu_s']:.1f} s"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", action="append", help="a runner binary (repeat to compare)")
    parser.add_argument("--n", action="append", type=int, help="deployments at once (repeat) [200, 1000]")
    parser.add_argument("--variant", action="append",
                        help="NAME=EXTRA FLAGS for the runner (repeat) [off and default]")
    parser.add_argument("--logs", help="keep each runner's log in this folder (default: deleted)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every (N, binary, variant) this many times, interleaved; the table gives medians")
    args = parser.parse_args()
    # A thousand client sockets at once.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    binaries = args.binary or [os.path.join(ROOT, "target/release/isocloud")]
    sizes = args.n or [200, 1000]
    variants = [v.split("=", 1) for v in (args.variant or
                ["off=--max-concurrent-boots 10000 --max-boot-queue 100000", "default="])]
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-burst-")
    runs = {}
    try:
        for n in sizes:
            for round_ in range(args.rounds):
                for b, binary in enumerate(binaries):
                    admission = supports_admission(binary)
                    for name, extra in variants if admission else [("as built", "")]:
                        tag = f"{b}-{name}".replace(" ", "_")
                        print(f"[burst] {n} at once, round {round_ + 1}: {os.path.relpath(binary, ROOT)} {name}",
                              file=sys.stderr, flush=True)
                        result = run_burst(procs, binary, shlex.split(extra), n, work, f"{tag}-r{round_ + 1}",
                                           args.logs)
                        runs.setdefault((n, binary, name), []).append(result)
                        print(f"[burst]   {summary(result)}", file=sys.stderr, flush=True)
        print(f"\n{os.cpu_count()} cores; time to answer from the burst's start (new connection, to the end of "
              f"the body); medians of {args.rounds} round(s), peaks the highest, failures per round\n")
        print("| N | runner | variant | first ms | p10 ms | p50 ms | p90 ms | max ms | p50/max | not 200 | "
              "deno at once | starting at once | CPU s | peak PSS MiB | peak isolates' cgroup MiB | "
              "USS of one isolate MiB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for (n, binary, name), results in runs.items():
            def med(f):
                values = [v for v in (f(r) for r in results) if v is not None]
                return statistics.median(values) if values else None
            cells = [med(lambda r, p=p: percentile(r["ok"], p) if r["ok"] else None) for p in (0, 10, 50, 90, 100)]
            cells = [f"{c:.0f}" if c is not None else "-" for c in cells]
            ratio = med(lambda r: percentile(r["ok"], 50) / max(r["ok"]) if r["ok"] else None)
            failures = "; ".join(", ".join(f"{k}: {v}" for k, v in sorted(r["failures"].items())) or "0"
                                 for r in results)
            peaks = {k: max(r["peak"][k] for r in results) for k in ("deno", "starting", "pss_kib", "cgroup")}
            cgroup = f"{peaks['cgroup'] / 2**20:.0f}" if peaks["cgroup"] else "-"
            uss = med(lambda r: r["uss_kib"])
            print(f"| {n} | {os.path.relpath(binary, ROOT)} | {name} | {' | '.join(cells)} | "
                  f"{f'{ratio:.2f}' if ratio is not None else '-'} | {failures} | {peaks['deno']} | "
                  f"{peaks['starting']} | {med(lambda r: r['cpu_s']):.1f} | {peaks['pss_kib'] / 1024:.0f} | {cgroup} | "
                  f"{f'{uss / 1024:.1f}' if uss else '-'} |")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
