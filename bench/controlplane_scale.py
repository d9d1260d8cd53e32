#!/usr/bin/env python3
"""The cost of one change as the control plane grows (issue 20), through the
real API of `isocloud serve` (SQLite; control plane and runner in one
process):

1. N projects, each created and given a production deployment (one
   `main.ts`, uploaded once: every deployment shares the blob), one after
   the other; the latency of each production deploy (POST .../deployments,
   201) is kept;
2. then M more deployments into one project (a CI that deploys every push);
3. after every deploy of the sample (the first and last 100 of step 1, the
   last 100 of step 2), the time until the new deployment's host serves
   through the runner (polled every 2 ms), then a second deployment and its
   promotion: a change that moves routing and builds nothing (a deploy
   from files runs the build step, which dwarfs the routing work).

Prints p50/p99 of the first and last 100 deploys of step 1 and the last
100 of step 2, and the same for time-to-serve, with the ratio last/first.

    python3 bench/controlplane_scale.py [--projects 1000] [--deployments 3000]
                                        [--binary target/release/isocloud]

Run it with two binaries (before and after a change) back to back; the
machine's load moves the absolute figures.
"""
import argparse
import hashlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from builds import Serve  # noqa: E402
from common import Procs, ROOT, percentile  # noqa: E402

MAIN = b'Deno.serve(() => new Response("hi"));\n'


class Api:
    def __init__(self, serve):
        host, port = serve.control.split("://", 1)[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.headers = {"authorization": f"Bearer {serve.token}", "content-type": "application/json"}

    def call(self, method, path, body=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        self.conn.request(method, f"/api/v1{path}", body=data, headers=self.headers)
        response = self.conn.getresponse()
        payload = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
        return json.loads(payload) if payload else None


def serves(port, host, deadline_s=30):
    """ms until `host` answers 200 through the runner."""
    start = time.perf_counter()
    while time.perf_counter() - start < deadline_s:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/", headers={"host": host})
            if conn.getresponse().status == 200:
                return (time.perf_counter() - start) * 1000
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.002)
    raise RuntimeError(f"{host} never served")


def summary(label, xs, first=None):
    p50, p99 = statistics.median(xs), percentile(xs, 99)
    ratio = f" ({p50 / statistics.median(first):.2f}x the first 100)" if first else ""
    print(f"| {label} | {p50:.1f} ms | {p99:.1f} ms | {len(xs)} |{ratio}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--projects", type=int, default=1000)
    parser.add_argument("--deployments", type=int, default=3000)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    args = parser.parse_args()
    digest = hashlib.sha256(MAIN).hexdigest()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="isocloud-scale-") as work:
        os.chmod(work, 0o755)
        try:
            run(args, procs, work, digest)
        finally:
            procs.stop_all()


def run(args, procs, work, digest):
    serve = Serve(procs, args.binary, work, "scale", extra=["--idle-timeout-s", "5"])
    api = Api(serve)
    api.call("PUT", f"/blobs/{digest}", raw=MAIN)
    body = {"entrypoint": "main.ts", "files": {"main.ts": {"hash": digest, "size": len(MAIN)}}, "production": True}
    deploy_ms, serve_ms = {"first": [], "last": [], "ci": []}, {"first": [], "last": [], "ci": []}
    promote_ms = {"first": [], "last": [], "ci": []}

    def deploy(project, sample):
        start = time.perf_counter()
        created = api.call("POST", f"/projects/{project}/deployments", body)
        elapsed = (time.perf_counter() - start) * 1000
        if sample:
            deploy_ms[sample].append(elapsed)
            host = f"{project}-{created['id']}.localhost"
            serve_ms[sample].append(serves(serve.port, host))
            # A change that moves routing and nothing else (no build):
            # promote a second deployment.
            second = api.call("POST", f"/projects/{project}/deployments", {**body, "production": False})
            start = time.perf_counter()
            api.call("POST", f"/projects/{project}/promote", {"deployment_id": second["id"]})
            promote_ms[sample].append((time.perf_counter() - start) * 1000)

    started = time.perf_counter()
    for n in range(args.projects):
        name = f"p{n}"
        api.call("POST", "/projects", {"name": name})
        sample = "first" if n < 100 else "last" if n >= args.projects - 100 else None
        deploy(name, sample)
    print(f"{args.projects} projects deployed in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    for n in range(args.deployments):
        deploy("p0", "ci" if n >= args.deployments - 100 else None)
    print(f"binary {args.binary}: {args.projects} projects, then {args.deployments} deployments into one\n")
    print("| figure | p50 | p99 | n |")
    print("| --- | --- | --- | --- |")
    summary("production deploy, first 100 projects", deploy_ms["first"])
    summary(f"production deploy, last 100 of {args.projects} projects", deploy_ms["last"], deploy_ms["first"])
    summary(f"deploy, last 100 of {args.deployments} into one project", deploy_ms["ci"], deploy_ms["first"])
    summary("promotion (routing only, no build), first 100 projects", promote_ms["first"])
    summary(f"promotion, last 100 of {args.projects} projects", promote_ms["last"], promote_ms["first"])
    summary(f"promotion, last 100 of {args.deployments} into one", promote_ms["ci"], promote_ms["first"])
    summary("deploy → its host serves, first 100 projects", serve_ms["first"])
    summary(f"deploy → its host serves, last 100 of {args.projects}", serve_ms["last"], serve_ms["first"])
    summary(f"deploy → its host serves, last 100 of {args.deployments} into one", serve_ms["ci"], serve_ms["first"])


if __name__ == "__main__":
    main()
