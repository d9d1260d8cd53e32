#!/usr/bin/env node
// Builds an ESZIP archive with @deno/eszip (the Deno toolchain's own writer,
// compiled to Wasm) from files on disk, without touching the network.
//
//   node tools/eszip/build.mjs --root DIR --out FILE.eszip
//        [--base file:///src/] [--remote DIR2] [--import-map SPECIFIER]
//        [--rename-ts-to-tsx] [--npm-snapshot FILE.json] ENTRY_SPECIFIER...
//
// Loading rules (the loader handed to `build(roots, loader)`):
//   * `<base><path>` (default base `file:///src/`) is read from `DIR/<path>`.
//     Paths may not leave DIR.
//   * `https://host/path` and `http://host/path` are read from
//     `DIR2/<host>/<path>` when `--remote DIR2` is given; the query string is
//     ignored. If that file is missing but `DIR2/<host>/<path>.redirect`
//     exists, its first line is the URL the request redirects to (this is
//     how tests get redirect entries into an archive). Without `--remote`,
//     remote imports are an error: this tool never uses the network.
//   * With `--rename-ts-to-tsx`, a local `<base><path>.ts` is read from
//     `DIR/<path>.ts` but answered as `<base><path>.tsx`, as a subhoster's
//     loader that renamed its modules did: the archive holds a redirect
//     from each `.ts` specifier to its `.tsx`.
//   * `node:` and `npm:` imports are left external (not in the archive).
//   * `--npm-snapshot FILE.json` adds an npm section, as the `eszip` crate
//     (and `deno compile`) write one, to the archive @deno/eszip wrote:
//     `{ "roots": { "<request>": "<id>" }, "packages": { "<id>":
//     { "<name required by>": "<id>" } } }` — requests like `hono@^4`, ids
//     like `hono@4.6.3`; packages are indexed in id order.
//   * Anything else, or a missing file, fails the build.
//
// ENTRY_SPECIFIERs may be absolute URLs or paths relative to `--base`.
// On success prints one line to stdout:
//   `wrote <bytes> bytes (<magic>) to <FILE>`
// On failure prints `build.mjs: error: ...` to stderr and exits with 1 (bad
// usage exits with 2).

import { mkdir, readFile, rename, stat, writeFile } from "node:fs/promises";
import path from "node:path";
import process from "node:process";

const USAGE =
  "usage: node tools/eszip/build.mjs --root DIR --out FILE.eszip " +
  "[--base file:///src/] [--remote DIR2] [--import-map SPECIFIER] " +
  "[--rename-ts-to-tsx] [--npm-snapshot FILE.json] ENTRY_SPECIFIER...";

const MAX_REDIRECTS = 10;

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = {
    root: undefined,
    out: undefined,
    base: "file:///src/",
    remote: undefined,
    importMap: undefined,
    renameTsToTsx: false,
    npmSnapshot: undefined,
    entries: [],
  };
  const takesValue = {
    "--root": "root",
    "--out": "out",
    "--base": "base",
    "--remote": "remote",
    "--import-map": "importMap",
    "--npm-snapshot": "npmSnapshot",
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "-h" || arg === "--help") {
      process.stdout.write(`${USAGE}\n`);
      process.exit(0);
    }
    const key = takesValue[arg];
    if (arg === "--rename-ts-to-tsx") {
      opts.renameTsToTsx = true;
    } else if (key !== undefined) {
      const value = argv[++i];
      if (value === undefined) throw new UsageError(`${arg} needs a value`);
      opts[key] = value;
    } else if (arg.startsWith("--")) {
      throw new UsageError(`unknown option ${arg}`);
    } else {
      opts.entries.push(arg);
    }
  }
  if (opts.root === undefined) throw new UsageError("--root is required");
  if (opts.out === undefined) throw new UsageError("--out is required");
  if (opts.entries.length === 0) {
    throw new UsageError("at least one ENTRY_SPECIFIER is required");
  }
  let base;
  try {
    base = new URL(opts.base);
  } catch {
    throw new UsageError(`--base ${opts.base} is not a URL`);
  }
  if (!base.href.endsWith("/")) {
    throw new UsageError(`--base ${opts.base} must end with "/"`);
  }
  opts.base = base.href;
  opts.root = path.resolve(opts.root);
  if (opts.remote !== undefined) opts.remote = path.resolve(opts.remote);
  opts.entries = opts.entries.map((entry) => {
    try {
      return new URL(entry, opts.base).href;
    } catch {
      throw new UsageError(`entry ${entry} is not a specifier`);
    }
  });
  return opts;
}

