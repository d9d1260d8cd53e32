#!/usr/bin/env python3
"""Warm throughput, before and after: one or more runner binaries and deno
serving the same handler directly, wrk runs interleaved round by round so
that every figure shares the machine's state of the moment.

    python3 bench/warm.py [--binary A --binary B ...] [--rounds 5] [--seconds 5]
                          [--tenants 1] [--runner-arg=--flag ...]

Beside the runners: the same handler behind one haproxy hop and behind one
nginx hop (each proxy in front of a deno of its own on a unix socket, as an
isolate sits behind the runner; installed from Debian when missing), and
deno serving it directly. `--no-proxies` leaves the proxies out.

Prints req/s, p50/p99 and the CPU per request of each runner process (and of
the isolate behind it) as medians over rounds. `--tenants N` rotates Host
over N deployments (the many-tenant figure of the suite). See
docs/benchmarks.md.
"""
import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (HANDLER, Procs, ROOT, Runner, Wrk, deno_direct, deno_on_socket,  # noqa: E402
                    descendants, ensure_proxies, ensure_wrk, first_response, get, haproxy_hop, log, med,
                    nginx_hop)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", action="append", help="a runner binary (repeat to compare)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--tenants", type=int, default=1)
    parser.add_argument("--runner-arg", action="append", default=[], help="passed to every runner")
    parser.add_argument("--no-deno", action="store_true", help="leave out deno serving directly")
    parser.add_argument("--no-proxies", action="store_true", help="leave out the haproxy and nginx hops")
    args = parser.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "target/release/isocloud")]

    wrk = None
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-warm-")
    try:
        wrk = Wrk(ensure_wrk(), work)
        apps = os.path.join(work, "apps")
        for i in range(args.tenants):
            os.makedirs(os.path.join(apps, f"t{i}"))
            with open(os.path.join(apps, f"t{i}", "main.ts"), "w") as f:
                f.write(HANDLER)
        hosts = [f"t{i}.localhost" for i in range(args.tenants)]
        runners = []
        for n, binary in enumerate(binaries):
            runner = Runner(procs, binary, apps, os.path.join(work, f"state{n}"), args.tenants + 10,
                            extra=args.runner_arg)
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as boot:  # every tenant, before measuring
                list(boot.map(lambda host: get(runner.port, host), hosts))
            runners.append((f"runner {n}: {os.path.relpath(binary, ROOT)}", runner))
        targets = list(runners)
        if not args.no_proxies:
            ensure_proxies()
            for name, hop in (("haproxy 2.6 (1 thread) → deno on a unix socket", haproxy_hop),
                              ("nginx (1 worker, upstream keep-alive) → deno on a unix socket", nginx_hop)):
                where = os.path.join(work, name.split()[0])
                os.makedirs(where)
                socket_path = os.path.join(where, "deno.sock")
                behind = deno_on_socket(procs, os.path.join(apps, "t0"), os.path.join(where, "deno-dir"), socket_path)
                proc, port = hop(procs, where, socket_path)
                targets.append((name, (proc, port, behind)))
        if not args.no_deno:
            dproc, dport = deno_direct(procs, os.path.join(apps, "t0"), os.path.join(work, "deno-direct"))
            first_response(dport)
            targets.append(("deno direct", (dproc, dport, None)))

        results = {name: [] for name, _ in targets}
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}")
            for name, target in targets:
                if isinstance(target, Runner):
                    isolates = target.isolates()
                    res = wrk.run(target.port, hosts, args.seconds, conns=args.conns,
                                  watch=[target.proc.pid, *isolates])
                    res["own_us"] = res["cpu_s"][target.proc.pid] / res["requests"] * 1e6
                    res["isolate_us"] = sum(res["cpu_s"][p] for p in isolates) / res["requests"] * 1e6
                else:
                    proc, port, behind = target
                    # A proxy's own CPU counts its workers too (nginx's master forks one).
                    own = [proc.pid, *(pid for pid, _ in descendants(proc.pid))]
                    watch = own + ([behind.pid] if behind else [])
                    res = wrk.run(port, ["localhost"], args.seconds, conns=args.conns, watch=watch)
                    res["own_us"] = sum(res["cpu_s"][p] for p in own) / res["requests"] * 1e6
                    res["isolate_us"] = res["cpu_s"][behind.pid] / res["requests"] * 1e6 if behind else 0.0
                results[name].append(res)

        base = med([x["rps"] for x in results[targets[-1][0]]])
        print(f"\nwrk -t2 -c{args.conns} -d{args.seconds}s, {args.rounds} rounds interleaved, "
              f"{args.tenants} tenant(s); medians over rounds\n")
        print("| target | req/s | vs last | p50 ms | p99 ms | own CPU µs/req | isolates' CPU µs/req | errors |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, _ in targets:
            runs = results[name]
            rps = med([x["rps"] for x in runs])
            print(f"| {name} | {rps:,.0f} | {rps / base:.2f}x | {med([x['p50_us'] for x in runs]) / 1000:.2f} "
                  f"| {med([x['p99_us'] for x in runs]) / 1000:.2f} | {med([x['own_us'] for x in runs]):.1f} "
                  f"| {med([x['isolate_us'] for x in runs]):.1f} "
                  f"| {sum(x['errors'] + x['status_errors'] for x in runs)} |")
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
