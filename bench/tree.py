#!/usr/bin/env python3
"""First-request latency with a slow `read_tree`, in subhosting mode (#18
item 1): one or more runner binaries (say, before and after the tree became
lazy), each its own `isocloud runner` against one loopback origin whose
`read_tree` answers `--tree-delay-ms` late (every other RPC at once).

    python3 bench/tree.py --binary A --binary B [--n 20] [--tree-delay-ms 1000] [--gap-ms 300]
                          [--prestarted-isolates N]

Two deployment kinds, each a never-seen deployment with a never-seen ESZIP
layer per request, sent interleaved (request j of each kind to each binary,
`--gap-ms` apart, about one pre-started refill):
  * reads no file: `Deno.serve(() => new Response("ok"))`;
  * reads a file: the handler answers `Deno.readTextFile("data.txt")`, a
    file of the tree (`read_tree`, then `read_blob` for its bytes).
Figures: the first request on a new connection to the end of the body,
p50 / p99 of those that got the expected body; how many did not (status
and body of the first such answer printed below the table); how many
`read_tree` calls the deployments caused; the `boot_ms` the runner
reported. One uncounted deployment per binary first (the runner's own first
boot). `--prestarted-isolates` is passed to every runner when given. See
docs/benchmarks.md.
"""
import argparse
import http.client
import http.server
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Procs, ROOT, percentile  # noqa: E402
from subhost import build_eszip, start_subhost_runner, token  # noqa: E402

IDLE_TIMEOUT_S = 2
FILE_ID = "blob-data"
FILE_TEXT = "from a file"
KINDS = {
    # kind: (main.ts, the body the first request must get)
    "reads no file": ('Deno.serve(() => new Response("ok"));\n', "ok"),
    "reads a file": ('Deno.serve(async () => new Response(await Deno.readTextFile("data.txt")));\n', FILE_TEXT),
}
TREE = json.dumps({"entries": {
    "": {"kind": "directory"},
    "/data.txt": {"kind": "file", "size": len(FILE_TEXT), "hash": FILE_ID},
}}).encode()


