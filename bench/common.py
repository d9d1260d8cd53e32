"""What every benchmark script shares: where deno is, the hello-world handler
deno serves directly, percentiles, a free port, one timed request, starting
the runner (waiting for its `listening on` line), the process groups a script
starts and kills, CPU and memory read from /proc, wrk runs, and bare deno.
Every script imports its helpers from here (and subhost.py's origin), never
from `suite.py`, which only orchestrates the suite."""
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENO = os.path.join(ROOT, ".isocloud/deno/bin/deno")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Pre-started isolates per sandbox profile (the runner's default).
PRESTARTED = 2
HANDLER = 'Deno.serve({ port: Number(Deno.env.get("PORT") ?? 8000), onListen() {} }, () => new Response("Hello, world!"));\n'


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(samples, p):
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def get(port, host, path="/", timeout=60, headers=None):
    """One request on a fresh connection; ms to the end of the body."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    elapsed = (time.perf_counter() - start) * 1000
    if response.status != 200:
        raise RuntimeError(f"unexpected {response.status} from {host}: {body[:300]!r}")
    return elapsed


def start_runner(argv, log="warn", stderr=subprocess.DEVNULL, spawn=subprocess.Popen):
    """`argv` (an isocloud command listening on port 0); returns (process,
    port) once it printed `listening on`. `spawn` lets a caller track the
    process (the suite kills its groups)."""
    runner = spawn(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                   env={**os.environ, "ISOCLOUD_LOG": log, "NO_COLOR": "1"})
    line = ""
    while "listening on" not in line:
        line = runner.stdout.readline()
        if not line:
            runner.kill()
            raise SystemExit("the runner did not start")
    return runner, int(line.rsplit(":", 1)[1])


def start_apps_runner(binary, apps, state_dir, extra=(), log="warn", stderr=subprocess.DEVNULL,
                      spawn=subprocess.Popen):
    """`isocloud serve --apps APPS` on a free port; returns (process, port)."""
    return start_runner(
        [binary, "serve", "--apps", apps, "--listen", "127.0.0.1:0", "--state-dir", state_dir, "--deno", DENO,
         *extra],
        log=log, stderr=stderr, spawn=spawn)


# ---------------------------------------------------------------- processes

def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def first_response(port, deadline_s=30):
    """Poll until something answers 200 on port; used for process-start timings."""
    end = time.time() + deadline_s
    while time.time() < end:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/")
            r = conn.getresponse()
            r.read()
            conn.close()
            if r.status == 200:
                return
        except OSError:
            time.sleep(0.001)
    raise RuntimeError(f"nothing answered on {port}")


class Procs:
    """Every process a script starts, each in its own process group, so
    that everything is killed at the end whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, argv, **kw):
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=15):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left of the group (children that outlived it)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p)


