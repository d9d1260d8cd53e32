// A subhoster's origin: answers the runner's RPCs (boot, layer, read_tree,
// read_blob, report_activity) from a folder of deployments on disk.
//
//   deno run --allow-net --allow-read=./examples/subhosting/deployments --allow-env \
//     examples/subhosting/origin.ts --port 9000 --secret acme=SECRET \
//     --deployments ./examples/subhosting/deployments
//
// Deployment `D` is the folder `<deployments>/D/`. Every file in it is an
// asset (read_tree / read_blob); every .js/.ts file is also a code layer
// (a "bundle" layer at `file:///src/<path>`). `env.json` and
// `permissions.json`, if present, become the isolate's `envs` and
// `permissions`; they are configuration, so they are not served as assets.
//
// Only Deno built-ins and Web APIs are used. See README.md.

import { JwtError, parseSecret, verifyHs256 } from "./jwt.ts";

// ---------------------------------------------------------------- options

const USAGE = `usage: origin.ts [--hostname 127.0.0.1] [--port 9000] --secret KID=SECRET... --deployments DIR

  --hostname H        address to listen on (default 127.0.0.1)
  --port N            port to listen on (default 9000)
  --secret KID=SECRET the runner's shared secret for subhoster KID; repeatable.
                      Falls back to $SUBHOST_SECRET (same KID=SECRET form).
  --deployments DIR   folder holding one sub-folder per deployment
                      (default ./deployments). Pass it to --allow-read too.
  --entry NAME        entry file looked for first (default: main.ts, main.js,
                      mod.ts, index.ts, index.js, in that order)`;

function parseArgs(args: string[]): Map<string, string[]> {
  const flags = new Map<string, string[]>();
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "-h" || arg === "--help") {
      console.log(USAGE);
      Deno.exit(0);
    }
    if (!arg.startsWith("--")) fail(`unexpected argument ${JSON.stringify(arg)}`);
    const eq = arg.indexOf("=");
    const [name, value] = eq > 0 ? [arg.slice(2, eq), arg.slice(eq + 1)] : [arg.slice(2), args[++i]];
    if (value === undefined) fail(`--${name} needs a value`);
    flags.set(name, [...(flags.get(name) ?? []), value]);
  }
  return flags;
}

function fail(message: string): never {
  console.error(`origin: ${message}\n\n${USAGE}`);
  Deno.exit(2);
}

const flags = parseArgs(Deno.args);
const known = new Set(["hostname", "port", "secret", "deployments", "entry"]);
for (const name of flags.keys()) if (!known.has(name)) fail(`unknown flag --${name}`);
const one = (name: string) => flags.get(name)?.at(-1);

const HOSTNAME = one("hostname") ?? "127.0.0.1";
const PORT = Number(one("port") ?? "9000");
if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) fail("--port must be a port number");
const DEPLOYMENTS = (one("deployments") ?? "./deployments").replace(/\/+$/, "") || "/";
const ENTRIES = [...(flags.get("entry") ?? []), "main.ts", "main.js", "mod.ts", "index.ts", "index.js"];

const SECRETS = new Map<string, string>();
for (
  const value of flags.get("secret") ?? [Deno.env.get("SUBHOST_SECRET") ?? fail("--secret KID=SECRET is required")]
) {
  try {
    const [kid, secret] = parseSecret(value);
    SECRETS.set(kid, secret);
  } catch (e) {
    fail(`--secret: ${(e as Error).message}`);
  }
}

// ---------------------------------------------------------------- limits

/** Deployment ids are folder names: one safe path segment, never `.` or `..`. */
const DEPLOYMENT_ID = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;
const MAX_FILES = 10_000;
const MAX_TOTAL_BYTES = 256 * 1024 * 1024;
const MAX_DEPTH = 32;
const MAX_ACTIVITY_BYTES = 4 * 1024 * 1024;
/** Files that configure the isolate rather than being part of it. */
const CONFIG_FILES = new Set(["/env.json", "/permissions.json"]);
const CODE_FILE = /\.(ts|js)$/;

