#!/usr/bin/env python3
"""How exactly the memory cap holds: ArrayBuffer and heap bombs against
`--memory-limit-mb`, for a few limits.

    python3 bench/memory_limit.py [--limits 128,256,512] [--binary PATH]

For each limit one runner (apps mode, every sandbox layer a root runner has)
serves a deployment whose handler allocates in 8 MiB steps, touching every
page, and logs the total after each step, until the isolate is killed. The
table shows the peak the kernel charged the isolate's memory cgroup (the
`memory_limit` event's `used`), the limit, and how much the tenant had
allocated when it died (its baseline — deno, V8, the harness — is the
difference). Loopback only; stops by itself.
"""
import argparse
import http.client
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from common import ROOT, start_apps_runner

APP = """
Deno.serve(async (req) => {
  const kind = new URL(req.url).pathname.slice(1);
  const keep = [];
  let mib = 0;
  for (;;) {
    if (kind === "arraybuffer") {
      const buffer = new Uint8Array(8 << 20);
      for (let i = 0; i < buffer.length; i += 4096) buffer[i] = 1;
      keep.push(buffer);
    } else {
      const strings = [];
      for (let i = 0; i < (8 << 20) / 64; i++) strings.push({ i, s: "x".repeat(16) + i });
      keep.push(strings);
    }
    mib += 8;
    console.log(`allocated ${mib}`);
    // Let the log line out before the next step (the kill comes mid-step).
    await new Promise((resolve) => setTimeout(resolve, 0));
  }
});
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limits", default="128,256,512")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="isocloud-memory-bench-")
    apps = os.path.join(work, "apps")
    os.makedirs(os.path.join(apps, "bomb"))
    with open(os.path.join(apps, "bomb", "main.ts"), "w") as f:
        f.write(APP)
    rows = []
    for limit in [int(x) for x in args.limits.split(",")]:
        runner, port = start_apps_runner(
            args.binary, apps, os.path.join(work, f"state-{limit}"),
            ["--memory-limit-mb", str(limit), "--cpu-limit-ms", "600000", "--request-timeout-s", "120"],
            log="info,isocloud::tenant=info", stderr=subprocess.PIPE)
        log = []
        threading.Thread(target=lambda: log.extend(iter(runner.stderr.readline, "")), daemon=True).start()
        try:
            for kind in ("arraybuffer", "heap"):
                del log[:]
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conn.request("GET", f"/{kind}", headers={"Host": "bomb.localhost"})
                response = conn.getresponse()
                response.read()
                code = response.getheader("x-isocloud-error")
                deadline = time.time() + 10
                used = None
                while used is None and time.time() < deadline:
                    for entry in list(log):
                        m = re.search(r"MemoryLimit \{ limit: (\d+), used: (\d+) \}", entry)
                        if m:
                            used = int(m.group(2))
                    time.sleep(0.1)
                allocated = max([int(m.group(1)) for m in (re.search(r"allocated (\d+)", e) for e in log) if m] or [0])
                rows.append((limit, kind, response.status, code, used, allocated))
        finally:
            runner.send_signal(signal.SIGTERM)
            runner.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)
    print("| limit MiB | bomb | answer | cgroup peak MiB | peak / limit | tenant allocated MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for limit, kind, status, code, used, allocated in rows:
        peak = f"{used / (1 << 20):.1f}" if used else "?"
        ratio = f"{used / (limit << 20):.3f}" if used else "?"
        print(f"| {limit} | {kind} | {status} {code} | {peak} | {ratio} | {allocated} |")


if __name__ == "__main__":
    main()
