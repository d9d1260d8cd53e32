// isocloud isolate harness: the first module of every isolate process.
//
// It loads the tenant's entrypoint, captures whichever handler the tenant
// registers (`Deno.serve`, `export default { fetch }`, or
// `addEventListener("fetch")`), and serves it on the unix socket the runner
// gave it. It reports to the runner over a control socket: readiness, start
// failures, console output tagged with request ids, and asks the runner for
// asset files the first time the tenant reads them.
//
// Trust: this runs inside the tenant's isolate, so nothing it says is trusted
// by the runner beyond "this deployment's own business" (its logs, its files).
//
// Control protocol: one JSON object per line, tagged by `op`, declared once
// on the runner's side in crates/protocol/src/harness.rs (keep the two in
// step). The runner skips a line over 256 KiB (newline included) and ignores
// one that is not a message below (unknown op, a field missing or of the
// wrong type); unknown fields are ignored.
//
// The harness sends:
//   { op: "ready" }                               the handler serves on socket_path
//   { op: "waiting", preloaded_packages }         pre-started: waits for `assign` on this connection;
//                                                 preloaded_packages: how many of its bound set's
//                                                 packages it loaded (not evaluated) before
//   { op: "start_error", code, message }          code: "MODULE_NOT_FOUND" (anything else counts as
//                                                 "ISOLATE_START_FAILED"); the harness exits after it
//   { op: "log", level, message, request_id }     level: "debug" | "info" | "warning" | "error";
//                                                 request_id: string (at most 128 bytes) | null
//   { op: "materialize", id, path }               fetch the asset at tree path `path` (at most 4096
//                                                 bytes) into src_root; answered by `id`
//   { op: "tree", id }                            write the deferred asset manifest to tree_path;
//                                                 answered by `id`
// The runner sends:
//   { op: "assign", entrypoint, src_root, tree_path, tree_deferred, envs, node_servers }
//                                                 the rest of the bootstrap, to a pre-started
//                                                 harness; node_servers: true | false |
//                                                 "if-packages-use-it"
//   { op: "answer", id, ok, error }               the outcome of call `id`; `error` only when !ok
// Call ids are per connection: this one's (`call`) and the sync worker's.

import { AsyncLocalStorage } from "node:async_hooks";

const bootstrap = JSON.parse(Deno.readTextFileSync(Deno.args[0]));

// In its own PID namespace deno is pid 1, and the kernel hands a namespace's
// pid 1 only the signals it handles: the runner's SIGTERM means "stop now",
// as its default action would (SIGKILL, after a grace, always reaches it).
const exitNow = Deno.exit;
Deno.addSignalListener("SIGTERM", () => exitNow(143));
const { socket_path: socketPath, control_path: controlPath, egress_probe: egressProbe } = bootstrap;
// A pre-started isolate runs this far (deno up, harness evaluated, proxy
// probed) before the runner picks its deployment, then waits on the control
// socket for the rest of the bootstrap: entrypoint, asset tree, envs.
const prestarted = bootstrap.prestart === true;

