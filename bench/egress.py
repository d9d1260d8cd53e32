#!/usr/bin/env python3
"""Egress proxy throughput: an isolate downloading from a loopback server,
through the runner's egress proxy and, in the same run, directly.

    python3 bench/egress.py [--mb 64] [--runs 7] [--binary PATH]

Two runners serve the same app, one with `--egress-proxy on` (the default),
one with `--egress-proxy off`. Each run asks the app to `fetch` --mb MiB
from a Python HTTP server on loopback and read it to the end; the app
answers how long that took inside the isolate. Prints MB/s (median, p10)
for both and the ratio. Loopback only; stops by itself.
"""
import argparse
import http.client
import http.server
import json
import os
import shutil
import signal
import statistics
import tempfile
import threading

from common import ROOT, start_apps_runner

APP = """
Deno.serve(async (req) => {
  const target = new URL(req.url).searchParams.get("target");
  const started = performance.now();
  const res = await fetch(target);
  let bytes = 0;
  for await (const chunk of res.body) bytes += chunk.length;
  return Response.json({ bytes, ms: performance.now() - started });
});
"""
CHUNK = b"x" * (1 << 20)


class Source(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        mib = int(self.path.strip("/"))
        self.send_response(200)
        self.send_header("content-length", str(mib << 20))
        self.end_headers()
        for _ in range(mib):
            self.wfile.write(CHUNK)

    def log_message(self, *args):
        pass


def start_runner(binary, work, name, proxy):
    apps = os.path.join(work, f"apps-{name}")
    os.makedirs(os.path.join(apps, "egress"))
    with open(os.path.join(apps, "egress", "main.ts"), "w") as f:
        f.write(APP)
    return start_apps_runner(
        binary, apps, os.path.join(work, f"state-{name}"), ["--cpu-limit-ms", "60000", "--egress-proxy", proxy])


def download(port, target):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", f"/?target={target}", headers={"Host": "egress.localhost"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise SystemExit(f"{response.status}: {body[:200]!r}")
    return json.loads(body)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/isocloud"))
    args = parser.parse_args()
    source = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Source)
    threading.Thread(target=source.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{source.server_address[1]}/{args.mb}"
    work = tempfile.mkdtemp(prefix="isocloud-egress-bench-")
    runners = {}
    try:
        for name, proxy in (("proxy", "on"), ("direct", "off")):
            runners[name] = start_runner(args.binary, work, name, proxy)
        rates = {name: [] for name in runners}
        for name, (_, port) in runners.items():
            download(port, target)  # boot and warm up
        for _ in range(args.runs):
            for name, (_, port) in runners.items():  # interleaved: same noise for both
                result = download(port, target)
                assert result["bytes"] == args.mb << 20, result
                rates[name].append(result["bytes"] / (1 << 20) / (result["ms"] / 1000))
    finally:
        for runner, _ in runners.values():
            runner.send_signal(signal.SIGTERM)
            runner.wait(timeout=30)
        source.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"isolate fetch of {args.mb} MiB from loopback, {args.runs} runs each")
    print("| path | median MB/s | p10 MB/s |")
    print("| --- | --- | --- |")
    for name, values in rates.items():
        values.sort()
        print(f"| {name} | {statistics.median(values):.0f} | {values[len(values) // 10]:.0f} |")
    ratio = statistics.median(rates["proxy"]) / statistics.median(rates["direct"])
    print(f"through the proxy: {ratio:.2f}x of direct")


if __name__ == "__main__":
    main()
