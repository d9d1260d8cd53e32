// A subhoster's relay: takes end-user traffic, picks the deployment by Host,
// signs an `x-deno-subhost` JWT for it and forwards the request to the runner,
// streaming both ways. WebSocket upgrades are relayed too.
//
//   deno run --allow-net --allow-env examples/subhosting/relay.ts \
//     --port 8000 --runner http://127.0.0.1:8080 --secret acme=SECRET \
//     --map hello.example.com=hello --map '*.example.net=hello'
//
// Without a matching --map, `<name>.localhost` goes to deployment `<name>`.
//
// Only Deno built-ins and Web APIs are used. See README.md.

import { parseSecret, signHs256 } from "./jwt.ts";

// ---------------------------------------------------------------- options

const USAGE =
  `usage: relay.ts [--hostname 127.0.0.1] [--port 8000] --runner URL --secret KID=SECRET [--map HOST=DEPLOYMENT]...

  --hostname H          address to listen on (default 127.0.0.1)
  --port N              port to listen on (default 8000)
  --runner URL          the runner's public listener, e.g. http://127.0.0.1:8080
  --secret KID=SECRET   subhoster id (the JWT's kid) and shared secret.
                        Falls back to $SUBHOST_SECRET (same KID=SECRET form).
  --map HOST=DEPLOYMENT route HOST to DEPLOYMENT; repeatable, first match wins.
                        HOST may be '*.suffix' (any subdomain of suffix);
                        DEPLOYMENT may then be '*' for "the subdomain itself".
                        After all --map rules: '*.localhost=*' (so
                        hello.localhost -> hello), unless --no-default-map.
  --no-default-map      do not add the '*.localhost=*' rule
  --rpc-root URL        put an rpc_root claim in the tokens (the runner honours
                        it only if its operator allowed that prefix)
  --ttl SECONDS         token lifetime (default 60)`;

function fail(message: string): never {
  console.error(`relay: ${message}\n\n${USAGE}`);
  Deno.exit(2);
}

const flags = new Map<string, string[]>();
let defaultMap = true;
for (let i = 0; i < Deno.args.length; i++) {
  const arg = Deno.args[i];
  if (arg === "-h" || arg === "--help") {
    console.log(USAGE);
    Deno.exit(0);
  }
  if (arg === "--no-default-map") {
    defaultMap = false;
    continue;
  }
  if (!arg.startsWith("--")) fail(`unexpected argument ${JSON.stringify(arg)}`);
  const eq = arg.indexOf("=");
  const [name, value] = eq > 0 ? [arg.slice(2, eq), arg.slice(eq + 1)] : [arg.slice(2), Deno.args[++i]];
  if (value === undefined) fail(`--${name} needs a value`);
  if (!["hostname", "port", "runner", "secret", "map", "rpc-root", "ttl"].includes(name)) {
    fail(`unknown flag --${name}`);
  }
  flags.set(name, [...(flags.get(name) ?? []), value]);
}
const one = (name: string) => flags.get(name)?.at(-1);

const HOSTNAME = one("hostname") ?? "127.0.0.1";
const PORT = Number(one("port") ?? "8000");
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) fail("--port must be a port number");
const TTL_S = Number(one("ttl") ?? "60");
if (!Number.isInteger(TTL_S) || TTL_S <= 0) fail("--ttl must be a positive number of seconds");

let RUNNER: URL;
try {
  RUNNER = new URL(one("runner") ?? fail("--runner URL is required"));
  if (RUNNER.protocol !== "http:" && RUNNER.protocol !== "https:") throw new Error();
} catch {
  fail("--runner must be an http(s) URL");
}

let KID: string, SECRET: string;
try {
  [KID, SECRET] = parseSecret(
    one("secret") ?? Deno.env.get("SUBHOST_SECRET") ?? fail("--secret KID=SECRET is required"),
  );
} catch (e) {
  fail(`--secret: ${(e as Error).message}`);
}

const RPC_ROOT = one("rpc-root");
if (RPC_ROOT !== undefined && !/^https?:\/\/.+\/$/.test(RPC_ROOT)) {
  fail("--rpc-root must be an http(s) URL ending in /");
}

interface Rule {
  host: string; // "hello.example.com", or "*.example.net"
  deployment: string; // a deployment id, or "*" (the subdomain matched by a wildcard)
}