// deno reads HTTP_PROXY/HTTPS_PROXY when it builds its HTTP client, on the
// first fetch: make that happen now, while the runner's egress proxy is still
// in the environment. The proxy answers this probe itself.
if (egressProbe) {
  // In its own network namespace the isolate reaches the proxy once the
  // runner has put a listener there, right after the spawn: retry briefly.
  for (let attempt = 1; attempt <= 20; attempt++) {
    try {
      const probe = await fetch(egressProbe);
      await probe.body?.cancel();
      break;
    } catch (e) {
      // Outbound calls will fail and say why; serving needs no proxy.
      if (e instanceof Deno.errors.NotCapable || attempt === 20) break;
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
  }
}

// The tenant sees exactly its configured envs: not the variables the runner
// sets for deno (DENO_DIR, the proxy, …), nor those deno adds to its own
// environment (a PATH to its node shims, DENO_NODE_SHIM_ACTIVE). deno starts
// with none of the tenant's (the loader and V8 read theirs at exec): they
// come in the bootstrap record, or for a pre-started isolate with its
// assignment, and are set here, before tenant code runs.
function installEnv(envs) {
  for (const name of Object.keys(Deno.env.toObject())) {
    if (!Object.hasOwn(envs, name)) Deno.env.delete(name);
  }
  for (const [name, value] of Object.entries(envs)) Deno.env.set(name, value);
}
if (!prestarted) installEnv(bootstrap.envs);

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------- control

const control = await Deno.connect({ transport: "unix", path: controlPath });
let controlQueue = Promise.resolve();
function send(message) {
  const line = encoder.encode(JSON.stringify(message) + "\n");
  controlQueue = controlQueue.then(async () => {
    let written = 0;
    while (written < line.length) written += await control.write(line.subarray(written));
  }).catch(() => {});
  return controlQueue;
}

let resolveAssignment = () => {};
const assignment = new Promise((resolve) => (resolveAssignment = resolve));

let nextCallId = 1;
const pendingCalls = new Map();
function call(message) {
  const id = nextCallId++;
  return new Promise((resolve, reject) => {
    pendingCalls.set(id, { resolve, reject });
    send({ ...message, id });
  });
}

(async () => {
  let buffered = "";
  const chunk = new Uint8Array(64 * 1024);
  while (true) {
    let n;
    try {
      n = await control.read(chunk);
    } catch {
      n = null;
    }
    if (n === null) {
      // The runner went away: nothing left to serve for.
      Deno.exit(0);
    }
    buffered += decoder.decode(chunk.subarray(0, n), { stream: true });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const reply = JSON.parse(buffered.slice(0, newline));
      buffered = buffered.slice(newline + 1);
      if (reply.op === "assign") {
        resolveAssignment(reply);
        continue;
      }
      const pending = pendingCalls.get(reply.id);
      if (!pending) continue;
      pendingCalls.delete(reply.id);
      if (reply.ok) pending.resolve(reply);
      else pending.reject(new Deno.errors.NotFound(reply.error));
    }
  }
})();

// ---------------------------------------------------------------- console

