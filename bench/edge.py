#!/usr/bin/env python3
"""More than one machine, on loopback (issue 15): the control plane
(`isocloud serve --origin-listen`, SQLite), three `isocloud runner`s fed by
its origin listener, and one `isocloud edge` in front of them. N small
projects are deployed with the CLI and each is checked to answer through
the edge (on the runner its rendezvous ranking puts first) before anything
is measured.

1. Warm throughput of one deployment through the edge (h2c to the runners,
   the default), through a second edge with `--runner-http2 off`, and
   straight to its runner (a relay token signed here, HS256, as a
   subhoster's relay does): wrk -t1 -c32, rounds interleaved; req/s,
   p50/p99, and the CPU per request of the edge and of the runner (/proc
   utime+stime over the round ÷ requests). Medians over rounds.
2. Warm hit rate: one random sequence of N×K requests (each deployment K
   times), sent through the edge (rendezvous hashing), then, on restarted
   runners, the same sequence straight to the runners in turn (round-robin)
   with relay tokens; isolates booted (the runners' `isocloud_boots_total`)
   and the fraction of requests served warm.
3. Failover: on restarted runners, every deployment warm on its runner,
   GETs through the edge over all N deployments from a few clients without
   pause; the runner that is first for the most deployments is killed
   (SIGKILL). Failed requests, the time until each of its deployments
   answered again (another runner, a cold boot), the time until the edge's
   health check took it out, and where its deployments went.

    python3 bench/edge.py [--binary target/release/isocloud] [--deployments 60]
                          [--requests-per-deployment 10] [--rounds 5] [--seconds 5]
                          [--health-interval-ms 1000] [--keep-work]

About 2.5 minutes with the defaults. Every process it starts is killed at
the end (also on Ctrl-C or an error). See docs/benchmarks.md.
"""
import argparse
import base64
import concurrent.futures
import hashlib
import hmac
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CLK_TCK, DENO, Procs, ROOT, cpu_ticks, ensure_wrk, log, med  # noqa: E402

KID = "cp"
SECRET = "edge-bench-shared-secret-of-at-least-32-bytes"
LOG = "warn"
# What each project answers: its name, so a wrong routing shows.
APP = 'Deno.serve(() => new Response("%(name)s"));\n'


