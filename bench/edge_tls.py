#!/usr/bin/env python3
"""What TLS between an edge and a runner costs a warm request: one control
plane (origin listener in the clear), one runner on plain HTTP and one
with `--tls-cert/--tls-key` (a P-256 certificate from a CA made here with
openssl), and three edges in front: h2c to the plain runner, HTTP/2 over
TLS and HTTP/1.1 over TLS (`--runner-http2 off`) to the other, both with
`--runner-ca`. wrk through each edge to the same hello-world deployment,
rounds interleaved; req/s, latency and the CPU per request of the edge and
of the runner.

    python3 bench/edge_tls.py [--binary target/release/isocloud] [--rounds 3] [--seconds 5]

Every process is killed at the end. See docs/benchmarks.md.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DENO, Procs, ROOT, Wrk, ensure_wrk, log, med  # noqa: E402
from edge import KID, SECRET, start  # noqa: E402
from origin_tls import ControlPlane, make_pki  # noqa: E402


def runner(procs, binary, work, name, origin_root, tls=None):
    argv = [binary, "runner", "--listen", "127.0.0.1:0", "--state-dir", os.path.join(work, name), "--deno", DENO,
            "--rpc-root", origin_root, "--subhost-secret", f"{KID}={SECRET}", "--max-connections-per-peer", "0"]
    scheme = "http"
    if tls:
        argv += ["--tls-cert", tls[1], "--tls-key", tls[2]]
        scheme = "https"
    proc, found = start(procs, argv, os.path.join(work, f"{name}.log"), [f"listening on {scheme}://"])
    return proc, f"{scheme}://{found[f'listening on {scheme}://']}"


def edge(procs, binary, work, name, origin_root, runner_url, extra=()):
    argv = [binary, "edge", "--listen", "127.0.0.1:0", "--rpc-root", origin_root,
            "--subhost-secret", f"{KID}={SECRET}", "--runner", runner_url, "--max-connections-per-peer", "0", *extra]
    proc, found = start(procs, argv, os.path.join(work, f"{name}.log"), ["listening on http://"])
    return proc, int(found["listening on http://"].rsplit(":", 1)[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-edge-tls-")
    results = {}
    try:
        pki = make_pki(work)
        cp = ControlPlane(procs, args.binary, work, "cp")
        cp.deploy("p0")
        plain_proc, plain_url = runner(procs, args.binary, work, "runner-plain", cp.root)
        tls_proc, tls_url = runner(procs, args.binary, work, "runner-tls", cp.root, tls=pki)
        ca = ["--runner-ca", pki[0]]
        targets = [
            ("h2c to the runner (default)", edge(procs, args.binary, work, "edge-h2c", cp.root, plain_url),
             plain_proc),
            ("HTTP/2 over TLS", edge(procs, args.binary, work, "edge-tls-h2", cp.root, tls_url, ca), tls_proc),
            ("HTTP/1.1 over TLS", edge(procs, args.binary, work, "edge-tls-h1", cp.root, tls_url,
                                       [*ca, "--runner-http2", "off"]), tls_proc),
        ]
        wrk = Wrk(ensure_wrk(), work)
        time.sleep(2)
        for name, (edge_proc, port), runner_proc in targets:  # warm: boot the isolate on each runner
            wrk.run(port, ["p0.localhost"], 1, watch=[])
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}")
            for name, (edge_proc, port), runner_proc in targets:
                res = wrk.run(port, ["p0.localhost"], args.seconds, watch=[edge_proc.pid, runner_proc.pid])
                res["edge_us"] = res["cpu_s"][edge_proc.pid] / res["requests"] * 1e6
                res["runner_us"] = res["cpu_s"][runner_proc.pid] / res["requests"] * 1e6
                results.setdefault(name, []).append(res)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrk -t2 -c32 through an edge to one warm deployment, {args.rounds} rounds × {args.seconds} s "
          "interleaved; medians\n")
    print("| edge → runner | req/s | p50 ms | p99 ms | edge CPU µs/req | runner CPU µs/req | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        print(f"| {name} | {med([x['rps'] for x in runs]):,.0f} | {med([x['p50_us'] for x in runs]) / 1000:.2f} "
              f"| {med([x['p99_us'] for x in runs]) / 1000:.2f} | {med([x['edge_us'] for x in runs]):.1f} "
              f"| {med([x['runner_us'] for x in runs]):.1f} | {sum(x['errors'] + x['status_errors'] for x in runs)} |")


if __name__ == "__main__":
    main()