const RULES: Rule[] = (flags.get("map") ?? []).map((value) => {
  const eq = value.lastIndexOf("=");
  if (eq <= 0 || eq === value.length - 1) fail(`--map expects HOST=DEPLOYMENT, got ${JSON.stringify(value)}`);
  const rule = { host: value.slice(0, eq).toLowerCase(), deployment: value.slice(eq + 1) };
  if (rule.deployment === "*" && !rule.host.startsWith("*.")) fail(`--map ${value}: '*' needs a '*.suffix' host`);
  return rule;
});
if (defaultMap) RULES.push({ host: "*.localhost", deployment: "*" });

// ---------------------------------------------------------------- routing

/** The host name of a Host header, lowercased, without port or trailing dot. */
function hostName(host: string): string {
  const name = host.startsWith("[") ? host.slice(0, host.indexOf("]") + 1) : host.replace(/:\d*$/, "");
  return name.toLowerCase().replace(/\.$/, "");
}

function deploymentFor(host: string): string | undefined {
  for (const rule of RULES) {
    if (rule.host === host) return rule.deployment === "*" ? undefined : rule.deployment;
    if (rule.host.startsWith("*.")) {
      const suffix = rule.host.slice(1); // ".example.net"
      if (host.length > suffix.length && host.endsWith(suffix)) {
        if (rule.deployment !== "*") return rule.deployment;
        const sub = host.slice(0, -suffix.length);
        // Only a single label names a deployment: a.b.localhost is not "a.b".
        if (/^[a-z0-9]([a-z0-9-]*[a-z0-9])?$/.test(sub)) return sub;
      }
    }
  }
  return undefined;
}

/** A fresh token for one request: `{deployment_id, iat, exp}` (+ `rpc_root`). */
function tokenFor(deploymentId: string): Promise<string> {
  const iat = Math.floor(Date.now() / 1000);
  const claims: Record<string, unknown> = { deployment_id: deploymentId, iat, exp: iat + TTL_S };
  if (RPC_ROOT !== undefined) claims.rpc_root = RPC_ROOT;
  return signHs256(KID, SECRET, claims);
}

// ---------------------------------------------------------------- forwarding

/** Hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, not the message. */
const HOP_BY_HOP = [
  "connection",
  "keep-alive",
  "proxy-connection",
  "proxy-authenticate",
  "proxy-authorization",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
];

function stripHopByHop(headers: Headers) {
  for (const name of (headers.get("connection") ?? "").split(",")) {
    if (name.trim()) headers.delete(name.trim());
  }
  for (const name of HOP_BY_HOP) headers.delete(name);
}

function errorResponse(status: number, code: string, message: string): Response {
  return Response.json({ error: { code, message } }, { status, headers: { "x-relay-error": code } });
}

async function forwardHeaders(request: Request, info: Deno.ServeHandlerInfo, host: string, deploymentId: string) {
  const headers = new Headers(request.headers);
  stripHopByHop(headers);
  headers.delete("host"); // the runner is addressed by its own host; the public one travels below
  headers.set("x-deno-subhost", await tokenFor(deploymentId)); // replaces any the client sent
  headers.set("x-forwarded-host", host);
  headers.set("x-forwarded-proto", new URL(request.url).protocol.slice(0, -1));
  const remote = info.remoteAddr as Deno.NetAddr;
  const forwardedFor = headers.get("x-forwarded-for");
  headers.set("x-forwarded-for", forwardedFor ? `${forwardedFor}, ${remote.hostname}` : remote.hostname);
  // Ask for an uncompressed answer. fetch() transparently decompresses gzip and
  // br bodies but keeps their `content-encoding` header (as browsers do), so a
  // compressed answer relayed as is would reach the end user mislabelled.
  // (A production relay would compress towards the end user itself.)
  headers.set("accept-encoding", "identity");
  return headers;
}

async function forward(request: Request, info: Deno.ServeHandlerInfo, host: string, deploymentId: string) {
  const incoming = new URL(request.url);
  const target = new URL(incoming.pathname + incoming.search, RUNNER);
  const headers = await forwardHeaders(request, info, host, deploymentId);
  let upstream: Response;
  try {
    upstream = await fetch(target, {
      method: request.method,
      headers,
      body: request.body, // streamed, not buffered
      redirect: "manual", // a redirect is the tenant's answer, for the end user to follow
    });
    // If the end user goes away mid-answer, Deno.serve cancels the body
    // stream below, which cancels `upstream.body` and so the runner request.
  } catch (e) {
    console.error(`relay: runner unreachable: ${(e as Error).message}`);
    return errorResponse(502, "RUNNER_UNREACHABLE", "the runner could not be reached");
  }
  const responseHeaders = new Headers(upstream.headers);
  stripHopByHop(responseHeaders);
  return new Response(upstream.body, {
    status: upstream.status,
    statusText: upstream.statusText,
    headers: responseHeaders,
  });
}

