#!/usr/bin/env python3
"""Builds and package cold starts (issue 12), in one run of `isocloud serve`
(control plane + runner in one process, sandbox layers as the user runs it):

1. cold start: the first request to each of N never-seen deployments of a
   Hono app (`npm:hono@4`, one JSON route) and of a hello world, made with
   `isocloud deploy`, interleaved and paced, next to a bare `deno run` of
   the same Hono app with a warm cache (node_modules installed, deno's cache
   warm; `--cached-only --node-modules-dir=manual -A`, timed from the spawn
   to the first 200). Every copy differs by a string, so each is a new
   deployment, but all Hono copies share one package set: the runner lays
   it out once, and the first Hono start is reported apart. For the
   breakdown: bare starts on an empty deno dir, with and without
   `import "node:http"` first (what the harness added for every npm
   deployment before 19b8671; now only when the deployment's modules name
   it or the package store marked its set, which the run reports),
   a second pass that re-boots every deployment once its isolate idled out
   (`--idle-timeout-s 2`), and each boot's phases from the runner's log.
   Which boots took a pre-started isolate (since 31f325d, an isolate
   started with Hono's package set bound, for a built deployment with no
   deno.json/package.json, as this Hono app is) comes from the metrics
   read after each request.
2. build time: `isocloud deploy` of the Hono app on a fresh data dir (empty
   build cache) vs a redeploy of a changed copy (registry cache warm),
   `--rounds` rounds, each on its own fresh `serve`.
3. blob store growth: bytes and files of DATA/blobs after the first and
   after the Nth Hono deployment.

    python3 bench/builds.py [--n 20] [--rounds 3] [--gap-ms 300] [--binary target/release/isocloud]
                            [--keep-log FILE]

Needs the release binary (cargo build --release -p isocloud), the pinned
deno (./scripts/install-deno), registry.npmjs.org reachable; run as root to
have the sandbox layers. Prints a Markdown table; see docs/benchmarks.md.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DENO, Procs, ROOT, first_response, free_port, get, log, percentile  # noqa: E402

HONO = """import { Hono } from "npm:hono@4";

const app = new Hono();
app.get("/", (c) => c.json({ message: "hello from hono", copy: "%(copy)s" }));

Deno.serve({ port: Number(Deno.env.get("PORT") ?? 8000), onListen() {} }, app.fetch);
"""
HELLO = """Deno.serve({ port: Number(Deno.env.get("PORT") ?? 8000), onListen() {} },
  () => new Response("Hello, world! %(copy)s"));