def read_stat(path):
    """A /proc `stat` file as (comm, the fields after it), or None when the
    process or thread is gone. `rest[1]` is the ppid, `rest[11]`/`rest[12]`
    utime/stime in ticks."""
    try:
        with open(path) as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def proc_table():
    """pid -> (ppid, comm) for every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := read_stat(f"/proc/{entry}/stat")):
            comm, rest = stat
            table[int(entry)] = (int(rest[1]), comm)
    return table


def descendants(pid):
    table = proc_table()
    children = {}
    for p, (pp, _) in table.items():
        children.setdefault(pp, []).append(p)
    out, stack = [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append((c, table[c][1]))
            stack.append(c)
    return out


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    rest = stat[stat.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # utime + stime


def private_kib(pid):
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except OSError:
        return None
    return total


# ---------------------------------------------------------------- load

def ensure_wrk():
    if shutil.which("wrk"):
        return shutil.which("wrk")
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing wrk (Debian package)")
        if subprocess.call(["apt-get", "install", "-y", "wrk"], stdout=subprocess.DEVNULL) != 0:
            subprocess.call(["apt-get", "update"], stdout=subprocess.DEVNULL)
            subprocess.check_call(["apt-get", "install", "-y", "wrk"], stdout=subprocess.DEVNULL)
        return shutil.which("wrk")
    raise SystemExit("wrk is missing: sudo apt-get install -y wrk (or run bench/install.sh)")


WRK_LUA = """
local hosts = {%(hosts)s}
local reqs = {}
local idx = 0
local delay_ms = %(delay)d
function init(args)
  for i, h in ipairs(hosts) do reqs[i] = wrk.format("GET", "/", {Host = h}) end
  idx = math.random(#reqs) - 1
end
function request()
  idx = idx %% #reqs + 1
  return reqs[idx]
end
if delay_ms > 0 then
  function delay() return delay_ms end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d,"errors":%%d,"status_errors":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


class Wrk:
    def __init__(self, binary, work):
        self.binary = binary
        self.work = work
        self.n = 0

    def run(self, port, hosts, seconds, threads=2, conns=32, delay_ms=0, watch=()):
        """One wrk run; returns its figures plus the CPU ticks each pid of
        `watch` used during it."""
        self.n += 1
        script = os.path.join(self.work, f"wrk{self.n}.lua")
        with open(script, "w") as f:
            f.write(WRK_LUA % {"hosts": ", ".join(json.dumps(h) for h in hosts), "delay": delay_ms})
        before = {pid: cpu_ticks(pid) for pid in watch}
        out = subprocess.run(
            [self.binary, f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s",
             "-s", script, f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, timeout=seconds + 60)
        after = {pid: cpu_ticks(pid) for pid in watch}
        line = [l for l in out.stdout.splitlines() if l.startswith("BENCHJSON ")]
        if not line:
            raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
        r = json.loads(line[0][len("BENCHJSON "):])
        r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
        r["cpu_s"] = {pid: (after[pid] - before[pid]) / CLK_TCK for pid in watch}
        return r


# ---------------------------------------------------------------- targets

class Runner:
    def __init__(self, procs, binary, apps, state, max_isolates, idle_timeout_s=3600, extra=()):
        self.procs = procs
        self.proc, self.port = start_apps_runner(
            binary, apps, state,
            ["--cpu-limit-ms", "1000", "--max-isolates", str(max_isolates), "--idle-timeout-s", str(idle_timeout_s),
             "--prestarted-isolates", str(PRESTARTED), *extra],
            spawn=procs.start)
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain

    def isolates(self):
        return [pid for pid, comm in descendants(self.proc.pid) if comm == "deno"]


def deno_direct(procs, app_dir, deno_dir):
    port = free_port()
    p = procs.start(
        [DENO, "run", "--no-config", "--allow-net", "--allow-env", os.path.join(app_dir, "main.ts")],
        env={"PORT": str(port), "DENO_DIR": deno_dir, "NO_COLOR": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, port


def ensure_proxies():
    """haproxy and nginx (Debian packages), installed when missing and root."""
    missing = [tool for tool in ("haproxy", "nginx") if not (shutil.which(tool) or os.path.exists(f"/usr/sbin/{tool}"))]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {' '.join(missing)}: sudo apt-get install -y {' '.join(missing)}")
    if subprocess.run(["apt-get", "install", "-y", *missing], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, check=True)
        subprocess.run(["apt-get", "install", "-y", *missing], capture_output=True, check=True)


def deno_on_socket(procs, app_dir, deno_dir, socket_path, deno_flags=()):
    """deno serving the handler of `app_dir` on a unix socket (what sits
    behind a proxy hop, as an isolate sits behind the runner); `deno_flags`
    go before the module (`--v8-flags=...`)."""
    source = open(os.path.join(app_dir, "main.ts")).read()
    served = os.path.join(deno_dir, "socket_main.ts")
    os.makedirs(deno_dir, exist_ok=True)
    with open(served, "w") as f:
        f.write(source.replace('{ port: Number(Deno.env.get("PORT") ?? 8000), onListen() {} }',
                               f"{{ path: {json.dumps(socket_path)}, onListen() {{}} }}"))
    p = procs.start([DENO, "run", "--no-config", "-A", *deno_flags, served], env={"DENO_DIR": deno_dir, "NO_COLOR": "1"},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not os.path.exists(socket_path):
        if time.time() > deadline or p.poll() is not None:
            raise SystemExit(f"deno did not listen on {socket_path}")
        time.sleep(0.05)
    return p


def haproxy_hop(procs, work, socket_path):
    """haproxy 2.6, one thread, HTTP mode, connections to the socket reused:
    (process, port)."""
    port = free_port()
    config = os.path.join(work, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(f"""global
    nbthread 1
    maxconn 8192
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend public
    bind 127.0.0.1:{port}
    default_backend deno
backend deno
    server handler {socket_path} maxconn 1024
""")
    p = procs.start(["haproxy", "-db", "-f", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_response(port)
    return p, port


def nginx_hop(procs, work, socket_path):
    """nginx, one worker, upstream keep-alive to the socket: (master
    process, port); its worker is the master's child."""
    port = free_port()
    prefix = os.path.join(work, "nginx")
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    config = os.path.join(prefix, "nginx.conf")
    with open(config, "w") as f:
        f.write(f"""{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    upstream deno {{ server unix:{socket_path}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://deno;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")
    p = procs.start(["nginx", "-p", prefix, "-c", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_response(port)
    return p, port


def big_module(size):
    """Plain JS of about `size` bytes: functions and data a bundler would emit."""
    parts, total, i = [], 0, 0
    while total < size:
        chunk = (f"export function f{i}(x) {{ const t = [{i}, {i * 7 % 13}, \"s{i}-lorem ipsum dolor sit amet\"]; "
                 f"return x + t[0] * t[1] + t[2].length; }}\n")
        parts.append(chunk)
        total += len(chunk)
        i += 1
    return "".join(parts), i
