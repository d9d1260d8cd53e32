#!/usr/bin/env python3
"""Soak: a runner under mixed load with faults for a chosen length, its
resources sampled, and the slope of each after warm-up.

Beside ordinary tenants (a hello world each) run the ones that misbehave:
a handler that spins (CPU kill every request), one that holds too much
memory (memory kill), a boot that throws, a slow answer, a streamed answer
the client abandons half-way, a WebSocket held open and dropped, and one
that opens extra connections to its own control socket. The runner has a
small `--max-isolates` and a short idle timeout, so isolates come and go
all the time (LRU evictions, idle stops, kills).

Every few seconds it samples the runner's resident memory, descriptors,
threads, async tasks, child processes, isolate cgroups and state-dir
entries (/proc and the runner's /metrics), and at the end prints each
figure's start, end and least-squares slope per hour after warm-up, the
ordinary tenants' throughput in the first and last tenth, and every wrong
answer an ordinary tenant got (there must be none).

    python3 bench/soak.py --minutes 10 [--binary target/release/isocloud]
        [--binary OLD --binary NEW]   # one after the other, same load
"""
import argparse
import base64
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, start_apps_runner  # noqa: E402

ORDINARY = 24
TENANTS = {
    "spin": "Deno.serve(() => { while (true) {} });",
    "hog": """
const kept = [];
Deno.serve(() => {
  for (let i = 0; i < 4; i++) { const b = new Uint8Array(32 << 20); b.fill(1); kept.push(b); }
  return new Response(String(kept.length));
});
""",
    "throw": 'throw new Error("boom at boot");',
    "slow": 'Deno.serve(async () => { await new Promise((r) => setTimeout(r, 500)); return new Response("slow"); });',
    "stream": """
Deno.serve(() => {
  let sent = 0;
  const body = new ReadableStream({
    async pull(controller) {
      if (sent >= 64) { controller.close(); return; }
      await new Promise((r) => setTimeout(r, 10));
      controller.enqueue(new Uint8Array(16 * 1024));
      sent++;
    },
  });
  return new Response(body);
});
""",
    "ws": """
Deno.serve((req) => {
  if (req.headers.get("upgrade") !== "websocket") return new Response("ws only", { status: 400 });
  const { socket, response } = Deno.upgradeWebSocket(req);
  socket.onmessage = (e) => socket.send(e.data);
  return response;
});
""",
    "grabber": """
const held = [];
Deno.serve(async () => {
  for (let i = 0; i < 20; i++) {
    try { held.push(await Deno.connect({ transport: "unix", path: "/isocloud/run/control.sock" })); } catch { break; }
  }
  return new Response(String(held.length));
});
""",
}


def make_apps(root):
    for i in range(ORDINARY):
        os.makedirs(os.path.join(root, f"ok{i}"))
        with open(os.path.join(root, f"ok{i}", "main.js"), "w") as f:
            f.write(f'Deno.serve(() => new Response("ok{i}"));\n')
    for name, code in TENANTS.items():
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "main.js"), "w") as f:
            f.write(code)


def request(port, host, path="/", timeout=30, read=True):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        if not read:
            response.read(4096)  # half-way at most, then walk away
            return response.status, b""
        return response.status, response.read()
    finally:
        conn.close()