class TreeOrigin:
    """deployments: {deployment_id: layer_id}; layers: {layer_id: eszip
    bytes}. read_tree answers `tree_delay_ms` late; boot, layer, read_blob
    and report_activity at once. Counts read_tree calls per deployment and
    keeps each boot event's `boot_ms`."""

    def __init__(self, tree_delay_ms):
        self.deployments = {}
        self.layers = {}
        self.tree_delay_s = tree_delay_ms / 1000
        self.tree_calls = {}
        self.boot_ms = {}
        self.lock = threading.Lock()
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # head and body are two writes (see subhost.py)

            def log_message(self, *args):
                pass

            def answer(self, status, body=b"", headers=()):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                rpc = url.path.rsplit("/", 1)[-1]
                deployment = query.get("deployment_id", "")
                layer_id = origin.deployments.get(deployment)
                if layer_id is None:
                    return self.answer(404, b"no such deployment")
                if rpc == "boot":
                    config = {"entrypoint": "file:///src/main.ts", "layers": [{"kind": "eszip", "id": layer_id}],
                              "permissions": {"net": False}}
                    return self.answer(200, headers=[("x-deno-config", json.dumps(config))])
                if rpc == "layer" and query.get("layer_id") in origin.layers:
                    return self.answer(200, origin.layers[query["layer_id"]])
                if rpc == "read_tree":
                    with origin.lock:
                        origin.tree_calls[deployment] = origin.tree_calls.get(deployment, 0) + 1
                    time.sleep(origin.tree_delay_s)
                    return self.answer(200, TREE, [("content-type", "application/json")])
                if rpc == "read_blob" and query.get("file_id") == FILE_ID:
                    return self.answer(200, FILE_TEXT.encode())
                self.answer(404, b"unknown")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                self.answer(204)
                for event in json.loads(body).get("events", []):
                    if event.get("type") == "boot":
                        origin.boot_ms[event["deployment_id"]] = event["boot_ms"]

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def rpc_root(self):
        return f"http://127.0.0.1:{self.port}/v0/"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def first_get(port, deployment_id, expected):
    """One relay-signed request on a new connection: (ms to the end of the
    body, None if the body is `expected` else what came instead)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/", headers={"Host": "bench.example", "x-deno-subhost": token(deployment_id)})
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
    finally:
        conn.close()
    elapsed = (time.perf_counter() - start) * 1000
    if response.status != 200 or body != expected:
        return elapsed, f"{response.status} {body[:200]!r}, expected {expected!r}"
    return elapsed, None


def measure(procs, binaries, origin, eszips, n, gap_s, work, extra=()):
    """Per binary: {kind: ([ms of right answers], [what the wrong ones were])}."""
    runners = [start_subhost_runner(b, origin, os.path.join(work, f"state{k}"), spawn=procs.start,
                                    extra=["--idle-timeout-s", str(IDLE_TIMEOUT_S), *extra])[1]
               for k, b in enumerate(binaries)]
    time.sleep(3)  # the pre-started isolates are up

    def deploy(name, kind):
        origin.layers[name] = eszips[kind]
        origin.deployments[name] = name
        return name

    for k, port in enumerate(runners):
        first_get(port, deploy(f"warmup-{k}", "reads no file"), KINDS["reads no file"][1])
        time.sleep(gap_s)
    results = [{kind: ([], []) for kind in KINDS} for _ in binaries]
    for j in range(n):
        for kind, (_, expected) in KINDS.items():
            for k, port in enumerate(runners):
                ms, wrong = first_get(port, deploy(f"{kind.replace(' ', '-')}-{j}-{k}", kind), expected)
                results[k][kind][0 if wrong is None else 1].append(ms if wrong is None else wrong)
                time.sleep(gap_s)
    time.sleep(2)  # the last boot events reached the origin
    return results


def p50_p99(samples):
    return f"{statistics.median(samples):.0f} / {percentile(samples, 99):.0f}" if samples else "—"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", action="append", help="a runner binary (repeat to compare)")
    parser.add_argument("--n", type=int, default=20, help="never-seen deployments per kind and binary")
    parser.add_argument("--tree-delay-ms", type=int, default=1000, help="how late read_tree answers")
    parser.add_argument("--gap-ms", type=int, default=300, help="pause after each request")
    parser.add_argument("--prestarted-isolates", type=int, help="passed to every runner (default: theirs)")
    args = parser.parse_args()
    binaries = args.binary or [os.path.join(ROOT, "target/release/isocloud")]
    procs = Procs()
    work = tempfile.mkdtemp(prefix="isocloud-tree-")
    origin = TreeOrigin(args.tree_delay_ms)
    try:
        eszips = {}
        for kind, (code, _) in KINDS.items():
            src = os.path.join(work, f"src-{kind.replace(' ', '-')}")
            os.makedirs(src)
            with open(os.path.join(src, "main.ts"), "w") as f:
                f.write(code)
            eszips[kind] = build_eszip(src, "main.ts", os.path.join(work, f"{kind.replace(' ', '-')}.eszip"))
        extra = [] if args.prestarted_isolates is None else ["--prestarted-isolates", str(args.prestarted_isolates)]
        results = measure(procs, binaries, origin, eszips, args.n, args.gap_ms / 1000, work, extra)
        prestart = "" if args.prestarted_isolates is None else f", --prestarted-isolates {args.prestarted_isolates}"
        print(f"\nfirst request of a never-seen deployment, subhosting mode, read_tree {args.tree_delay_ms} ms late "
              f"(other RPCs at once), n={args.n} each, interleaved, {args.gap_ms} ms apart{prestart}\n")
        print("| runner | deployment | first request p50 / p99 ms | wrong answers | read_tree calls "
              "| runner's boot_ms p50 |")
        print("| --- | --- | --- | --- | --- | --- |")
        wrongs = []
        for k, binary in enumerate(binaries):
            for kind, (samples, wrong) in results[k].items():
                names = [f"{kind.replace(' ', '-')}-{j}-{k}" for j in range(args.n)]
                calls = sum(origin.tree_calls.get(name, 0) for name in names)
                boots = [origin.boot_ms[name] for name in names if name in origin.boot_ms]
                boot = f"{statistics.median(boots):.0f}" if boots else "—"
                print(f"| {k}: {binary} | {kind} | {p50_p99(samples)} | {len(wrong)} of {args.n} "
                      f"| {calls} | {boot} |")
                if wrong:
                    wrongs.append(f"{k}, {kind}: {wrong[0]}")
        for line in wrongs:
            print(f"\nwrong answer ({line})")
    finally:
        procs.stop_all()
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
