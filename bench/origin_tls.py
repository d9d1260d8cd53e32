#!/usr/bin/env python3
"""What TLS on the origin listener costs a boot: two control planes on
loopback, one with `--origin-listen` in the clear and one with
`--origin-tls-cert/--origin-tls-key` (a P-256 certificate from a CA made
here with openssl), each with the same N hello-world projects deployed, and
one `isocloud runner` fed by each (`--rpc-root http://…`, and `https://…`
with `--rpc-root-ca`). Then, through relay tokens as a subhoster's relay
sends them:

1. Never-seen deployments one at a time, the two runners alternating: time
   to the whole answer (boot RPC, tree, layers over the origin listener).
2. A burst: N other never-seen deployments at once on each runner (one
   runner after the other): time until all answered, the control plane's
   CPU for it, and the TCP connections the runner then holds to the origin
   listener.

    python3 bench/origin_tls.py [--binary target/release/isocloud] [--n 40]

Every process is killed at the end. See docs/benchmarks.md.
"""
import argparse
import concurrent.futures
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CLK_TCK, DENO, Procs, ROOT, cpu_ticks, log, med, percentile  # noqa: E402
from edge import APP, KID, SECRET, admin_token, relay_token, start  # noqa: E402


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(work):
    """A CA and a certificate for 127.0.0.1 it signed: (ca, cert, key) paths."""
    ca_key, ca, key, csr, cert = (os.path.join(work, n) for n in ("ca.key", "ca.pem", "origin.key", "origin.csr",
                                                                  "origin.pem"))
    ext = os.path.join(work, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ca_key)
    openssl("req", "-x509", "-new", "-key", ca_key, "-subj", "/CN=bench origin CA", "-days", "2", "-out", ca)
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    openssl("req", "-new", "-key", key, "-subj", "/CN=127.0.0.1", "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
            "-extfile", ext, "-out", cert)
    return ca, cert, key


class ControlPlane:
    def __init__(self, procs, binary, work, name, tls=None):
        self.work = os.path.join(work, name)
        os.makedirs(self.work)
        data = os.path.join(self.work, "data")
        argv = [binary, "serve", "--data", data, "--state-dir", os.path.join(self.work, "state"), "--deno", DENO,
                "--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0", "--base-domain", "localhost",
                "--origin-listen", "127.0.0.1:0", "--origin-secret", f"{KID}={SECRET}", "--prestarted-isolates", "0"]
        scheme = "http"
        if tls:
            argv += ["--origin-tls-cert", tls[1], "--origin-tls-key", tls[2]]
            scheme = "https"
        self.proc, found = start(procs, argv, os.path.join(self.work, "serve.log"),
                                 ["control plane on http://", f"origin on {scheme}://"])
        self.control = "http://" + found["control plane on http://"]
        self.root = f"{scheme}://{found[f'origin on {scheme}://']}/"
        self.origin_port = int(found[f"origin on {scheme}://"].rsplit(":", 1)[1])
        self.env = {**os.environ, "ISOCLOUD_URL": self.control, "ISOCLOUD_TOKEN": admin_token(data),
                    "ISOCLOUD_CONFIG_DIR": os.path.join(self.work, "cli"), "NO_COLOR": "1"}
        self.binary = binary

    def deploy(self, name):
        app = os.path.join(self.work, "apps", name)
        os.makedirs(app)
        with open(os.path.join(app, "main.ts"), "w") as f:
            f.write(APP % {"name": name})
        for args in (["projects", "create", name], ["deploy", "--project", name, "--prod", app]):
            out = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"isocloud {' '.join(args)}: {out.stdout}{out.stderr}")
        host = out.stdout.strip().splitlines()[-1].split("://", 1)[1].rsplit(":", 1)[0]
        return host[len(name) + 1:].split(".", 1)[0]


def start_runner(procs, binary, work, name, cp, ca):
    argv = [binary, "runner", "--listen", "127.0.0.1:0", "--state-dir", os.path.join(work, name), "--deno", DENO,
            "--rpc-root", cp.root, "--subhost-secret", f"{KID}={SECRET}", "--max-connections-per-peer", "0",
            "--max-isolates", "1000"]
    if cp.root.startswith("https"):
        argv += ["--rpc-root-ca", ca]
    proc, found = start(procs, argv, os.path.join(work, f"{name}.log"), ["listening on http://"])
    return proc, int(found["listening on http://"].rsplit(":", 1)[1])


def ask(port, deployment_id, expected):
    """One request with a relay token: seconds to the whole answer."""
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", "/", headers={"x-deno-subhost": relay_token(deployment_id)})
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    if response.status != 200 or body != expected:
        raise RuntimeError(f"{deployment_id}: {response.status} {body[:200]}")
    return time.perf_counter() - began


def connections_to(pid, port):
    """TCP connections `pid` holds to `port` on loopback (its sockets' inodes
    matched in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    parser.add_argument("--n", type=int, default=40)
    args = parser.parse_args()
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-origin-tls-")
    try:
        pki = make_pki(work)
        planes = {"clear": ControlPlane(procs, args.binary, work, "cp-clear"),
                  "tls": ControlPlane(procs, args.binary, work, "cp-tls", tls=pki)}
        log(f"deploying {2 * args.n} projects to each control plane")
        ids = {label: [(f"p{i}", cp.deploy(f"p{i}")) for i in range(2 * args.n)] for label, cp in planes.items()}
        runners = {label: start_runner(procs, args.binary, work, f"runner-{label}", cp, pki[0])
                   for label, cp in planes.items()}
        time.sleep(2)  # both runners past their start (deno's cache template, pre-started isolates)

        log("never-seen deployments one at a time, alternating")
        one = {label: [] for label in planes}
        for i in range(args.n):
            for label in (("clear", "tls") if i % 2 == 0 else ("tls", "clear")):
                name, deployment = ids[label][i]
                one[label].append(ask(runners[label][1], deployment, name))

        log("a burst of never-seen deployments on each runner")
        burst = {}
        for label, cp in planes.items():
            proc, port = runners[label]
            before = cpu_ticks(cp.proc.pid)
            began = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=args.n) as pool:
                times = list(pool.map(lambda pair: ask(port, pair[1], pair[0]), ids[label][args.n:]))
            burst[label] = {"all_s": time.perf_counter() - began, "p50_s": med(times),
                            "cp_cpu_ms": (cpu_ticks(cp.proc.pid) - before) / CLK_TCK * 1000,
                            "connections": connections_to(proc.pid, cp.origin_port)}
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.n} never-seen deployments one at a time (the two runners alternating), then a burst of "
          f"{args.n} others at once on each\n")
    print("| origin listener | one at a time p50 | p90 | first boot (new connection) | burst: all answered "
          "| burst p50 | control plane CPU for the burst | runner's connections to the origin after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label in planes:
        times = one[label]
        b = burst[label]
        print(f"| {label} | {med(times) * 1000:.1f} ms | {percentile(times, 90) * 1000:.1f} ms "
              f"| {times[0] * 1000:.1f} ms | {b['all_s'] * 1000:,.0f} ms | {b['p50_s'] * 1000:,.0f} ms "
              f"| {b['cp_cpu_ms']:,.0f} ms | {b['connections']} |")


if __name__ == "__main__":
    main()