# ---------------------------------------------------------------- the protocol

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def relay_token(deployment_id, ttl_s=3600):
    """An `x-deno-subhost` token (docs/subhosting-protocol.md): HS256, `kid`
    naming the key, the deployment and a lifetime."""
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": KID}, separators=(",", ":")).encode())
    claims = b64url(json.dumps({"deployment_id": deployment_id, "iat": now, "exp": now + ttl_s},
                               separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode()
    signature = hmac.new(SECRET.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{claims}.{b64url(signature)}"


def score(runner, deployment_id):
    """The edge's rendezvous score (crates/edge/src/rendezvous.rs): the first
    8 bytes, big-endian, of SHA-256(runner name + "\\n" + deployment id)."""
    return int.from_bytes(hashlib.sha256(f"{runner}\n{deployment_id}".encode()).digest()[:8], "big")


def ranking(deployment_id, runners):
    """Indices of `runners` (their names) best first, as the edge ranks them."""
    return sorted(range(len(runners)), key=lambda i: (-score(runners[i], deployment_id), runners[i]))


# ---------------------------------------------------------------- processes

def start(procs, argv, log_path, wanted):
    """Starts `argv`; waits for a stdout line starting with `isocloud: P`
    for each P of `wanted`; returns (process, {P: rest of its line})."""
    log_file = open(log_path, "a")
    p = procs.start(argv, stdout=subprocess.PIPE, stderr=log_file, text=True,
                    env={**os.environ, "ISOCLOUD_LOG": LOG, "NO_COLOR": "1"})
    found = {}
    deadline = time.time() + 60
    while len(found) < len(wanted):
        line = p.stdout.readline()
        if not line or time.time() > deadline:
            raise SystemExit(f"{argv[1]} did not start; see {log_path}:\n" + open(log_path).read()[-2000:])
        for prefix in wanted:
            if line.startswith(f"isocloud: {prefix}"):
                found[prefix] = line[len(f"isocloud: {prefix}"):].strip()
    threading.Thread(target=p.stdout.read, daemon=True).start()  # drain
    return p, found


def admin_token(data_dir, timeout_s=20):
    """The admin token `isocloud serve` writes into a fresh data dir, once
    it is there."""
    token_file = os.path.join(data_dir, "admin-token")
    deadline = time.time() + timeout_s
    while not os.path.isfile(token_file):
        if time.time() > deadline:
            raise SystemExit("no admin token")
        time.sleep(0.05)
    return open(token_file).read().strip()


def fetch(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric_sum(text, name):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class RunnerNode:
    """One `isocloud runner` fed by the control plane's origin listener; a
    restart keeps its port (the edge knows it by URL) and takes a fresh
    state dir (nothing warm, nothing cached)."""

    def __init__(self, procs, binary, work, index, origin, listen="127.0.0.1:0"):
        self.procs, self.binary, self.work, self.index, self.origin = procs, binary, work, index, origin
        self.generation = 0
        self._start(listen)

    def _start(self, listen):
        self.generation += 1
        state = os.path.join(self.work, f"runner{self.index}-state{self.generation}")
        self.proc, found = start(self.procs, [
            self.binary, "runner", "--listen", listen, "--admin-listen", "127.0.0.1:0", "--state-dir", state,
            "--deno", DENO, "--rpc-root", f"http://{self.origin}/", "--subhost-secret", f"{KID}={SECRET}",
            "--max-connections-per-peer", "0", "--cpu-limit-ms", "1000"],
            os.path.join(self.work, f"runner{self.index}.log"), ["listening on http://", "admin on http://"])
        self.addr = found["listening on http://"]
        self.port = int(self.addr.rsplit(":", 1)[1])
        self.admin = found["admin on http://"]

    @property
    def name(self):
        """Its name in the edge's ranking: the normalised URL."""
        return f"http://{self.addr}/"

    def restart(self):
        self.procs.stop(self.proc)
        for attempt in range(50):  # the port may linger a moment
            try:
                self._start(self.addr)
                return
            except SystemExit:
                if attempt == 49:
                    raise
                time.sleep(0.1)

    def kill(self):
        self.procs.stop(self.proc, sig=9)

    def boots(self):
        return metric_sum(fetch(f"http://{self.admin}/metrics"), "isocloud_boots_total")

    def isolates(self):
        return [i for i in json.loads(fetch(f"http://{self.admin}/isolates")) if i.get("deployment_id")]


class Cluster:
    def __init__(self, procs, binary, work, health_interval_ms):
        self.procs, self.binary, self.work = procs, binary, work
        data = os.path.join(work, "cp-data")
        self.serve, found = start(procs, [
            binary, "serve", "--data", data, "--state-dir", os.path.join(work, "cp-state"), "--deno", DENO,
            "--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
            "--base-domain", "localhost", "--origin-listen", "127.0.0.1:0", "--origin-secret", f"{KID}={SECRET}",
            "--prestarted-isolates", "0"],
            os.path.join(work, "serve.log"), ["listening on http://", "control plane on http://", "origin on http://"])
        self.control = "http://" + found["control plane on http://"]
        self.origin = found["origin on http://"]
        self.token = admin_token(data)
        self.runners = [RunnerNode(procs, binary, work, i, self.origin) for i in range(3)]
        self.edge, self.edge_port, self.edge_admin = self.start_edge("edge", health_interval_ms)
        # A second edge speaking HTTP/1.1 to the runners, for the warm figure only.
        self.edge_h1, self.edge_h1_port, _ = self.start_edge("edge-h1", health_interval_ms,
                                                             ["--runner-http2", "off"])
        self.config_dir = os.path.join(work, "cli")
        os.makedirs(self.config_dir, exist_ok=True)

    def start_edge(self, name, health_interval_ms, extra=()):
        """An `isocloud edge` in front of the three runners: (process,
        port, admin address)."""
        argv = [self.binary, "edge", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                "--rpc-root", f"http://{self.origin}/", "--subhost-secret", f"{KID}={SECRET}",
                "--max-connections-per-peer", "0", "--health-interval-ms", str(health_interval_ms), *extra]
        for r in self.runners:
            argv += ["--runner", f"http://{r.addr}"]
        proc, found = start(self.procs, argv, os.path.join(self.work, f"{name}.log"),
                            ["listening on http://", "admin on http://"])
        return proc, int(found["listening on http://"].rsplit(":", 1)[1]), found["admin on http://"]

    def names(self):
        return [r.name for r in self.runners]

    def cli(self, *args):
        env = {**os.environ, "ISOCLOUD_URL": self.control, "ISOCLOUD_TOKEN": self.token,
               "ISOCLOUD_CONFIG_DIR": self.config_dir, "NO_COLOR": "1"}
        out = subprocess.run([self.binary, *args], env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"isocloud {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def deploy(self, name):
        """Creates project `name`, deploys its app to production with the
        CLI; the deployment id."""
        app = os.path.join(self.work, "apps", name)
        os.makedirs(app, exist_ok=True)
        with open(os.path.join(app, "main.ts"), "w") as f:
            f.write(APP % {"name": name})
        self.cli("projects", "create", name)
        out = self.cli("deploy", "--project", name, "--prod", app)
        host = out.strip().splitlines()[-1].strip().split("://", 1)[1].rsplit(":", 1)[0]
        match = re.fullmatch(re.escape(name) + r"-([a-z0-9]{12})\.localhost", host)
        if not match:
            raise RuntimeError(f"unexpected deploy output: {out}")
        return match.group(1)

    def edge_runners_up(self):
        return {r["runner"]: r["up"] for r in json.loads(fetch(f"http://{self.edge_admin}/runners"))}

    def wait_all_up(self, timeout_s=30):
        deadline = time.time() + timeout_s
        while not all(self.edge_runners_up().values()):
            if time.time() > deadline:
                raise SystemExit(f"the edge does not see every runner up: {self.edge_runners_up()}")
            time.sleep(0.05)

    def restart_runners(self):
        for r in self.runners:
            r.restart()
        self.wait_all_up()


# ---------------------------------------------------------------- requests

class Client:
    """A keep-alive HTTP/1.1 connection to one port; reconnects after an error."""

    def __init__(self, port, timeout=30):
        self.port, self.timeout, self.conn = port, timeout, None

    def get(self, headers, path="/"):
        """(status, body); status 0 when no answer came."""
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request("GET", path, headers=headers)
                r = self.conn.getresponse()
                return r.status, r.read().decode(errors="replace")
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                # A keep-alive connection the server closed while idle is
                # retried once on a new one; anything else is an answer lost.
                self.close()
                if attempt == 1 or not isinstance(e, http.client.RemoteDisconnected):
                    return 0, repr(e)
            except OSError as e:
                self.close()
                return 0, repr(e)
        return 0, "unreachable"

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def host_of(name):
    return f"{name}.localhost"


# ---------------------------------------------------------------- wrk

WRK_LUA = """
local headers = %(headers)s
local req
function init(args) req = wrk.format("GET", "/", headers) end
function request() return req end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"errors":%%d,"status_errors":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk_run(wrk, work, port, headers, seconds, conns, watch):
    script = os.path.join(work, f"wrk-{port}.lua")
    lua_headers = "{" + ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()) + "}"
    with open(script, "w") as f:
        f.write(WRK_LUA % {"headers": lua_headers})
    before = {pid: cpu_ticks(pid) for pid in watch}
    out = subprocess.run([wrk, "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s", "-s", script,
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 60)
    after = {pid: cpu_ticks(pid) for pid in watch}
    line = [l for l in out.stdout.splitlines() if l.startswith("BENCHJSON ")]
    if not line:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    r = json.loads(line[0][len("BENCHJSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["cpu_us"] = {pid: (after[pid] - before[pid]) / CLK_TCK / max(1, r["requests"]) * 1e6 for pid in watch}
    return r


# ---------------------------------------------------------------- the figures

def warm_throughput(cluster, wrk, work, deployments, args):
    name, dep_id = deployments[0]
    owner = cluster.runners[ranking(dep_id, cluster.names())[0]]
    targets = [
        ("through the edge (Host, h2c to the runner)", cluster.edge_port, {"Host": host_of(name)},
         [cluster.edge.pid, owner.proc.pid]),
        ("through an edge with --runner-http2 off (HTTP/1.1 keep-alive)", cluster.edge_h1_port,
         {"Host": host_of(name)}, [cluster.edge_h1.pid, owner.proc.pid]),
        ("straight to its runner (relay token)", owner.port, {"x-deno-subhost": relay_token(dep_id)},
         [None, owner.proc.pid]),
    ]
    client, deadline = Client(cluster.edge_h1_port), time.time() + 30
    while client.get({"Host": host_of(name)}) != (200, name):  # the second edge's table
        if time.time() > deadline:
            raise SystemExit("the HTTP/1.1 edge does not serve the deployment")
        time.sleep(0.1)
    client.close()
    results = {t[0]: [] for t in targets}
    for r in range(args.rounds):
        log(f"warm throughput: round {r + 1}/{args.rounds}")
        order = targets[r % len(targets):] + targets[:r % len(targets)]
        for label, port, headers, (edge_pid, runner_pid) in order:
            watch = [p for p in (edge_pid, runner_pid) if p]
            res = wrk_run(wrk, work, port, headers, args.seconds, args.conns, watch)
            res["edge_us"] = res["cpu_us"][edge_pid] if edge_pid else None
            res["runner_us"] = res["cpu_us"][runner_pid]
            results[label].append(res)
    rows = []
    for label, *_ in targets:
        runs = results[label]
        rows.append({
            "label": label,
            "rps": med([x["rps"] for x in runs]),
            "p50": med([x["p50_us"] for x in runs]) / 1000,
            "p99": med([x["p99_us"] for x in runs]) / 1000,
            "edge_us": med([x["edge_us"] for x in runs]) if runs[0]["edge_us"] is not None else None,
            "runner_us": med([x["runner_us"] for x in runs]),
            "errors": sum(x["errors"] + x["status_errors"] for x in runs),
            "all_rps": [round(x["rps"]) for x in runs],
        })
    return rows


def send_sequence(sequence, send, clients):
    """Sends `sequence` (a list of items) with `clients` concurrent workers
    in order; returns the non-200 answers."""
    failures, lock, position = [], threading.Lock(), [0]

    def worker(index):
        client = send.client(index)
        while True:
            with lock:
                i = position[0]
                position[0] += 1
            if i >= len(sequence):
                break
            status, body = send.get(client, i, sequence[i])
            if status != 200:
                with lock:
                    failures.append((sequence[i], status, body[:200]))
        client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


class ThroughEdge:
    def __init__(self, cluster):
        self.cluster = cluster

    def client(self, _index):
        return Client(self.cluster.edge_port)

    def get(self, client, _i, item):
        name, _ = item
        status, body = client.get({"Host": host_of(name)})
        return (status, body) if status != 200 or body == name else (-1, f"wrong body {body!r}")


class Clients(list):
    def close(self):
        for c in self:
            c.close()


class RoundRobin:
    """Request i straight to runner i mod 3, with a relay token."""

    def __init__(self, cluster, deployments):
        self.cluster = cluster
        self.tokens = {dep_id: relay_token(dep_id) for _, dep_id in deployments}

    def client(self, _index):
        return Clients(Client(r.port) for r in self.cluster.runners)

    def get(self, clients, i, item):
        name, dep_id = item
        status, body = clients[i % len(clients)].get({"x-deno-subhost": self.tokens[dep_id]})
        return (status, body) if status != 200 or body == name else (-1, f"wrong body {body!r}")


def hit_rate(cluster, deployments, args):
    sequence = [d for d in deployments for _ in range(args.requests_per_deployment)]
    random.Random(args.seed).shuffle(sequence)
    rows = []
    for label, send in (("rendezvous hashing (through the edge)", ThroughEdge(cluster)),
                        ("round-robin over the 3 runners (relay tokens)", RoundRobin(cluster, deployments))):
        cluster.restart_runners()
        before = sum(r.boots() for r in cluster.runners)
        log(f"hit rate: {len(sequence)} requests, {label}")
        failures = send_sequence(sequence, send, args.clients)
        boots = sum(r.boots() for r in cluster.runners) - before
        placed = [len(r.isolates()) for r in cluster.runners]
        rows.append({"label": label, "requests": len(sequence), "boots": int(boots),
                     "warm": 1 - boots / len(sequence), "failures": len(failures), "per_runner": placed})
        if failures:
            log(f"  {len(failures)} failed, e.g. {failures[:3]}")
    return rows


def failover(cluster, deployments, args):
    cluster.restart_runners()
    names = cluster.names()
    owners = {dep_id: ranking(dep_id, names) for _, dep_id in deployments}
    # Every deployment warm on its runner before the load.
    failures = send_sequence(deployments, ThroughEdge(cluster), args.clients)
    if failures:
        raise SystemExit(f"before the failover, {len(failures)} deployments did not answer: {failures[:3]}")
    counts = [sum(1 for r in owners.values() if r[0] == i) for i in range(3)]
    victim_index = max(range(3), key=lambda i: counts[i])
    victim = cluster.runners[victim_index]
    moving = {name: dep_id for name, dep_id in deployments if owners[dep_id][0] == victim_index}
    samples, lock, stop = [], threading.Lock(), threading.Event()

    def load(index):
        client = Client(cluster.edge_port)
        order = list(deployments)
        random.Random(args.seed + index).shuffle(order)
        n = 0
        while not stop.is_set():
            name, _ = order[n % len(order)]
            n += 1
            sent = time.perf_counter()
            status, body = client.get({"Host": host_of(name)}, "/")
            done = time.perf_counter()
            ok = status == 200 and body == name
            with lock:
                samples.append((sent, done, name, status if ok or status != 200 else -1, body[:200]))
        client.close()

    threads = [threading.Thread(target=load, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(2)
    log(f"failover: killing runner {victim_index} ({victim.name}), first for {len(moving)} of "
        f"{len(deployments)} deployments")
    killed = time.perf_counter()
    victim.kill()
    # Each of its deployments asked once right after the kill, beside the
    # load: when each answered again (the victim is gone: another runner).
    probed = {}

    def probe(name):
        client = Client(cluster.edge_port)
        status, body = client.get({"Host": host_of(name)}, "/")
        client.close()
        with lock:
            probed[name] = (status if status != 200 or body == name else -1, (time.perf_counter() - killed) * 1000)

    probes = [threading.Thread(target=probe, args=(name,)) for name in moving]
    for t in probes:
        t.start()
    out_at = None
    deadline = killed + args.failover_seconds
    while time.perf_counter() < deadline:
        if out_at is None and not cluster.edge_runners_up().get(victim.name, True):
            out_at = time.perf_counter()
        time.sleep(0.01)
    stop.set()
    for t in threads + probes:
        t.join()
    # Where the victim's deployments went: their second runner.
    survivors = {}
    for i, r in enumerate(cluster.runners):
        if i != victim_index:
            for iso in r.isolates():
                survivors.setdefault(iso["deployment_id"], set()).add(i)
    moved_to_second = sum(1 for dep_id in moving.values() if survivors.get(dep_id) == {owners[dep_id][1]})
    failed = [s for s in samples if s[3] != 200]
    in_flight = [s for s in samples if s[0] < killed < s[1]]
    in_flight_moving = [s for s in in_flight if s[2] in moving]
    # Per deployment of the victim: from the kill to the end of the first
    # 200 of a request sent after the kill (served by another runner: the
    # victim is gone).
    back = {}
    for sent, done, name, status, _ in sorted(samples):
        if name in moving and sent >= killed and status == 200 and name not in back:
            back[name] = (done - killed) * 1000
    after = [s for s in samples if s[0] >= killed]
    rate = len(after) / max(1e-9, max(s[1] for s in after) - killed) if after else 0
    # When the load first came back to each of them (its clients wait on
    # the cold boots too).
    first_after = {}
    for sent, done, name, status, _ in sorted(s for s in after if s[2] in moving):
        first_after.setdefault(name, (sent - killed) * 1000)
    probe_ms = [ms for status, ms in probed.values() if status == 200]
    return {
        "probe_n": len(probe_ms), "probe_failed": len(probed) - len(probe_ms),
        "probe_max_ms": max(probe_ms) if probe_ms else None, "probe_p50_ms": med(probe_ms),
        "victim": victim_index, "moving": len(moving), "deployments": len(deployments),
        "requests": len(samples), "after": len(after), "rate": rate,
        "failed": len(failed), "failed_examples": [(f[2], f[3], f[4]) for f in failed[:5]],
        "in_flight": len(in_flight), "in_flight_moving": len(in_flight_moving),
        "in_flight_failed": sum(1 for s in in_flight if s[3] != 200),
        "back_all_ms": max(back.values()) if len(back) == len(moving) else None,
        "back_p50_ms": med(list(back.values())), "back_n": len(back),
        "first_sent_max_ms": max(first_after.values()) if first_after else None,
        "out_ms": (out_at - killed) * 1000 if out_at else None,
        "moved_to_second": moved_to_second,
        "interval_ms": args.health_interval_ms,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    parser.add_argument("--deployments", type=int, default=60)
    parser.add_argument("--requests-per-deployment", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the hit-rate and failover load")
    parser.add_argument("--health-interval-ms", type=int, default=1000)
    parser.add_argument("--failover-seconds", type=float, default=8)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--keep-work", action="store_true", help="keep the work dir (logs) at the end")
    args = parser.parse_args()

    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-edge-")
    os.chmod(work, 0o755)
    started = time.time()
    try:
        wrk = ensure_wrk()
        log(f"work dir {work}")
        cluster = Cluster(procs, args.binary, work, args.health_interval_ms)
        log(f"control plane {cluster.control}, origin {cluster.origin}, runners "
            f"{', '.join(r.addr for r in cluster.runners)}, edge 127.0.0.1:{cluster.edge_port}")
        names = [f"p{i}" for i in range(args.deployments)]
        t = time.time()
        with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
            ids = list(pool.map(cluster.deploy, names))
        deployments = list(zip(names, ids))
        log(f"{len(deployments)} projects deployed with the CLI in {time.time() - t:.1f} s")
        # Each answers through the edge (its host table is fresh within ~1 s).
        deadline = time.time() + 30
        pending, edge, client = list(deployments), ThroughEdge(cluster), Client(cluster.edge_port)
        while pending:
            pending = [d for d in pending if edge.get(client, 0, d)[0] != 200]
            if pending and time.time() > deadline:
                raise SystemExit(f"not served through the edge: {pending[:5]}")
            if pending:
                time.sleep(0.2)
        client.close()
        names_ranked = cluster.names()
        placed = {iso["deployment_id"]: i for i, r in enumerate(cluster.runners) for iso in r.isolates()}
        agree = sum(1 for _, d in deployments if placed.get(d) == ranking(d, names_ranked)[0])
        log(f"every deployment answers through the edge; on its first-ranked runner: {agree}/{len(deployments)}")

        warm = warm_throughput(cluster, wrk, work, deployments, args)
        hits = hit_rate(cluster, deployments, args)
        fo = failover(cluster, deployments, args)
        report(args, warm, hits, fo, agree, len(deployments), time.time() - started)
    finally:
        procs.stop_all()
        if args.keep_work:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def report(args, warm, hits, fo, agree, n, elapsed_s):
    print(f"\n{n} deployments, 3 runners, 1 edge, on loopback; {elapsed_s:.0f} s in all\n")
    print(f"Warm, one deployment: wrk -t1 -c{args.conns} -d{args.seconds}s, {args.rounds} rounds interleaved, "
          "medians\n")
    print("| path | req/s | p50 ms | p99 ms | edge CPU µs/req | runner CPU µs/req | errors | req/s by round |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in warm:
        edge = f"{row['edge_us']:.1f}" if row["edge_us"] is not None else "–"
        print(f"| {row['label']} | {row['rps']:,.0f} | {row['p50']:.2f} | {row['p99']:.2f} | {edge} "
              f"| {row['runner_us']:.1f} | {row['errors']} | {', '.join(f'{x:,}' for x in row['all_rps'])} |")
    direct = warm[-1]
    print()
    for row in warm[:-1]:
        print(f"{row['label']}: {row['rps'] / direct['rps']:.2f}× the direct req/s, "
              f"p50 {row['p50'] - direct['p50']:+.2f} ms, p99 {row['p99'] - direct['p99']:+.2f} ms")
    print()
    k = args.requests_per_deployment
    print(f"Warm hit rate: {n} deployments × {k} requests in one random order, {args.clients} clients, "
          "fresh runners for each\n")
    print("| placement | requests | isolates booted | served warm | booted per runner | failed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in hits:
        print(f"| {row['label']} | {row['requests']:,} | {row['boots']} | {row['warm'] * 100:.1f}% "
              f"| {' / '.join(map(str, row['per_runner']))} | {row['failures']} |")
    print(f"\n(placement checked before measuring: {agree}/{n} deployments were on the runner the Python "
          "rendezvous ranking puts first)\n")
    print(f"Failover: {args.clients} clients without pause through the edge over the {n} deployments, "
          f"--health-interval-ms {fo['interval_ms']}\n")
    print("| figure | value |")
    print("| --- | --- |")
    print(f"| runner killed (SIGKILL) | runner {fo['victim']}, first for {fo['moving']} of {fo['deployments']} |")
    print(f"| requests during the run / after the kill | {fo['requests']:,} / {fo['after']:,} "
          f"({fo['rate']:,.0f} req/s after) |")
    print(f"| in flight at the kill (of them, to the killed runner's deployments) / failed | "
          f"{fo['in_flight']} ({fo['in_flight_moving']}) / {fo['in_flight_failed']} |")
    print(f"| failed requests of the load | {fo['failed']} |")
    probe = f"{fo['probe_max_ms']:.0f} ms" if fo["probe_max_ms"] is not None else "none answered"
    print(f"| kill → every deployment of the killed runner answered again (each asked once at the kill) | "
          f"{probe} (median {fo['probe_p50_ms']:.0f} ms; {fo['probe_failed']} failed) |")
    back = f"{fo['back_all_ms']:.0f} ms" if fo["back_all_ms"] is not None else \
        f"only {fo['back_n']} of {fo['moving']} came back"
    print(f"| the same seen by the load (first 200 of a request sent after the kill) | {back} "
          f"(median {fo['back_p50_ms']:.0f} ms; the load's last first request to one of them was sent "
          f"{fo['first_sent_max_ms']:.0f} ms after the kill) |")
    out = f"{fo['out_ms']:.0f} ms" if fo["out_ms"] is not None else "not within the run"
    print(f"| kill → the edge's health check took it out | {out} |")
    print(f"| moved deployments now on their second-ranked runner | {fo['moved_to_second']} of {fo['moving']} |")
    if fo["failed_examples"]:
        print(f"\nfailed, e.g.: {fo['failed_examples']}")


if __name__ == "__main__":
    main()