// The current request: { id, traceparent } (the runner's x-isocloud-request-id,
// and its span's traceparent when it exports traces, else null).
//
// Node's AsyncLocalStorage, loaded while a pre-started isolate waits: with
// Deno's own async context variable instead (no node:async_hooks), an idle
// isolate held 2 MiB less, but the Node layer deno's timers need was then
// loaded on the boot path, and the admission e2e test's boots taking turns
// failed its bound 1 run in 3 (5 of 5 passed with it here).
const requestContext = new AsyncLocalStorage();
// A Deno.serve request's context reads its two headers when first asked
// (a console line, an outbound fetch), not on every request: materializing
// a request's headers costs an isolate woken cold ~20 µs of cache misses,
// a third of what a hello-world request costs it when a thousand tenants
// take turns (bench/tenants.py). The headers are immutable; a line logged
// after its response finished, when nothing asked before, has no id.
class ServedRequestContext {
  #request;
  #id;
  #traceparent;
  constructor(request) {
    this.#request = request;
  }
  get id() {
    if (this.#id === undefined) this.#id = servedHeader(this.#request, "x-isocloud-request-id");
    return this.#id;
  }
  get traceparent() {
    if (this.#traceparent === undefined) this.#traceparent = servedHeader(this.#request, "traceparent");
    return this.#traceparent;
  }
}
function servedHeader(request, name) {
  try {
    return request.headers.get(name);
  } catch {
    return null; // the request closed
  }
}
const levels = {
  debug: "debug",
  trace: "debug",
  log: "info",
  info: "info",
  warn: "warning",
  error: "error",
};
// The runner cuts a console line at 32 KiB and drops a control message
// over 256 KiB; cutting here keeps a long line's start instead of losing it.
const MAX_LOG_CHARS = 32 * 1024;
// A stack frame of the harness or of Deno's own code is noise to the tenant
// (and names the platform's files): errors it reads show its frames only.
const PLATFORM_FRAME = /^\s*at (?:.*[( ])?(?:file:\/\/\/isocloud\/harness\/|ext:|node:internal)/;
// Where the isolate's files are when it has no root of its own; set once
// the bootstrap is read, so the tenant reads file:///src/... names.
let hostSrcUrl = null;
function tenantText(text) {
  let lines = text.split("\n");
  if (lines.length > 1) lines = lines.filter((line) => !PLATFORM_FRAME.test(line));
  const joined = lines.join("\n");
  return hostSrcUrl ? joined.replaceAll(hostSrcUrl, "file:///src/") : joined;
}
function format(args) {
  const text = args
    .map((a) => (typeof a === "string" ? a : tenantText(Deno.inspect(a, { colors: false, depth: 4 }))))
    .join(" ");
  if (text.length <= MAX_LOG_CHARS) return text;
  return `${text.slice(0, MAX_LOG_CHARS)} … [isocloud: truncated, ${text.length} characters in all]`;
}
for (const [method, level] of Object.entries(levels)) {
  console[method] = (...args) => {
    send({ op: "log", level, message: format(args), request_id: requestContext.getStore()?.id ?? null });
  };
}

// ---------------------------------------------------------------- assignment

// A pre-started isolate started with a package set bound loads its direct
// dependencies' ES module entries while it waits: read, resolved and
// compiled, never evaluated. Each is imported through a module that fails
// to link (it asks an empty module for an export it lacks), so V8 stops
// before evaluation and keeps the loaded modules, unevaluated, for the
// tenant's own imports of the same files: they then evaluate in the
// tenant's order, after its envs are set, exactly as without the preload.
// What is not an ES module (CommonJS, a `main` without `.js`/`.mjs`), or
// not found, is skipped; a package that fails to load fails the tenant's
// import the same way later.
const MAX_PRELOADED_PACKAGES = 64;
const LINK_STOP = 'import { __isocloud_preload_stop__ } from "data:text/javascript,export{}";';
const ENTRY_CONDITIONS = new Set(["deno", "node", "import", "default"]);

function exportTarget(value) {
  if (typeof value === "string") return value;
  if (Array.isArray(value)) {
    for (const item of value) {
      const target = exportTarget(item);
      if (target !== null) return target;
    }
    return null;
  }
  if (value !== null && typeof value === "object") {
    for (const [condition, item] of Object.entries(value)) {
      if (!ENTRY_CONDITIONS.has(condition)) continue;
      const target = exportTarget(item);
      if (target !== null) return target;
    }
  }
  return null;
}

// The file URL an `import "<package>"` loads, when it is an ES module;
// `setRoot` is the set's folder with its links resolved.
function esmEntry(setRoot, packageDir) {
  const manifest = JSON.parse(Deno.readTextFileSync(`${packageDir}/package.json`));
  let target;
  const exports = manifest.exports;
  if (exports !== undefined && exports !== null) {
    const sugar = typeof exports === "string" || Array.isArray(exports) ||
      !Object.keys(exports).some((key) => key.startsWith("."));
    target = exportTarget(sugar ? exports : exports["."]);
  } else {
    target = typeof manifest.main === "string" ? manifest.main : "index.js";
  }
  if (typeof target !== "string") return null;
  const esm = target.endsWith(".mjs") || (target.endsWith(".js") && manifest.type === "module");
  if (!esm) return null;
  const path = Deno.realPathSync(`${packageDir}/${target.replace(/^\.\//, "")}`);
  // Inside the set, and a path a URL holds as it is.
  if (!path.startsWith(`${setRoot}/`) || /[#?%\s\\]/.test(path)) return null;
  return new URL(`file://${path}`).href;
}

function setPackages(dir) {
  const names = [];
  for (const entry of Deno.readDirSync(dir)) {
    if (entry.name.startsWith(".")) continue;
    if (entry.name.startsWith("@")) {
      for (const scoped of Deno.readDirSync(`${dir}/${entry.name}`)) names.push(`${entry.name}/${scoped.name}`);
    } else {
      names.push(entry.name);
    }
  }
  return names.sort().slice(0, MAX_PRELOADED_PACKAGES);
}

async function preloadPackages(dir) {
  let names, setRoot;
  try {
    names = setPackages(dir);
    setRoot = Deno.realPathSync(dir);
  } catch {
    return 0; // no set bound
  }
  const entries = [];
  for (const name of names) {
    try {
      const entry = esmEntry(setRoot, `${dir}/${name}`);
      if (entry !== null) entries.push(entry);
    } catch {
      // its own import will say what is wrong
    }
  }
  const loaded = await Promise.all(entries.map(async (entry) => {
    const source = `import ${JSON.stringify(entry)};\n${LINK_STOP}\n`;
    try {
      await import(`data:text/javascript,${encodeURIComponent(source)}`);
      return false; // linked: cannot happen, the stop export does not exist
    } catch (e) {
      return e instanceof SyntaxError && String(e.message).includes("__isocloud_preload_stop__");
    }
  }));
  return loaded.filter(Boolean).length;
}

if (prestarted) {
  const preloaded = typeof bootstrap.packages_dir === "string" ? await preloadPackages(bootstrap.packages_dir) : 0;
  send({ op: "waiting", preloaded_packages: preloaded });
  Object.assign(bootstrap, await assignment);
  installEnv(bootstrap.envs);
}
const { entrypoint, src_root: srcRoot, tree_path: treePath } = bootstrap;
if (srcRoot !== "/src") hostSrcUrl = `file://${srcRoot}/`;

// ---------------------------------------------------------------- assets

// The asset tree, read lazily: a file's bytes are fetched by the runner the
// first time the tenant reads it; stat and readDir answer from the manifest.
// A remote origin's manifest itself is asked for on the first file
// operation inside /src (`read_tree` is optional and may be slow); if the
// origin cannot give it, the deployment has no files.
let tree = bootstrap.tree_deferred === true ? null : JSON.parse(Deno.readTextFileSync(treePath)).entries;
let treeLoading = null;
function takeTree(ok) {
  try {
    tree = ok ? JSON.parse(fs.readTextFileSync(treePath)).entries : {};
  } catch {
    tree = {};
  }
}
async function treeReady(path) {
  if (tree !== null || treePathOf(path) === null) return;
  treeLoading ??= call({ op: "tree" }).then(() => takeTree(true), () => takeTree(false));
  await treeLoading;
}
function treeReadySync(path) {
  if (tree !== null || treePathOf(path) === null) return;
  takeTree(askSync({ op: "tree" }));
}
const materialized = new Set();
const fs = {
  readFile: Deno.readFile,
  readTextFile: Deno.readTextFile,
  readFileSync: Deno.readFileSync,
  readTextFileSync: Deno.readTextFileSync,
  open: Deno.open,
  openSync: Deno.openSync,
  stat: Deno.stat,
  statSync: Deno.statSync,
  lstat: Deno.lstat,
  lstatSync: Deno.lstatSync,
  readDir: Deno.readDir,
  readDirSync: Deno.readDirSync,
  realPath: Deno.realPath,
  realPathSync: Deno.realPathSync,
};

function normalize(path) {
  const out = [];
  for (const seg of path.split("/")) {
    if (seg === "" || seg === ".") continue;
    if (seg === "..") out.pop();
    else out.push(seg);
  }
  return "/" + out.join("/");
}

// The manifest path ("/static/a.txt", "" for the root) of a tenant path, or
// null when the path is outside the deployment root.
function treePathOf(path) {
  let text;
  if (path instanceof URL) {
    if (path.protocol !== "file:") return null;
    text = decodeURIComponent(path.pathname);
  } else {
    text = String(path);
    if (text.startsWith("file://")) text = decodeURIComponent(new URL(text).pathname);
  }
  const absolute = normalize(text.startsWith("/") ? text : Deno.cwd() + "/" + text);
  if (absolute === srcRoot) return "";
  if (!absolute.startsWith(srcRoot + "/")) return null;
  return absolute.slice(srcRoot.length);
}

function resolveEntry(treePath, follow) {
  let current = treePath;
  for (let i = 0; i < 16; i++) {
    const entry = tree[current];
    if (!entry || entry.kind !== "symlink" || !follow) return [current, entry];
    const base = entry.target.startsWith("/") ? "" : current.slice(0, current.lastIndexOf("/"));
    current = normalize(base + "/" + entry.target);
    if (current === "/") current = "";
  }
  return [current, undefined];
}

function needsFetch(path) {
  const treePath = treePathOf(path);
  if (treePath === null) return null;
  const [resolved, entry] = resolveEntry(treePath, true);
  if (!entry || entry.kind !== "file" || materialized.has(resolved)) return null;
  return resolved;
}

// The path deno's own call should open. Only files are written to disk, not
// the manifest's symlinks, so a path that reaches a file through a manifest
// symlink is replaced by the file's own path; any other path is unchanged.
function diskPath(path) {
  const treePath = treePathOf(path);
  if (treePath === null) return path;
  const [resolved, entry] = resolveEntry(treePath, true);
  if (!entry || entry.kind !== "file" || resolved === treePath) return path;
  return srcRoot + resolved;
}

async function ensure(path) {
  await treeReady(path);
  const resolved = needsFetch(path);
  if (resolved === null) return;
  await call({ op: "materialize", path: resolved });
  materialized.add(resolved);
}

// Sync reads cannot await the runner; a worker does the asking while this
// thread waits on a shared flag.
let syncWorker = null;
/** Sends `message` to the runner from the worker and blocks until it answers: whether it said ok. */
function askSync(message) {
  if (!syncWorker) {
    syncWorker = new Worker(new URL("./sync_worker.js", import.meta.url), { type: "module" });
    syncWorker.postMessage({ controlPath });
  }
  const flag = new Int32Array(new SharedArrayBuffer(8));
  syncWorker.postMessage({ message, flag });
  Atomics.wait(flag, 0, 0, 30_000);
  return Atomics.load(flag, 0) === 1;
}
function ensureSync(path) {
  treeReadySync(path);
  const resolved = needsFetch(path);
  if (resolved === null) return;
  if (!askSync({ op: "materialize", path: resolved })) {
    throw new Deno.errors.NotFound(`asset ${resolved} could not be loaded`);
  }
  materialized.add(resolved);
}

function virtualInfo(entry) {
  const isFile = entry.kind === "file";
  return {
    isFile,
    isDirectory: entry.kind === "directory",
    isSymlink: entry.kind === "symlink",
    size: isFile ? entry.size : 0,
    mtime: null,
    atime: null,
    birthtime: null,
    ctime: null,
    dev: 0,
    ino: null,
    mode: isFile ? 0o100444 : 0o40555,
    nlink: 1,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 4096,
    blocks: null,
    isBlockDevice: false,
    isCharDevice: false,
    isFifo: false,
    isSocket: false,
  };
}

// A manifest answer for a path the disk does not (yet) hold.
function virtualStat(path, follow) {
  const treePath = treePathOf(path);
  if (treePath === null) return null;
  const [, entry] = resolveEntry(treePath, follow);
  return entry ? virtualInfo(entry) : null;
}

function virtualDir(path, diskNames) {
  const treePath = treePathOf(path);
  if (treePath === null || tree[treePath]?.kind !== "directory") return null;
  const prefix = treePath + "/";
  const seen = new Set(diskNames.map((e) => e.name));
  const entries = [...diskNames];
  for (const [p, entry] of Object.entries(tree)) {
    if (!p.startsWith(prefix) || p.slice(prefix.length).includes("/")) continue;
    const name = p.slice(prefix.length);
    if (seen.has(name)) continue;
    entries.push({
      name,
      isFile: entry.kind === "file",
      isDirectory: entry.kind === "directory",
      isSymlink: entry.kind === "symlink",
    });
  }
  return entries;
}

function isNotFound(e) {
  return e instanceof Deno.errors.NotFound;
}

Deno.readFile = async (path, options) => (await ensure(path), fs.readFile(diskPath(path), options));
Deno.readTextFile = async (path, options) => (await ensure(path), fs.readTextFile(diskPath(path), options));
Deno.readFileSync = (path) => (ensureSync(path), fs.readFileSync(diskPath(path)));
Deno.readTextFileSync = (path) => (ensureSync(path), fs.readTextFileSync(diskPath(path)));
Deno.open = async (path, options) => (await ensure(path), fs.open(diskPath(path), options));
Deno.openSync = (path, options) => (ensureSync(path), fs.openSync(diskPath(path), options));
for (const [name, follow] of [["stat", true], ["lstat", false]]) {
  Deno[name] = async (path) => {
    await treeReady(path);
    try {
      return await fs[name](path);
    } catch (e) {
      const info = isNotFound(e) && virtualStat(path, follow);
      if (info) return info;
      throw e;
    }
  };
  Deno[name + "Sync"] = (path) => {
    treeReadySync(path);
    try {
      return fs[name + "Sync"](path);
    } catch (e) {
      const info = isNotFound(e) && virtualStat(path, follow);
      if (info) return info;
      throw e;
    }
  };
}
Deno.readDir = async function* (path) {
  await treeReady(path);
  let disk = [];
  try {
    for await (const e of fs.readDir(path)) disk.push(e);
  } catch (e) {
    if (!isNotFound(e) || virtualDir(path, []) === null) throw e;
  }
  yield* virtualDir(path, disk) ?? disk;
};
Deno.readDirSync = function (path) {
  treeReadySync(path);
  let disk = [];
  try {
    disk = [...fs.readDirSync(path)];
  } catch (e) {
    if (!isNotFound(e) || virtualDir(path, []) === null) throw e;
  }
  return (virtualDir(path, disk) ?? disk)[Symbol.iterator]();
};
Deno.realPath = async (path) => (await ensure(path), fs.realPath(diskPath(path)));
Deno.realPathSync = (path) => (ensureSync(path), fs.realPathSync(diskPath(path)));

const originalFetch = globalThis.fetch;
globalThis.fetch = async (input, init) => {
  const url = input instanceof Request ? input.url : String(input instanceof URL ? input.href : input);
  // An outbound call made for a traced request carries its trace
  // (W3C traceparent), unless the tenant set one itself.
  const traceparent = requestContext.getStore()?.traceparent;
  if (traceparent && /^https?:/i.test(url)) {
    const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined));
    if (!headers.has("traceparent")) {
      headers.set("traceparent", traceparent);
      init = { ...init, headers };
    }
  }
  if (url.startsWith("file:")) {
    const fileUrl = new URL(url);
    await ensure(fileUrl);
    const target = diskPath(fileUrl);
    if (target !== fileUrl) {
      const resolved = new URL("file:///");
      resolved.pathname = target;
      return originalFetch(resolved, init);
    }
  }
  return originalFetch(input, init);
};

// ---------------------------------------------------------------- handlers

const originalServe = Deno.serve.bind(Deno);
let serveHandler = null;
let serveOnError = null;
const fetchListeners = [];

// The tenant's Deno.serve: remember the handler, ignore port and hostname,
// hand back a server object that behaves like one that listens forever.
Deno.serve = function (arg1, arg2) {
  let options = {};
  let handler;
  if (typeof arg1 === "function") {
    handler = arg1;
  } else if (arg1 && typeof arg1 === "object") {
    options = arg1;
    handler = typeof arg2 === "function" ? arg2 : arg1.handler ?? arg1.fetch;
  }
  if (typeof handler !== "function") {
    throw new TypeError("Deno.serve: a handler function is required");
  }
  if (serveHandler === null) {
    serveHandler = handler;
    serveOnError = typeof options.onError === "function" ? options.onError : null;
  } else {
    console.warn("Deno.serve was called more than once; the first handler serves");
  }
  const addr = { transport: "tcp", hostname: options.hostname ?? "0.0.0.0", port: options.port ?? 8000 };
  try {
    options.onListen?.(addr);
  } catch (e) {
    console.error(e);
  }
  return {
    addr,
    finished: new Promise(() => {}),
    shutdown: () => Promise.resolve(),
    ref() {},
    unref() {},
    [Symbol.asyncDispose]: () => Promise.resolve(),
  };
};

const originalAddEventListener = globalThis.addEventListener;
globalThis.addEventListener = function (type, listener, options) {
  if (type === "fetch") {
    fetchListeners.push(typeof listener === "function" ? listener : listener.handleEvent.bind(listener));
    return;
  }
  return originalAddEventListener.call(this, type, listener, options);
};

class FetchEvent extends Event {
  #respond;
  constructor(request, respond) {
    super("fetch");
    this.request = request;
    this.#respond = respond;
  }
  respondWith(response) {
    this.#respond(response);
  }
  waitUntil(promise) {
    Promise.resolve(promise).catch((e) => console.error(e));
  }
}

// Node-style servers (`node:http` `createServer(...).listen(port)`, and so
// Express, Koa, Fastify): when the runner says the deployment may start one
// (it has npm packages or names node:http), listen() is taken over before
// tenant code runs. The server is remembered, told it listens on the port
// it asked for, and, once the entrypoint has run, really listens on the
// isolate's socket. Only then: loading node:http costs a cold start 10-30 ms.
let nodeServer = null;
let nodeListen = null;
function packagesUseNodeHttp() {
  try {
    Deno.statSync(`${srcRoot}/node_modules/.isocloud-uses-node-http`);
    return true;
  } catch {
    return false;
  }
}
if (bootstrap.node_servers === true || (bootstrap.node_servers === "if-packages-use-it" && packagesUseNodeHttp())) {
  const http = await import("node:http");
  nodeListen = http.Server.prototype.listen;
  http.Server.prototype.listen = function (...args) {
    const callback = typeof args[args.length - 1] === "function" ? args.pop() : null;
    const first = args[0];
    const port = typeof first === "number" || typeof first === "string" ? Number(first) : Number(first?.port ?? 0);
    if (nodeServer !== null && nodeServer !== this) {
      console.warn("a second node:http server called listen(); the first one serves");
    } else {
      nodeServer = this;
    }
    const address = { address: "0.0.0.0", family: "IPv4", port: port || 8000 };
    this.address = () => address;
    if (callback) this.once("listening", callback);
    return this;
  };
}

function serveNodeServer(server) {
  const emit = server.emit;
  server.emit = function (event, request, response) {
    if (event !== "request") return emit.apply(this, arguments);
    // The runner sends the absolute form (http://host/path?q); Node
    // handlers expect the path, as Node gives it for an origin-form target.
    const url = request.url;
    if (typeof url === "string" && /^https?:\/\//.test(url)) {
      const slash = url.indexOf("/", url.indexOf("//") + 2);
      request.url = slash < 0 ? "/" : url.slice(slash);
    }
    const current = {
      id: request.headers["x-isocloud-request-id"] ?? null,
      traceparent: request.headers["traceparent"] ?? null,
    };
    return requestContext.run(current, () => emit.call(this, event, request, response));
  };
  server.once("listening", () => send({ op: "ready" }));
  nodeListen.call(server, { path: socketPath });
}

function dispatchFetchEvent(request) {
  return new Promise((resolve, reject) => {
    let responded = false;
    const event = new FetchEvent(request, (response) => {
      responded = true;
      Promise.resolve(response).then(resolve, reject);
    });
    for (const listener of fetchListeners) {
      listener(event);
      if (responded) return;
    }
    reject(new Error("no fetch event listener called respondWith()"));
  });
}

const DENO1_GLOBALS = [
  ["window", "use globalThis"],
  ["Deno.run", "use new Deno.Command(...)"],
];

// Frames of the tenant's code a start failure names: where it threw.
const START_FAILURE_FRAMES = 5;
function startFailure(code, error) {
  let message = String(error);
  if (error instanceof Error) {
    // Deno's load errors may carry their own kind already ("SyntaxError: …"
    // inside a TypeError): named once.
    message = /^[A-Z][A-Za-z]*Error: /.test(error.message) ? error.message : `${error.name}: ${error.message}`;
    const frames = String(error.stack ?? "")
      .split("\n")
      .filter((line) => /^\s+at /.test(line) && !PLATFORM_FRAME.test(line) && !message.includes(line.trim()))
      .slice(0, START_FAILURE_FRAMES);
    if (frames.length > 0) message += `\n${frames.join("\n")}`;
  }
  // Without its own root the isolate's files live under a host path; the
  // tenant should read its own names (file:///src/...) in the message.
  message = tenantText(message);
  // Deno 1's globals, gone in Deno 2: say what replaces them.
  for (const [gone, instead] of DENO1_GLOBALS) {
    if (message.includes(`${gone} is not defined`)) message += ` (Deno 2 has no ${gone}: ${instead})`;
  }
  return send({ op: "start_error", code, message }).then(() => Deno.exit(1));
}

// Deploy-era servers: `Deno.listen({ port })` (and `Deno.listenTls`, TLS
// being the runner's) with `Deno.serveHttp(conn)` or old std/http's serve.
// The first TCP listener the tenant opens before it has any other handler
// becomes the isolate's server: it is the isolate's own socket (any port
// number, for every tenant; nothing binds in the host's network), and the
// runner's requests arrive on it as they did on Deploy.
const originalListen = Deno.listen;
let tenantListener = null;
let resolveTenantListener = () => {};
const tenantListening = new Promise((resolve) => (resolveTenantListener = resolve));
function listenAsTheServer(options) {
  const transport = options?.transport ?? "tcp";
  if (tenantListener !== null || serveHandler !== null || transport !== "tcp") return null;
  const inner = originalListen({ transport: "unix", path: socketPath });
  const addr = { transport: "tcp", hostname: options?.hostname ?? "0.0.0.0", port: Number(options?.port ?? 0) || 8000 };
  // The tenant sees the address it asked for; the connections are the runner's.
  tenantListener = new Proxy(inner, {
    get(target, key) {
      if (key === "addr") return addr;
      const value = Reflect.get(target, key, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  resolveTenantListener();
  return tenantListener;
}
Deno.listen = function (options) {
  return listenAsTheServer(options) ?? originalListen.call(Deno, options);
};
const originalListenTls = Deno.listenTls;
Deno.listenTls = function (options) {
  return listenAsTheServer({ ...options, transport: "tcp" }) ?? originalListenTls.call(Deno, options);
};

let mod;
// A Deploy-era entrypoint may never finish evaluating (a top-level `for
// await (const conn of listener)`): its listener is enough to serve.
const loading = import(entrypoint);
try {
  const first = await Promise.race([loading.then((m) => ({ m })), tenantListening.then(() => null)]);
  if (first) mod = first.m;
} catch (e) {
  const notFound = e instanceof TypeError && /Module not found|Cannot resolve module|Import .* not a dependency|Relative import path|--no-npm is specified|--no-remote is specified|--cached-only is specified|not found in cache/.test(String(e.message));
  await startFailure(notFound ? "MODULE_NOT_FOUND" : "ISOLATE_START_FAILED", e);
}

let handler = serveHandler;
if (!handler && mod?.default && typeof mod.default.fetch === "function") {
  const target = mod.default;
  handler = (request, info) => target.fetch(request, info);
}
if (!handler && fetchListeners.length > 0) {
  handler = (request) => dispatchFetchEvent(request);
}
if (!handler && tenantListener !== null) {
  // The tenant accepts on it; an error later in its module is its own.
  loading.catch((e) => console.error("Uncaught", e));
  send({ op: "ready" });
} else if (!handler && nodeServer !== null) {
  serveNodeServer(nodeServer);
} else if (!handler) {
  await startFailure(
    "ISOLATE_START_FAILED",
    "the entrypoint registered no handler: call Deno.serve(handler), export default { fetch }, addEventListener(\"fetch\", ...), Deno.listen({ port }), or listen() on a node:http server",
  );
}

function internalError(e) {
  console.error(e);
  return new Response("Internal Server Error", { status: 500 });
}

function handlerError(e) {
  return serveOnError ? serveOnError(e) : internalError(e);
}

// Runs inside the request's context, so a throw or a rejection is logged
// with the request's id; no async wrapper (a promise and a frame per request).
function invokeHandler(request, info) {
  try {
    const response = handler(request, info);
    return typeof response?.then === "function" ? response.then(undefined, handlerError) : response;
  } catch (e) {
    return handlerError(e);
  }
}

// What the tenant's handler gets as its second argument. The isolate's
// socket is the runner's; the client is who the runner says it is
// (`x-forwarded-for`, set on every request it passes in), read when asked.
class TenantInfo {
  #info;
  #request;
  #remoteAddr;
  constructor(info, request) {
    this.#info = info;
    this.#request = request;
  }
  get remoteAddr() {
    if (this.#remoteAddr === undefined) {
      const client = servedHeader(this.#request, "x-forwarded-for");
      this.#remoteAddr = client ? { transport: "tcp", hostname: client, port: 0 } : this.#info.remoteAddr;
    }
    return this.#remoteAddr;
  }
  get completed() {
    return this.#info.completed;
  }
}

if (handler) originalServe(
  {
    path: socketPath,
    onListen() {
      send({ op: "ready" });
    },
    onError: handlerError,
  },
  (request, info) =>
    requestContext.run(new ServedRequestContext(request), invokeHandler, request, new TenantInfo(info, request)),
);

globalThis.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  console.error("Uncaught (in promise)", event.reason);
});