// Joins `relative` (a decoded URL path) onto `dir`, refusing to leave `dir`.
function confine(dir, relative, specifier) {
  const full = path.resolve(dir, `.${path.posix.sep}${relative}`);
  if (full !== dir && !full.startsWith(dir + path.sep)) {
    throw new Error(`${specifier} resolves outside ${dir}`);
  }
  return full;
}

async function readIfFile(file) {
  try {
    if (!(await stat(file)).isFile()) return undefined;
    return await readFile(file);
  } catch (err) {
    if (err.code === "ENOENT" || err.code === "ENOTDIR") return undefined;
    throw err;
  }
}

const CONTENT_TYPES = {
  ".js": "application/javascript",
  ".mjs": "application/javascript",
  ".cjs": "application/javascript",
  ".jsx": "text/jsx",
  ".ts": "application/typescript",
  ".mts": "application/typescript",
  ".cts": "application/typescript",
  ".tsx": "text/tsx",
  ".json": "application/json",
  ".wasm": "application/wasm",
};

function contentTypeFor(pathname) {
  return CONTENT_TYPES[path.posix.extname(pathname)] ??
    "application/octet-stream";
}

function makeLoader(opts) {
  const loadLocal = async (specifier) => {
    const relative = decodeURIComponent(specifier.slice(opts.base.length));
    const file = confine(opts.root, relative, specifier);
    const content = await readIfFile(file);
    if (content === undefined) {
      throw new Error(`${specifier}: no file ${file}`);
    }
    if (opts.renameTsToTsx && specifier.endsWith(".ts")) {
      return { kind: "module", specifier: `${specifier}x`, content };
    }
    return { kind: "module", specifier, content };
  };

  const loadRemote = async (specifier, hops) => {
    if (opts.remote === undefined) {
      throw new Error(
        `${specifier}: remote import but no --remote folder given ` +
          "(this tool never uses the network)",
      );
    }
    const url = new URL(specifier);
    const hostDir = confine(opts.remote, url.host, specifier);
    const file = confine(hostDir, decodeURIComponent(url.pathname), specifier);
    const content = await readIfFile(file);
    if (content !== undefined) {
      return {
        kind: "module",
        specifier,
        headers: { "content-type": contentTypeFor(url.pathname) },
        content,
      };
    }
    const redirect = await readIfFile(`${file}.redirect`);
    if (redirect === undefined) {
      throw new Error(`${specifier}: no file ${file} (nor ${file}.redirect)`);
    }
    if (hops >= MAX_REDIRECTS) {
      throw new Error(`${specifier}: more than ${MAX_REDIRECTS} redirects`);
    }
    const target = new URL(
      redirect.toString("utf8").split("\n")[0].trim(),
      specifier,
    ).href;
    // The final specifier in the answer is what makes deno_graph record a
    // redirect entry.
    return await load(target, hops + 1);
  };

  const load = async (specifier, hops = 0) => {
    if (specifier.startsWith(opts.base)) return await loadLocal(specifier);
    const { protocol } = new URL(specifier);
    if (protocol === "https:" || protocol === "http:") {
      return await loadRemote(specifier, hops);
    }
    if (protocol === "node:" || protocol === "npm:") {
      return { kind: "external", specifier };
    }
    throw new Error(
      `${specifier}: not under --base ${opts.base} and not a remote URL`,
    );
  };

  return (specifier) => load(specifier);
}

