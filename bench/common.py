"""What every benchmark script shares: where deno is, the hello-world handler
deno serves directly, percentiles, a free port, one timed request, and
starting the runner (waiting for its `listening on` line)."""
import http.client
import os
import socket
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENO = os.path.join(ROOT, ".isocloud/deno/bin/deno")
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