/**
 * WebSocket: open one to the runner first (with the same token and headers),
 * then accept the end user's with the subprotocol the runner chose, and pipe
 * messages and closes between the two.
 */
const WEBSOCKET_OPEN_TIMEOUT_MS = 30_000;

async function forwardWebSocket(request: Request, info: Deno.ServeHandlerInfo, host: string, deploymentId: string) {
  const incoming = new URL(request.url);
  const target = new URL(incoming.pathname + incoming.search, RUNNER);
  target.protocol = target.protocol === "https:" ? "wss:" : "ws:";
  const headers = await forwardHeaders(request, info, host, deploymentId);
  for (const name of [...headers.keys()]) {
    if (name.startsWith("sec-websocket-")) headers.delete(name);
  }
  const protocols = (request.headers.get("sec-websocket-protocol") ?? "").split(",").map((p) => p.trim()).filter(
    Boolean,
  );

  const upstream = new WebSocket(target, { protocols, headers });
  upstream.binaryType = "arraybuffer";
  const opened = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), WEBSOCKET_OPEN_TIMEOUT_MS);
    upstream.onopen = () => (clearTimeout(timer), resolve(true));
    upstream.onerror = () => (clearTimeout(timer), resolve(false));
    upstream.onclose = () => (clearTimeout(timer), resolve(false));
  });
  if (!opened) {
    if (upstream.readyState !== WebSocket.CLOSED) upstream.close();
    return errorResponse(
      502,
      "WEBSOCKET_REFUSED",
      "the runner refused the WebSocket (see its answer with a plain request)",
    );
  }

  const { socket, response } = Deno.upgradeWebSocket(request, upstream.protocol ? { protocol: upstream.protocol } : {});
  socket.binaryType = "arraybuffer";
  const pending: (string | ArrayBuffer)[] = [];
  // Only codes an endpoint may send; 1005/1006 etc. become a plain 1000.
  const closeCode = (code: number) => (code === 1000 || (code >= 3000 && code <= 4999) ? code : 1000);
  const close = (ws: WebSocket, event: CloseEvent) => {
    if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) {
      try {
        ws.close(closeCode(event.code), event.reason);
      } catch {
        ws.close();
      }
    }
  };
  upstream.onmessage = (event) => {
    if (socket.readyState === WebSocket.OPEN) socket.send(event.data);
    else pending.push(event.data);
  };
  socket.onopen = () => {
    for (const data of pending.splice(0)) socket.send(data);
  };
  socket.onmessage = (event) => {
    if (upstream.readyState === WebSocket.OPEN) upstream.send(event.data);
  };
  upstream.onclose = (event) => close(socket, event);
  socket.onclose = (event) => close(upstream, event);
  upstream.onerror = () => socket.readyState === WebSocket.OPEN && socket.close(1011, "upstream error");
  socket.onerror = () => upstream.readyState === WebSocket.OPEN && upstream.close(1000);
  return response;
}

// ---------------------------------------------------------------- server

Deno.serve({
  hostname: HOSTNAME,
  port: PORT,
  onListen: ({ hostname, port }) =>
    console.error(
      `relay: listening on http://${hostname}:${port}/, forwarding to ${RUNNER.href} as ${KID}; routes: ` +
        RULES.map((r) => `${r.host}=${r.deployment}`).join(" "),
    ),
}, async (request, info) => {
  const started = performance.now();
  const host = request.headers.get("host") ?? "";
  const deploymentId = deploymentFor(hostName(host));
  let response: Response;
  if (deploymentId === undefined) {
    response = errorResponse(
      404,
      "UNKNOWN_HOST",
      `no deployment for host ${JSON.stringify(hostName(host).slice(0, 253))}`,
    );
  } else if ((request.headers.get("upgrade") ?? "").toLowerCase() === "websocket") {
    response = await forwardWebSocket(request, info, host, deploymentId);
  } else {
    response = await forward(request, info, host, deploymentId);
  }
  const url = new URL(request.url);
  console.error(
    `relay: ${request.method} ${host}${url.pathname}${url.search} -> ${deploymentId ?? "(none)"} ` +
      `${response.status} (${Math.round(performance.now() - started)} ms to headers)`,
  );
  return response;
});