"""
# The runner's log: boot times, why a boot took no pre-started isolate.
RUNNER_LOG = "info,isocloud_pool=debug,isocloud_supervisor=debug"


def write_app(path, template, copy):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "main.ts"), "w") as f:
        f.write(template % {"copy": copy})
    return path


def tree_size(path):
    """(bytes, files) under `path`."""
    total, count = 0, 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
            count += 1
    return total, count


class Serve:
    """`isocloud serve` on a data and state dir of its own, every port 0;
    the CLI pointed at its control plane."""

    def __init__(self, procs, binary, work, name, extra=()):
        self.procs, self.binary = procs, binary
        self.data = os.path.join(work, f"{name}-data")
        self.state = os.path.join(work, f"{name}-state")
        self.log_path = os.path.join(work, f"{name}.log")
        self.config_dir = os.path.join(work, f"{name}-cli")
        os.makedirs(self.config_dir, exist_ok=True)
        self.log_file = open(self.log_path, "w")
        self.proc = procs.start(
            [binary, "serve", "--data", self.data, "--state-dir", self.state, "--deno", DENO,
             "--control-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=self.log_file, text=True,
            env={**os.environ, "ISOCLOUD_LOG": RUNNER_LOG, "NO_COLOR": "1"})
        self.control = self.admin = None
        line = ""
        while "listening on" not in line:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"isocloud serve did not start; see {self.log_path}:\n"
                                 + open(self.log_path).read()[-2000:])
            if "control plane on " in line:
                self.control = line.split("control plane on ", 1)[1].strip()
            if "admin on " in line:
                self.admin = line.split("admin on ", 1)[1].strip()
        self.port = int(line.rsplit(":", 1)[1])
        # Whatever it prints later must not fill the pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        with open(os.path.join(self.data, "admin-token")) as f:
            self.token = f.read().strip()

    def cli(self, *args):
        env = {**os.environ, "ISOCLOUD_URL": self.control, "ISOCLOUD_TOKEN": self.token,
               "ISOCLOUD_CONFIG_DIR": self.config_dir, "NO_COLOR": "1"}
        out = subprocess.run([self.binary, *args], env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"isocloud {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def deploy(self, project, path):
        """(seconds the CLI took, Host of the deployment)."""
        start = time.perf_counter()
        out = self.cli("deploy", "--project", project, path)
        elapsed = time.perf_counter() - start
        url = out.strip().splitlines()[-1].strip()
        host = url.split("://", 1)[1].rsplit(":", 1)[0]
        return elapsed, host

    def metrics(self):
        with urllib.request.urlopen(f"{self.admin}/metrics", timeout=10) as r:
            return r.read().decode()

    def prestarted(self):
        """isocloud_prestarted_boots_total by result (hit, unfit, miss, …)."""
        return {m.group(1): int(float(m.group(2))) for m in
                re.finditer(r'isocloud_prestarted_boots_total\{result="(\w+)"\} (\S+)', self.metrics())}

    def boot_ms(self, every=False):
        """deployment id -> boot_ms from the `isolate booted` lines (the
        first boot's; `every`: a list of every boot's)."""
        out = {}
        with open(self.log_path) as f:
            for line in f:
                if "isolate booted" in line:
                    d = re.search(r"deployment_id=(\S+)", line)
                    b = re.search(r"boot_ms=(\d+)", line)
                    if d and b:
                        key = d.group(1).strip('"')
                        if every:
                            out.setdefault(key, []).append(int(b.group(1)))
                        else:
                            out.setdefault(key, int(b.group(1)))
        return out

    def phases(self):
        """deployment id -> each of its boots in order, as (kind, ms loading
        the deployment from the origin, a, b): kind "spawn" for a boot that
        spawned a deno of its own (a: ms from loaded to spawned, b: from
        spawned to ready), from the `deployment loaded` (origin_us),
        `isolate process spawned` and `isolate booted` lines; "hit" for one
        that took a pre-started isolate (a: ms filling its files, b: ms
        assigning it until ready), from the `pre-started isolate assigned`
        line, which names no deployment: it is the one loaded last (this
        bench boots one deployment at a time)."""
        loaded, origin, spawned, hit, out = {}, {}, {}, {}, {}
        last = None
        with open(self.log_path) as f:
            for line in f:
                if "isocloud::tenant" in line:
                    continue
                at = line.split(" ", 1)[0]
                try:
                    ts = datetime.datetime.fromisoformat(at).timestamp() * 1000
                except ValueError:
                    continue
                d = re.search(r'deployment_id="?([^"\s]+)', line)
                pid = re.search(r"pid=(\d+)", line)
                if "deployment loaded" in line and d:
                    last = d.group(1)
                    loaded[last] = ts
                    o = re.search(r"origin_us=(\d+)", line)
                    origin[last] = int(o.group(1)) / 1000 if o else float("nan")
                elif "isolate process spawned" in line and pid:
                    spawned[pid.group(1)] = ts
                elif "pre-started isolate assigned" in line and last is not None:
                    fill = re.search(r"fill_us=(\d+)", line)
                    assign = re.search(r"assign_us=(\d+)", line)
                    if fill and assign:
                        hit[last] = (int(fill.group(1)) / 1000, int(assign.group(1)) / 1000)
                elif "isolate booted" in line and d and pid:
                    dep, t0, t1 = d.group(1), loaded.get(d.group(1)), spawned.get(pid.group(1))
                    o = origin.get(dep, float("nan"))
                    if dep in hit:
                        out.setdefault(dep, []).append(("hit", o, *hit.pop(dep)))
                    elif t0 is not None and t1 is not None and t1 >= t0:
                        out.setdefault(dep, []).append(("spawn", o, t1 - t0, ts - t1))
                    else:
                        out.setdefault(dep, []).append(("other", o, float("nan"), float("nan")))
        return out

    def stop(self):
        self.procs.stop(self.proc)
        self.log_file.close()


def bare_deno(procs, app, deno_dir, entry="main.ts", fresh=False):
    """ms from spawning `deno run` of `app` (its node_modules installed) to
    its first 200; `fresh`: on an empty deno dir (no code cache)."""
    if fresh:
        shutil.rmtree(deno_dir, ignore_errors=True)
    port = free_port()
    start = time.perf_counter()
    p = procs.start([DENO, "run", "--cached-only", "--node-modules-dir=manual", "-A", entry],
                    cwd=app, env={"PORT": str(port), "DENO_DIR": deno_dir, "NO_COLOR": "1", "PATH": "/usr/bin:/bin"},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first_response(port)
        return (time.perf_counter() - start) * 1000
    finally:
        procs.stop(p, signal.SIGKILL)


def dist(xs):
    return f"{statistics.median(xs):.1f}", f"{percentile(xs, 99):.1f}", len(xs)


def fmt_bytes(n):
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def build_rounds(procs, binary, work, rounds, warm_per_round):
    """Per round a fresh data dir: the Hono app's first deploy (empty build
    cache), then `warm_per_round` changed copies, then a hello world."""
    first, warm, hello = [], [], []
    for r in range(rounds):
        serve = Serve(procs, binary, work, f"build{r}")
        try:
            serve.cli("projects", "create", "bh")
            app = os.path.join(work, f"build{r}-apps")
            t, _ = serve.deploy("bh", write_app(os.path.join(app, "h0"), HONO, f"build {r} copy 0"))
            first.append(t * 1000)
            for k in range(1, warm_per_round + 1):
                t, _ = serve.deploy("bh", write_app(os.path.join(app, f"h{k}"), HONO, f"build {r} copy {k}"))
                warm.append(t * 1000)
            t, _ = serve.deploy("bh", write_app(os.path.join(app, "w"), HELLO, f"build {r}"))
            hello.append(t * 1000)
            log(f"build round {r}: first {first[-1]:.0f} ms, warm {warm[-warm_per_round:]}")
        finally:
            serve.stop()
            shutil.rmtree(serve.data, ignore_errors=True)
            shutil.rmtree(serve.state, ignore_errors=True)
    return first, warm, hello


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    parser.add_argument("--n", type=int, default=20, help="deployments of each app")
    parser.add_argument("--rounds", type=int, default=3, help="fresh data dirs for the build times")
    parser.add_argument("--gap-ms", type=int, default=300, help="pause between two cold starts")
    parser.add_argument("--keep-log", help="copy the runner's log of the main run here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        log("not root: the runner starts without its namespaces and uids (figures not as in production)")
    load_start = os.getloadavg()[0]
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-builds-")
    os.chmod(work, 0o755)  # builds run as nobody; the CLI reads the apps as us
    serve = None
    try:
        # --- 2. build times, each round on a fresh data dir
        first, warm, hello_build = build_rounds(procs, args.binary, work, args.rounds, 2)

        # --- the bare deno reference: node_modules installed, cache warm
        bare_app = write_app(os.path.join(work, "bare-hono"), HONO, "bare")
        with open(os.path.join(bare_app, "node_http.ts"), "w") as f:
            # What the harness loaded first for every deployment with npm
            # packages before 19b8671 (now: only when needed).
            f.write('import "node:http";\nimport "./main.ts";\n')
        bare_hello = write_app(os.path.join(work, "bare-hello"), HELLO, "bare")
        bare_dir = os.path.join(work, "bare-deno-dir")
        cold_dir = os.path.join(work, "bare-deno-dir-cold")
        subprocess.run([DENO, "install", "--entrypoint", "main.ts", "--node-modules-dir=auto", "--quiet"],
                       cwd=bare_app, env={**os.environ, "DENO_DIR": bare_dir, "NO_COLOR": "1",
                                         "DENO_TLS_CA_STORE": "system,mozilla"},
                       check=True, timeout=300)
        for _ in range(2):  # its code cache too
            bare_deno(procs, bare_app, bare_dir)
            bare_deno(procs, bare_hello, bare_dir)

        # --- 1 and 3: N deployments of each app on one serve. Isolates idle
        # out after 2 s, so a second pass re-boots each deployment.
        idle_s = 2
        serve = Serve(procs, args.binary, work, "main", extra=("--idle-timeout-s", str(idle_s)))
        serve.cli("projects", "create", "phono")
        serve.cli("projects", "create", "phello")
        blobs = os.path.join(serve.data, "blobs")
        apps = os.path.join(work, "apps")
        hono, hello, deploy_hono = [], [], []
        for i in range(args.n):
            t, host = serve.deploy("phono", write_app(os.path.join(apps, f"hono{i}"), HONO, f"copy {i}"))
            hono.append(host)
            deploy_hono.append(t * 1000)
            if i == 0:
                blobs_1 = tree_size(blobs)
        blobs_n = tree_size(blobs)
        for i in range(args.n):
            _, host = serve.deploy("phello", write_app(os.path.join(apps, f"hello{i}"), HELLO, f"copy {i}"))
            hello.append(host)
        log(f"{2 * args.n} deployments ready; cold starts, {args.gap_ms} ms apart")
        time.sleep(3)  # the pre-started isolates are up
        gap = args.gap_ms / 1000
        names = ["hono", "hello", "bare_hono", "bare_hono_cold", "bare_hono_http_cold", "bare_hello",
                 "reboot_hono", "reboot_hello"]
        x = {k: [] for k in names}
        # Per request to the runner, the pre-started result its boot counted.
        results = {k: [] for k in ["hono", "hello", "reboot_hono", "reboot_hello"]}
        counted = [serve.prestarted()]

        def attribute(name):
            now = serve.prestarted()
            diff = [k for k, v in now.items() if v > counted[0].get(k, 0)]
            results[name].append(",".join(sorted(diff)) or "none")
            counted[0] = now

        for i in range(args.n):
            for name, measure in [
                ("hono", lambda: get(serve.port, hono[i])),
                ("hello", lambda: get(serve.port, hello[i])),
                ("bare_hono", lambda: bare_deno(procs, bare_app, bare_dir)),
                ("bare_hono_cold", lambda: bare_deno(procs, bare_app, cold_dir, fresh=True)),
                ("bare_hono_http_cold", lambda: bare_deno(procs, bare_app, cold_dir, "node_http.ts", fresh=True)),
                ("bare_hello", lambda: bare_deno(procs, bare_hello, bare_dir)),
            ]:
                x[name].append(measure())
                if name in results:
                    attribute(name)
                time.sleep(gap)
        boots_first = serve.boot_ms()
        time.sleep(idle_s + 3)  # every isolate idled out
        log("re-boots")
        counted[0] = serve.prestarted()
        for i in range(args.n):
            x["reboot_hono"].append(get(serve.port, hono[i]))
            attribute("reboot_hono")
            time.sleep(gap)
            x["reboot_hello"].append(get(serve.port, hello[i]))
            attribute("reboot_hello")
            time.sleep(gap)
        packages = os.path.join(serve.state, "packages")
        sets = [d for d in os.listdir(packages) if not d.startswith(".")] if os.path.isdir(packages) else []
        package_sets = len(sets)
        # The package store's mark: the harness loads node:http for this set.
        marked_http = sum(os.path.exists(os.path.join(packages, d, "node_modules/.isocloud-uses-node-http"))
                          for d in sets)
        metrics = serve.metrics()
        boots_all = serve.boot_ms(every=True)
        phases = serve.phases()
        prestarted = {m.group(1): int(float(m.group(2))) for m in
                      re.finditer(r'isocloud_prestarted_boots_total\{result="(\w+)"\} (\S+)', metrics)}
        with open(serve.log_path) as f:
            reasons = sorted({m.group(1) for m in
                              re.finditer(r'booting without a pre-started isolate.*?reason="?([^"\n]+)', f.read())})

        def ids(hosts):
            return [h.split(".")[0].split("-", 1)[1] for h in hosts]

        boot = {
            "hono_first": [boots_first[i] for i in ids(hono[:1]) if i in boots_first],
            "hono": [boots_first[i] for i in ids(hono[1:]) if i in boots_first],
            "hello": [boots_first[i] for i in ids(hello) if i in boots_first],
            "reboot_hono": [boots_all[i][1] for i in ids(hono) if len(boots_all.get(i, [])) > 1],
            "reboot_hello": [boots_all[i][1] for i in ids(hello) if len(boots_all.get(i, [])) > 1],
        }

        # --- the table
        n = args.n

        def row(label, xs, boot_ms=None, p99=True):
            b = f"{statistics.median(boot_ms):.0f}" if boot_ms else "–"
            p = f"{percentile(xs, 99):.1f} ms" if p99 and len(xs) > 1 else "–"
            print(f"| {label} | {statistics.median(xs):.1f} ms | {p} | {len(xs)} | {b} |")

        hono_rest = x["hono"][1:] or x["hono"]
        print(f"\nisocloud serve, {n} never-seen deployments of each app, first request each (new connection, "
              f"to the end of the body), {args.gap_ms} ms apart, interleaved with the bare deno starts; "
              f"{os.cpu_count()} cores\n")
        print("| figure | p50 | p99 | n | runner boot_ms p50 (log) |")
        print("| --- | --- | --- | --- | --- |")
        row("cold start, Hono, the first (its package set laid out)", x["hono"][:1], boot["hono_first"])
        row("cold start, Hono, the others (set already laid out)", hono_rest, boot["hono"])
        row("cold start, hello world", x["hello"], boot["hello"])
        row("bare `deno run` of the Hono app, warm cache, spawn → first 200", x["bare_hono"])
        row("bare `deno run` of the Hono app, empty deno dir (no code cache)", x["bare_hono_cold"])
        row("… and `import \"node:http\"` first (the harness for npm before 19b8671), empty deno dir",
            x["bare_hono_http_cold"])
        row("bare `deno run` of the hello world, warm cache", x["bare_hello"])
        row(f"re-boot, Hono (its isolate idled out after {idle_s} s)", x["reboot_hono"],
            boot["reboot_hono"])
        row("re-boot, hello world", x["reboot_hello"], boot["reboot_hello"])
        row("build: Hono, first deploy (fresh data dir, empty build cache)", first, p99=False)
        row("build: Hono, redeploy of a changed copy (registry cache warm)", warm)
        row(f"build: Hono, deploys 2..{n} of the main run", deploy_hono[1:] or deploy_hono)
        row("build: hello world deploy (no packages)", hello_build, p99=False)
        print(f"| blobs after 1 Hono deployment | {fmt_bytes(blobs_1[0])}, {blobs_1[1]} files | | | |")
        print(f"| blobs after {n} Hono deployments | {fmt_bytes(blobs_n[0])}, {blobs_n[1]} files "
              f"(+{(blobs_n[0] - blobs_1[0]) / max(1, n - 1):.0f} bytes, "
              f"+{(blobs_n[1] - blobs_1[1]) / max(1, n - 1):.1f} files per deployment) | | | |")
        print(f"| package sets laid out on the runner | {package_sets} "
              f"({marked_http} marked as using node:http) | | | |")
        m = statistics.median
        print(f"\nHono p50 / hello world p50: {m(hono_rest) / m(x['hello']):.2f}x (target ≤ 1.5x); "
              f"Hono p50 / bare deno (warm cache) p50: {m(hono_rest) / m(x['bare_hono']):.2f}x (target < 1)")
        # What Hono itself costs over a hello world (evaluating its modules,
        # building its router on the first request), as bare deno shows it,
        # against what it costs through the runner: the runner's own share
        # of the gap is the difference.
        bare_gap = m(x["bare_hono"]) - m(x["bare_hello"])
        runner_gap = m(hono_rest) - m(x["hello"])
        print(f"Hono − hello world, p50: {runner_gap:.1f} ms through the runner, {bare_gap:.1f} ms under bare deno "
              f"(a runner adding nothing of its own for Hono would be at "
              f"{(m(x['hello']) + bare_gap) / m(x['hello']):.2f}x)")
        hono_ids, hello_ids = ids(hono), ids(hello)
        print("\nBoots from the runner's log (p50 ms); spawn: a deno of its own (a = loaded → deno spawned: "
              "package set, files, cgroup; b = deno spawned → ready); hit: a pre-started isolate "
              "(a = filling its files; b = assigned → ready):\n")
        print("| boot | kind | loading the deployment (origin) | a | b | n |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, nth, picked_ids in [
            ("Hono, never seen, the first", 0, hono_ids[:1]),
            ("Hono, never seen, the others", 0, hono_ids[1:]),
            ("Hono, re-boot", 1, hono_ids),
            ("hello world, never seen", 0, hello_ids),
            ("hello world, re-boot", 1, hello_ids),
        ]:
            boots = [phases[i][nth] for i in picked_ids if len(phases.get(i, [])) > nth]
            for kind in ["spawn", "hit", "other"]:
                picked = [p for p in boots if p[0] == kind]
                if picked:
                    print(f"| {label} | {kind} | {m(p[1] for p in picked):.1f} | {m(p[2] for p in picked):.1f} "
                          f"| {m(p[3] for p in picked):.1f} | {len(picked)} |")

        def tally(labels):
            return ", ".join(f"{count} {label}" for label, count in
                             sorted({lb: labels.count(lb) for lb in labels}.items()))

        print("\npre-started result per boot (from the metrics after each request):\n")
        print(f"- Hono, the first: {tally(results['hono'][:1])}")
        print(f"- Hono, the others: {tally(results['hono'][1:])}")
        print(f"- hello world: {tally(results['hello'])}")
        print(f"- re-boot, Hono: {tally(results['reboot_hono'])}")
        print(f"- re-boot, hello world: {tally(results['reboot_hello'])}")
        print(f"\npre-started boots: {json.dumps(prestarted)}; reasons for none: {reasons}")
        print(f"load average at the start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f}")
    finally:
        if serve is not None:
            serve.stop()
            if args.keep_log:
                shutil.copy(serve.log_path, args.keep_log)
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
