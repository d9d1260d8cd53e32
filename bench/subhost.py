"""Subhosting mode for the benchmarks: a subhoster's origin (Python, on a
free loopback port) serving deployments whose code is an ESZIP built by the
Deno toolchain (`@deno/eszip`, tools/eszip/build.mjs), HS256 tokens as a
relay signs them, and a runner in `isocloud runner` mode pointed at the
origin.

The origin answers the protocol's RPCs (boot, layer, read_tree,
report_activity) from memory, optionally `delay_ms` late each (a remote
origin), and keeps the `boot_ms` of every boot event the runner reports.
"""
import base64
import hashlib
import hmac
import http.server
import json
import os
import subprocess
import threading
import time
import urllib.parse

from common import DENO, ROOT, get, start_runner

KID = "bench"
SECRET = "bench-secret-of-at-least-32-bytes!"
ESZIP_TOOL = os.path.join(ROOT, "tools/eszip")


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(deployment_id, ttl_s=300):
    """The `x-deno-subhost` JWT a relay sends for `deployment_id`."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": KID}).encode())
    now = int(time.time())
    claims = b64url(json.dumps({"deployment_id": deployment_id, "iat": now, "exp": now + ttl_s}).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64url(signature)}"


def build_eszip(root, entry, out):
    """`node tools/eszip/build.mjs`; installs its npm packages the first time."""
    if not os.path.exists(os.path.join(ESZIP_TOOL, "node_modules/@deno/eszip")):
        subprocess.run(["npm", "ci", "--prefix", ESZIP_TOOL, "--no-audit", "--no-fund", "--loglevel=error"],
                       check=True)
    subprocess.run(["node", os.path.join(ESZIP_TOOL, "build.mjs"), "--root", root, "--out", out, entry],
                   check=True, stdout=subprocess.DEVNULL)
    with open(out, "rb") as f:
        return f.read()


class Origin:
    """deployments: {deployment_id: layer_id}; layers: {layer_id: eszip bytes}.
    Every deployment's entrypoint is file:///src/main.ts."""

    def __init__(self, delay_ms=0):
        self.deployments = {}
        self.layers = {}
        self.delay_s = delay_ms / 1000
        self.boot_ms = {}
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Head and body are two writes: without this, Nagle and the
            # runner's delayed ACK hold the body back 40 ms.
            disable_nagle_algorithm = True

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
                if origin.delay_s:
                    time.sleep(origin.delay_s)
                if layer_id is None:
                    return self.answer(404, b"no such deployment")
                if rpc == "boot":
                    config = {"entrypoint": "file:///src/main.ts", "layers": [{"kind": "eszip", "id": layer_id}],
                              "permissions": {"net": False}}
                    return self.answer(200, headers=[("x-deno-config", json.dumps(config))])
                if rpc == "layer" and query.get("layer_id") in origin.layers:
                    return self.answer(200, origin.layers[query["layer_id"]])
                if rpc == "read_tree":
                    return self.answer(200, b'{"entries": {"": {"kind": "directory"}}}',
                                       [("content-type", "application/json")])
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


def start_subhost_runner(binary, origin, state_dir, extra=(), spawn=subprocess.Popen):
    """`isocloud runner` on a free port with `origin` as the default RPC root;
    returns (process, port)."""
    runner, port = start_runner(
        [binary, "runner", "--listen", "127.0.0.1:0", "--state-dir", state_dir, "--deno", DENO,
         "--rpc-root", origin.rpc_root, "--subhost-secret", f"{KID}={SECRET}", "--usage-interval-s", "1",
         *extra],
        spawn=spawn)
    threading.Thread(target=runner.stdout.read, daemon=True).start()  # drain
    return runner, port


def subhost_get(port, deployment_id, timeout=60):
    """One relay-signed request on a fresh connection; ms to the end of the body."""
    return get(port, "bench.example", timeout=timeout, headers={"x-deno-subhost": token(deployment_id)})