async function main() {
  let opts;
  try {
    opts = parseArgs(process.argv.slice(2));
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`build.mjs: error: ${err.message}\n${USAGE}\n`);
      process.exit(2);
    }
    throw err;
  }

  let build;
  try {
    ({ build } = await import("@deno/eszip"));
  } catch (err) {
    throw new Error(
      `cannot load @deno/eszip (${err.message}); ` +
        "run `npm ci --prefix tools/eszip` first",
    );
  }

  let bytes = await build(opts.entries, makeLoader(opts), opts.importMap);
  if (opts.npmSnapshot !== undefined) {
    const snapshot = JSON.parse(await readFile(opts.npmSnapshot, "utf8"));
    bytes = withNpmSnapshot(bytes, snapshot);
  }
  const out = path.resolve(opts.out);
  await mkdir(path.dirname(out), { recursive: true });
  const tmp = `${out}.tmp-${process.pid}`;
  await writeFile(tmp, bytes);
  await rename(tmp, out);
  const magic = Buffer.from(bytes.subarray(0, 8)).toString("latin1");
  process.stdout.write(`wrote ${bytes.length} bytes (${magic}) to ${out}\n`);
}

// The archive @deno/eszip writes (ESZIP2.3 without checksums: options
// `[0, 0, 1, 0]`, empty npm section) with the npm specifier entries appended
// to its modules header and the snapshot in its npm section. Sources keep
// their offsets: they follow the sections and are not touched.
function withNpmSnapshot(bytes, snapshot) {
  const input = Buffer.from(bytes);
  const magic = input.subarray(0, 8).toString("latin1");
  if (magic !== "ESZIP2.3") throw new Error(`unexpected magic ${magic}`);
  let at = 8;
  const section = () => {
    const len = input.readUInt32BE(at);
    const body = input.subarray(at + 4, at + 4 + len);
    at += 4 + len;
    return body;
  };
  const options = section();
  if (!options.equals(Buffer.from([0, 0, 1, 0]))) {
    throw new Error("--npm-snapshot needs an archive without checksums");
  }
  const header = section();
  const npm = section();
  if (npm.length !== 0) throw new Error("the archive already has npm packages");
  const rest = input.subarray(at);

  const u32 = (n) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    return b;
  };
  const str = (s) => {
    const b = Buffer.from(s, "utf8");
    return Buffer.concat([u32(b.length), b]);
  };
  const ids = Object.keys(snapshot.packages).sort();
  const index = (id) => {
    const i = ids.indexOf(id);
    if (i < 0) throw new Error(`the snapshot names ${id} but does not list it`);
    return i;
  };
  const entries = Object.keys(snapshot.roots).sort().map((req) =>
    Buffer.concat([str(req), Buffer.from([2]), u32(index(snapshot.roots[req]))])
  );
  const packages = ids.map((id) => {
    const deps = Object.entries(snapshot.packages[id]).sort();
    return Buffer.concat([
      str(id),
      u32(deps.length),
      ...deps.map(([name, dep]) => Buffer.concat([str(name), u32(index(dep))])),
    ]);
  });
  const newHeader = Buffer.concat([header, ...entries]);
  const newNpm = Buffer.concat(packages);
  return Buffer.concat([
    input.subarray(0, 8),
    u32(options.length),
    options,
    u32(newHeader.length),
    newHeader,
    u32(newNpm.length),
    newNpm,
    rest,
  ]);
}

main().catch((err) => {
  // @deno/eszip rejects with a string (`String(error)`), so strip the
  // "Error: " prefix it carries.
  const message = (err instanceof Error ? err.message : String(err))
    .replace(/^Error: /, "");
  process.stderr.write(`build.mjs: error: ${message}\n`);
  process.exit(1);
});
