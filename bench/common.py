"""What every benchmark script shares: where deno is, the hello-world handler
deno serves directly, percentiles, a free port, and starting the runner on a
folder of apps (waiting for its `listening on` line)."""
import os
import socket
import subprocess

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


def start_apps_runner(binary, apps, state_dir, extra=(), log="warn", stderr=subprocess.DEVNULL,
                      spawn=subprocess.Popen):
    """`isocloud serve --apps APPS` on a free port; returns (process, port).
    `spawn` lets a caller track the process (the suite kills its groups)."""
    runner = spawn(
        [binary, "serve", "--apps", apps, "--listen", "127.0.0.1:0", "--state-dir", state_dir, "--deno", DENO,
         *extra],
        stdout=subprocess.PIPE, stderr=stderr, text=True,
        env={**os.environ, "ISOCLOUD_LOG": log, "NO_COLOR": "1"},
    )
    line = ""
    while "listening on" not in line:
        line = runner.stdout.readline()
        if not line:
            runner.kill()
            raise SystemExit("the runner did not start")
    return runner, int(line.rsplit(":", 1)[1])