// ---------------------------------------------------------------- deployments

interface FileEntry {
  path: string; // "/lib/greet.ts": relative to the deployment root, leading "/"
  size: number;
  hash: string; // sha-256 of the content, hex: the asset's file id
  layerId: string; // sha-256 of path NUL content, hex: the layer id of a code file
}

interface Deployment {
  id: string;
  root: string;
  files: Map<string, FileEntry>; // by path
  dirs: string[]; // "/lib", ...
}

class HttpError extends Error {
  constructor(readonly status: number, readonly code: string, message: string) {
    super(message);
  }
}

async function sha256Hex(...parts: Uint8Array[]): Promise<string> {
  const total = parts.reduce((n, p) => n + p.length, 0);
  const joined = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    joined.set(p, at);
    at += p.length;
  }
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", joined));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Walks `<deployments>/<id>/` afresh on each RPC (so edits show up on the
 * next boot). Symlinks are skipped, never followed, and names come from
 * readDir (no `/`, never `..`), so nothing outside the folder is ever read.
 */
async function loadDeployment(id: string): Promise<Deployment> {
  if (!DEPLOYMENT_ID.test(id) || id.includes("..")) {
    throw new HttpError(404, "DEPLOYMENT_NOT_FOUND", "no such deployment");
  }
  const root = `${DEPLOYMENTS}/${id}`;
  try {
    const info = await Deno.lstat(root);
    if (!info.isDirectory) throw new Deno.errors.NotFound();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new HttpError(404, "DEPLOYMENT_NOT_FOUND", "no such deployment");
    throw e;
  }
  const deployment: Deployment = { id, root, files: new Map(), dirs: [] };
  let totalBytes = 0;
  const walk = async (dir: string, depth: number) => {
    if (depth > MAX_DEPTH) throw new HttpError(500, "DEPLOYMENT_TOO_LARGE", "deployment folder is nested too deeply");
    const names: Deno.DirEntry[] = [];
    for await (const entry of Deno.readDir(root + dir)) names.push(entry);
    names.sort((a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    for (const entry of names) {
      const path = `${dir}/${entry.name}`;
      if (entry.isSymlink) continue;
      if (entry.isDirectory) {
        deployment.dirs.push(path);
        await walk(path, depth + 1);
      } else if (entry.isFile) {
        if (deployment.files.size >= MAX_FILES) {
          throw new HttpError(500, "DEPLOYMENT_TOO_LARGE", `deployment has more than ${MAX_FILES} files`);
        }
        const content = await Deno.readFile(root + path);
        totalBytes += content.length;
        if (totalBytes > MAX_TOTAL_BYTES) {
          throw new HttpError(500, "DEPLOYMENT_TOO_LARGE", `deployment is larger than ${MAX_TOTAL_BYTES} bytes`);
        }
        deployment.files.set(path, {
          path,
          size: content.length,
          hash: await sha256Hex(content),
          layerId: await sha256Hex(new TextEncoder().encode(path), new Uint8Array([0]), content),
        });
      }
    }
  };
  await walk("", 0);
  return deployment;
}

async function readJsonFile(deployment: Deployment, path: string): Promise<unknown> {
  if (!deployment.files.has(path)) return undefined;
  const text = await Deno.readTextFile(deployment.root + path);
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new HttpError(500, "BAD_DEPLOYMENT", `${deployment.id}${path}: ${(e as Error).message}`);
  }
}

/** Non-ASCII is written as \uXXXX so the JSON fits in an HTTP header as is. */
function asciiJson(value: unknown): string {
  return JSON.stringify(value).replace(
    /[\u007f-\uffff]/g,
    (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"),
  );
}

// ---------------------------------------------------------------- RPCs

async function boot(deployment: Deployment): Promise<Response> {
  const codeFiles = [...deployment.files.values()].filter((f) => CODE_FILE.test(f.path));
  const entry = ENTRIES.map((name) => deployment.files.get(`/${name}`)).find((f) => f !== undefined);
  if (!entry) {
    throw new HttpError(500, "BAD_DEPLOYMENT", `no entry file (one of ${ENTRIES.join(", ")}) in ${deployment.id}`);
  }
  // One bundle layer per code file; the entry first, and carried inline in
  // this answer's body, so the runner needs no `layer` RPC for it.
  const layers = [entry, ...codeFiles.filter((f) => f !== entry)].map((f) => ({
    kind: "bundle",
    id: f.layerId,
    specifier: `file:///src${f.path}`,
  }));
  const config: Record<string, unknown> = {
    entrypoint: `file:///src${entry.path}`,
    layers,
    inline_layer: entry.layerId,
  };
  const envs = await readJsonFile(deployment, "/env.json");
  if (envs !== undefined) config.envs = envs;
  const permissions = await readJsonFile(deployment, "/permissions.json");
  if (permissions !== undefined) config.permissions = permissions;
  const body = await Deno.readFile(deployment.root + entry.path);
  return new Response(body, {
    headers: { "x-deno-config": asciiJson(config), "content-type": "application/javascript" },
  });
}

async function layer(deployment: Deployment, layerId: string): Promise<Response> {
  const file = [...deployment.files.values()].find((f) => f.layerId === layerId && CODE_FILE.test(f.path));
  if (!file) throw new HttpError(404, "LAYER_NOT_FOUND", "no such layer");
  return new Response(await Deno.readFile(deployment.root + file.path), {
    headers: { "content-type": "application/javascript" },
  });
}

function readTree(deployment: Deployment): Response {
  const entries: Record<string, unknown> = { "": { kind: "directory" } };
  for (const dir of deployment.dirs) entries[dir] = { kind: "directory" };
  for (const file of deployment.files.values()) {
    if (CONFIG_FILES.has(file.path)) continue;
    entries[file.path] = { kind: "file", size: file.size, hash: file.hash };
  }
  return Response.json({ entries });
}

async function readBlob(deployment: Deployment, fileId: string, hash: string | null): Promise<Response> {
  const file = [...deployment.files.values()].find((f) => f.hash === fileId && !CONFIG_FILES.has(f.path));
  if (!file || (hash !== null && hash !== fileId)) throw new HttpError(404, "BLOB_NOT_FOUND", "no such blob");
  return new Response(await Deno.readFile(deployment.root + file.path), {
    headers: { "content-type": "application/octet-stream" },
  });
}

/** Batch ids already printed, oldest first; bounded so memory stays flat. */
const seenBatches = new Set<string>();
const MAX_SEEN_BATCHES = 10_000;

async function reportActivity(request: Request): Promise<Response> {
  const length = Number(request.headers.get("content-length") ?? "0");
  if (length > MAX_ACTIVITY_BYTES) throw new HttpError(413, "TOO_LARGE", "activity batch too large");
  const text = await request.text();
  if (text.length > MAX_ACTIVITY_BYTES) throw new HttpError(413, "TOO_LARGE", "activity batch too large");
  let batch: { batch_id?: unknown; events?: unknown };
  try {
    batch = JSON.parse(text);
  } catch {
    throw new HttpError(400, "BAD_REQUEST", "body is not JSON");
  }
  if (typeof batch?.batch_id !== "string" || !Array.isArray(batch.events)) {
    throw new HttpError(400, "BAD_REQUEST", "expected {batch_id: string, events: [...]}");
  }
  // Delivery is at least once: a retried batch carries the same id and the
  // same content, so printing it once is enough.
  if (seenBatches.has(batch.batch_id)) return Response.json({ ok: true, duplicate: true });
  seenBatches.add(batch.batch_id);
  if (seenBatches.size > MAX_SEEN_BATCHES) seenBatches.delete(seenBatches.values().next().value!);
  for (const event of batch.events) {
    // One line per event: `activity <timestamp> <deployment> <type> {rest}`.
    const { timestamp, deployment_id, type, ...rest } = (event ?? {}) as Record<string, unknown>;
    console.log(`activity ${timestamp} ${deployment_id} ${type} ${JSON.stringify(rest)}`);
  }
  return Response.json({ ok: true, duplicate: false });
}

// ---------------------------------------------------------------- server

const RPCS: Record<string, "GET" | "POST"> = {
  boot: "GET",
  layer: "GET",
  read_tree: "GET",
  read_blob: "GET",
  report_activity: "POST",
};

function errorResponse(status: number, code: string, message: string): Response {
  return Response.json({ error: { code, message } }, { status });
}

async function handle(request: Request): Promise<Response> {
  const url = new URL(request.url);
  const match = /^\/v0\/([a-z_]+)$/.exec(url.pathname);
  const rpc = match?.[1];
  if (!rpc || !(rpc in RPCS)) return errorResponse(404, "NOT_FOUND", "unknown RPC");
  if (request.method !== RPCS[rpc]) return errorResponse(405, "METHOD_NOT_ALLOWED", `${rpc} takes ${RPCS[rpc]}`);

  const deploymentId = url.searchParams.get("deployment_id");
  if (!deploymentId) return errorResponse(400, "BAD_REQUEST", "missing deployment_id");

  // Every RPC carries the runner's token, signed with the shared secret.
  const auth = request.headers.get("authorization") ?? "";
  const token = /^Bearer\s+(\S+)$/i.exec(auth)?.[1];
  if (!token) return errorResponse(401, "UNAUTHORIZED", "missing Authorization: Bearer token");
  try {
    const { claims } = await verifyHs256(token, SECRETS);
    if (claims.deployment_id !== deploymentId) {
      return errorResponse(401, "UNAUTHORIZED", "the token's deployment_id does not match the query");
    }
  } catch (e) {
    if (e instanceof JwtError) return errorResponse(401, "UNAUTHORIZED", e.message);
    throw e;
  }

  try {
    if (rpc === "report_activity") return await reportActivity(request);
    const deployment = await loadDeployment(deploymentId);
    switch (rpc) {
      case "boot":
        return await boot(deployment);
      case "layer": {
        const layerId = url.searchParams.get("layer_id");
        if (!layerId) return errorResponse(400, "BAD_REQUEST", "missing layer_id");
        return await layer(deployment, layerId);
      }
      case "read_tree":
        return readTree(deployment);
      default: {
        const fileId = url.searchParams.get("file_id");
        if (!fileId) return errorResponse(400, "BAD_REQUEST", "missing file_id");
        return await readBlob(deployment, fileId, url.searchParams.get("hash"));
      }
    }
  } catch (e) {
    if (e instanceof HttpError) return errorResponse(e.status, e.code, e.message);
    console.error(`origin: ${rpc} ${deploymentId}:`, e);
    return errorResponse(500, "INTERNAL", "the origin failed; see its log");
  }
}

Deno.serve({
  hostname: HOSTNAME,
  port: PORT,
  onListen: ({ hostname, port }) =>
    console.error(
      `origin: serving RPCs at http://${hostname}:${port}/v0/ from ${DEPLOYMENTS}/ for ${
        [...SECRETS.keys()].join(", ")
      }`,
    ),
}, async (request) => {
  const started = performance.now();
  const response = await handle(request);
  const url = new URL(request.url);
  // RPC log on stderr; stdout carries only the activity lines.
  console.error(
    `origin: ${request.method} ${url.pathname}${url.search} -> ${response.status} (${
      Math.round(performance.now() - started)
    } ms)`,
  );
  return response;
});
