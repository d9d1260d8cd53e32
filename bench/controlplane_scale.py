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
    python3 bench/controlplane_scale.py --seed-projects 100000 --seed-deployments 1000000

With --seed-*, the store is first filled by bulk SQL (SQLite, or with
--postgres a throwaway PostgreSQL cluster of the machine's package filled by
COPY; the schema the server made; every deployment ready, one file, each project's first
deployment its production), then the server is started on it: its start-up
time (to its listening line: the routing table loaded whole) and resident
memory, then the same deploys, promotions and time-to-serve on 100 new
projects (`--samples`), a request to a seeded deployment, and list pages.

Run it with two binaries (before and after a change) back to back; the
machine's load moves the absolute figures.
"""
import argparse
import glob
import hashlib
import sqlite3
import http.client
import json
import os
import socket
import statistics
import subprocess
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
    parser.add_argument("--seed-projects", type=int, default=0)
    parser.add_argument("--seed-deployments", type=int, default=0)
    parser.add_argument("--samples", type=int, default=100, help="new projects measured after seeding")
    parser.add_argument("--postgres", action="store_true", help="seed and serve on PostgreSQL instead of SQLite")
    args = parser.parse_args()
    digest = hashlib.sha256(MAIN).hexdigest()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="isocloud-scale-") as work:
        os.chmod(work, 0o755)
        try:
            if args.seed_projects:
                seeded(args, procs, work, digest)
            else:
                run(args, procs, work, digest)
        finally:
            procs.stop_all()


def deployment_id(n):
    """The n-th seeded deployment id: 12 characters of a-z0-9."""
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    for _ in range(12):
        n, r = divmod(n, 36)
        out = alphabet[r] + out
    return out


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_postgres(procs, work):
    """A throwaway cluster (Debian's package) on a free port, as the
    control plane's tests run one; returns (database URL, psql argv)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        raise SystemExit("--postgres: no /usr/lib/postgresql/*/bin/initdb (run scripts/install-postgres)")
    bin_dir = os.path.dirname(bins[-1])
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    cluster = os.path.join(work, "pg")
    os.makedirs(cluster)
    if os.geteuid() == 0:
        subprocess.run(["chown", "postgres:postgres", cluster], check=True)
    subprocess.run([*as_postgres, f"{bin_dir}/initdb", "-D", f"{cluster}/data", "-U", "postgres", "--auth=trust",
                    "--no-sync", "-E", "UTF8", "--locale=C"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(work, "postgres.log"), "w")
    procs.start([*as_postgres, f"{bin_dir}/postgres", "-D", f"{cluster}/data", "-p", str(port), "-k", cluster,
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "shared_buffers=256MB"], stdout=log, stderr=log)
    psql = [f"{bin_dir}/psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
    for _ in range(600):
        if subprocess.run([f"{bin_dir}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0:
            break
        time.sleep(0.1)
    subprocess.run([*psql, "-c", "CREATE DATABASE isocloud"], check=True)
    return f"postgres://postgres@127.0.0.1:{port}/isocloud", [*psql, "-d", "isocloud"]


def copy_rows(psql, table, columns, rows):
    """COPY `rows` (tuples of str/int) into `table` through psql."""
    copy = subprocess.Popen([*psql, "-c", f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)"],
                            stdin=subprocess.PIPE, text=True)
    for row in rows:
        copy.stdin.write(",".join(str(v) for v in row) + "\n")
    copy.stdin.close()
    if copy.wait() != 0:
        raise SystemExit(f"COPY into {table} failed")


def seed_postgres(psql, projects, deployments, digest):
    copy_rows(psql, "projects", "id, name, created_at_ms, updated_at_ms, production_deployment_id",
              ((f"sp{n}", f"s{n}", 0, 0, deployment_id(n)) for n in range(projects)))
    copy_rows(psql, "deployments", "id, project_id, created_at_ms, status, entrypoint, permissions_json, envs_json, "
              "file_count, size_bytes, build_promote",
              ((deployment_id(n), f"sp{n % projects}", n, "ready", "file:///src/main.ts", "null", "{}", 1, len(MAIN), 0)
               for n in range(deployments)))
    copy_rows(psql, "deployment_files", "deployment_id, path, sha256, size_bytes",
              ((deployment_id(n), "main.ts", digest, len(MAIN)) for n in range(deployments)))
    subprocess.run([*psql, "-c", "ANALYZE"], check=True)


def seeded(args, procs, work, digest):
    projects, deployments = args.seed_projects, max(args.seed_deployments, args.seed_projects)
    store = []
    if args.postgres:
        url, psql = start_postgres(procs, work)
        store = ["--database-url", url]
    first = Serve(procs, args.binary, work, "seeded", extra=store)
    Api(first).call("PUT", f"/blobs/{digest}", raw=MAIN)
    first.stop()
    started = time.perf_counter()
    if args.postgres:
        seed_postgres(psql, projects, deployments, digest)
    else:
        seed_sqlite(os.path.join(work, "seeded-data", "isocloud.db"), projects, deployments, digest)
    print(f"seeded {projects} projects and {deployments} deployments in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    measure_seeded(args, procs, work, digest, projects, deployments, store)


def seed_sqlite(path, projects, deployments, digest):
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO projects (id, name, created_at_ms, updated_at_ms, production_deployment_id) VALUES (?, ?, 0, 0, ?)",
            ((f"sp{n}", f"s{n}", deployment_id(n)) for n in range(projects)))
        db.executemany(
            "INSERT INTO deployments (id, project_id, created_at_ms, status, entrypoint, permissions_json, envs_json, "
            "file_count, size_bytes, build_promote) VALUES (?, ?, ?, 'ready', 'file:///src/main.ts', 'null', '{}', 1, ?, 0)",
            ((deployment_id(n), f"sp{n % projects}", n, len(MAIN)) for n in range(deployments)))
        db.executemany(
            "INSERT INTO deployment_files (deployment_id, path, sha256, size_bytes) VALUES (?, 'main.ts', ?, ?)",
            ((deployment_id(n), digest, len(MAIN)) for n in range(deployments)))
    db.close()


def measure_seeded(args, procs, work, digest, projects, deployments, store):
    start = time.perf_counter()
    serve = Serve(procs, args.binary, work, "seeded", extra=["--idle-timeout-s", "5", *store])
    startup_s = time.perf_counter() - start
    rss_start = rss_mib(serve.proc.pid)
    api = Api(serve)
    body = {"entrypoint": "main.ts", "files": {"main.ts": {"hash": digest, "size": len(MAIN)}}, "production": True}
    deploy_ms, promote_ms, serve_ms = [], [], []
    for n in range(args.samples):
        name = f"new{n}"
        api.call("POST", "/projects", {"name": name})
        t = time.perf_counter()
        created = api.call("POST", f"/projects/{name}/deployments", body)
        deploy_ms.append((time.perf_counter() - t) * 1000)
        serve_ms.append(serves(serve.port, f"{name}-{created['id']}.localhost"))
        second = api.call("POST", f"/projects/{name}/deployments", {**body, "production": False})
        t = time.perf_counter()
        api.call("POST", f"/projects/{name}/promote", {"deployment_id": second["id"]})
        promote_ms.append((time.perf_counter() - t) * 1000)
    old_ms = [serves(serve.port, f"s{n}.localhost") for n in range(0, projects, max(1, projects // 50))]
    pages_ms = []
    for path in ["/projects?limit=100", "/projects/s7/deployments?limit=50"]:
        t = time.perf_counter()
        api.call("GET", path)
        pages_ms.append((time.perf_counter() - t) * 1000)
    backend = "PostgreSQL" if store else "SQLite"
    print(f"binary {args.binary}: {projects} projects and {deployments} deployments seeded ({backend})\n")
    print("| figure | p50 | p99 | n |")
    print("| --- | --- | --- | --- |")
    print(f"| start-up, to listening (routing loaded whole) | {startup_s:.2f} s | | 1 |")
    print(f"| resident memory after start-up | {rss_start:.0f} MiB | | 1 |")
    print(f"| resident memory after the runs below | {rss_mib(serve.proc.pid):.0f} MiB | | 1 |")
    summary("production deploy of a new project", deploy_ms)
    summary("promotion (routing only)", promote_ms)
    summary("deploy → its host serves", serve_ms)
    summary("first request to a seeded project (a cold boot)", old_ms)
    print(f"| GET /projects?limit=100, first page | {pages_ms[0]:.1f} ms | | 1 |")
    print(f"| GET a project's deployments, first page of 50 | {pages_ms[1]:.1f} ms | | 1 |")


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