def websocket_once(port):
    """Opens a WebSocket to the ws tenant, sends one frame, drops it."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((f"GET / HTTP/1.1\r\nHost: ws.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        s.recv(4096)
        mask = os.urandom(4)
        payload = b"hi"
        s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        time.sleep(random.uniform(0.1, 2.0))


class Load:
    def __init__(self, port, seconds):
        self.port = port
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.ok_times = []  # (monotonic, ms) of ordinary answers
        self.wrong = []
        self.faults = {}

    def ordinary(self):
        while time.monotonic() < self.deadline:
            i = random.randrange(ORDINARY)
            start = time.monotonic()
            try:
                status, body = request(self.port, f"ok{i}.localhost")
                good = status == 200 and body == f"ok{i}".encode()
                what = f"{status} {body[:120]!r}"
            except Exception as e:  # noqa: BLE001 - every failure is a wrong answer
                good, what = False, repr(e)
            now = time.monotonic()
            with self.lock:
                if good:
                    self.ok_times.append((now, (now - start) * 1000))
                else:
                    self.wrong.append(f"ok{i}: {what}")

    def faulty(self):
        kinds = ["spin", "hog", "throw", "slow", "stream", "ws", "grabber"]
        while time.monotonic() < self.deadline:
            kind = random.choice(kinds)
            try:
                if kind == "ws":
                    websocket_once(self.port)
                    status = 101
                else:
                    status, _ = request(self.port, f"{kind}.localhost", read=kind != "stream")
            except Exception:  # noqa: BLE001 - faults are expected to fail
                status = "error"
            with self.lock:
                key = f"{kind} {status}"
                self.faults[key] = self.faults.get(key, 0) + 1
            time.sleep(0.05)


def count(path):
    try:
        return len(os.listdir(path))
    except OSError:
        return 0


def metric(port, name):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return len(out.split())


def sample(runner_pid, admin_port, state_dir):
    status = open(f"/proc/{runner_pid}/status").read()
    field = lambda name: int(next(l.split()[1] for l in status.splitlines() if l.startswith(name + ":")))  # noqa: E731
    isolates_dirs = [d for d in os.listdir(state_dir) if d.startswith("isolates-")]
    return {
        "rss_mb": field("VmRSS") / 1024,
        "fds": count(f"/proc/{runner_pid}/fd"),
        "threads": field("Threads"),
        "tasks": metric(admin_port, "isocloud_runtime_alive_tasks"),
        "isolate_tasks": metric(admin_port, "isocloud_isolate_tasks"),
        "children": children(runner_pid),
        "cgroups": metric(admin_port, "isocloud_isolate_cgroups"),
        "state_entries": sum(count(os.path.join(state_dir, d)) for d in isolates_dirs) + count(state_dir),
        "live": metric(admin_port, "isocloud_live_isolates"),
    }


def slope_per_hour(points):
    """Least-squares slope of (t seconds, value) points, per hour."""
    points = [(t, v) for t, v in points if v is not None]
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 3600


def soak(binary, minutes, interval_s, clients):
    seconds = minutes * 60
    with tempfile.TemporaryDirectory() as apps, tempfile.TemporaryDirectory() as state:
        make_apps(apps)
        admin_port = free_admin_port()
        runner, port = start_apps_runner(binary, apps, state, extra=[
            "--admin-listen", f"127.0.0.1:{admin_port}", "--max-isolates", "12", "--idle-timeout-s", "3",
            "--cpu-limit-ms", "50", "--memory-limit-mb", "96", "--boot-timeout-s", "5",
        ])
        try:
            load = Load(port, seconds)
            threads = [threading.Thread(target=load.ordinary, daemon=True) for _ in range(clients)]
            threads += [threading.Thread(target=load.faulty, daemon=True) for _ in range(2)]
            start = time.monotonic()
            for t in threads:
                t.start()
            samples = []
            while time.monotonic() - start < seconds:
                time.sleep(interval_s)
                samples.append((time.monotonic() - start, sample(runner.pid, admin_port, state)))
                s = samples[-1][1]
                print(f"  t={samples[-1][0]:7.0f}s rss={s['rss_mb']:.0f}MB fds={s['fds']} threads={s['threads']} "
                      f"tasks={s['tasks']} children={s['children']} cgroups={s['cgroups']} "
                      f"state={s['state_entries']} live={s['live']} ok={len(load.ok_times)} wrong={len(load.wrong)}",
                      flush=True)
            for t in threads:
                t.join(timeout=40)
            time.sleep(5)  # idle timeout + reaper: every isolate gone
            final = sample(runner.pid, admin_port, state)
        finally:
            runner.terminate()
            try:
                runner.wait(timeout=20)
            except subprocess.TimeoutExpired:
                runner.kill()
    return load, samples, final, seconds


def free_admin_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(binary, load, samples, final, seconds):
    warm = [(t, s) for t, s in samples if t >= seconds * 0.2]
    print(f"\n## {binary}: {seconds / 60:.0f} min, {len(samples)} samples (slopes after the first fifth)\n")
    print("| figure | after warm-up | end of load | 5 s after the load | slope per hour |")
    print("| --- | --- | --- | --- | --- |")
    for key in ["rss_mb", "fds", "threads", "tasks", "isolate_tasks", "children", "cgroups", "state_entries"]:
        first = warm[0][1][key] if warm else None
        last = warm[-1][1][key] if warm else None
        slope = slope_per_hour([(t, s[key]) for t, s in warm])
        shown = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
        print(f"| {key} | {shown(first)} | {shown(last)} | {shown(final[key])} | {slope:+.1f} |")
    tenth = seconds / 10
    t0 = min((t for t, _ in load.ok_times), default=0)
    first = sum(1 for t, _ in load.ok_times if t - t0 < tenth) / tenth
    last = sum(1 for t, _ in load.ok_times if t - t0 >= seconds - tenth) / tenth
    ratio = last / first if first else 0
    print(f"\nordinary answers: {len(load.ok_times)}, wrong: {len(load.wrong)}; "
          f"throughput first tenth {first:.0f}/s, last tenth {last:.0f}/s ({ratio:.2f}x)")
    for line in load.wrong[:10]:
        print(f"  wrong: {line}")
    print("faults: " + json.dumps(dict(sorted(load.faults.items()))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", action="append", help="isocloud binary (repeat to compare)")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--interval-s", type=float, default=5)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "target/release/isocloud")]
    for binary in binaries:
        load, samples, final, seconds = soak(binary, args.minutes, args.interval_s, args.clients)
        report(binary, load, samples, final, seconds)


if __name__ == "__main__":
    main()
