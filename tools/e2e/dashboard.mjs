#!/usr/bin/env node
// End-to-end test of the isocloud dashboard in a real browser (Debian's
// chromium driven by playwright-core) against a running `isocloud serve`:
// log in, create a project in the UI, deploy a hello app through the API,
// promote and roll back in the UI, send traffic through the runner, and watch
// it arrive in the analytics charts and the live logs.
//
//   node tools/e2e/dashboard.mjs --url http://127.0.0.1:8081 --token-file DATA/admin-token \
//     --public http://127.0.0.1:8080 --base-domain localhost [--screenshot out.png] [--screenshot-dir DIR]
//
// Every option can also come from the environment: ISOCLOUD_E2E_URL,
// ISOCLOUD_E2E_TOKEN_FILE, ISOCLOUD_E2E_PUBLIC, ISOCLOUD_E2E_BASE_DOMAIN,
// ISOCLOUD_E2E_SCREENSHOT, ISOCLOUD_E2E_SCREENSHOT_DIR, ISOCLOUD_E2E_CHROMIUM
// (default /usr/bin/chromium), ISOCLOUD_E2E_TIMEOUT_S (default 120).
// Exits 0 on success; on failure prints what was expected and what was seen,
// saves a screenshot and exits 1. It always stops by itself.

import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    url: { type: "string", default: process.env.ISOCLOUD_E2E_URL },
    "token-file": { type: "string", default: process.env.ISOCLOUD_E2E_TOKEN_FILE },
    public: { type: "string", default: process.env.ISOCLOUD_E2E_PUBLIC },
    "base-domain": { type: "string", default: process.env.ISOCLOUD_E2E_BASE_DOMAIN ?? "localhost" },
    screenshot: { type: "string", default: process.env.ISOCLOUD_E2E_SCREENSHOT },
    "screenshot-dir": { type: "string", default: process.env.ISOCLOUD_E2E_SCREENSHOT_DIR },
    chromium: { type: "string", default: process.env.ISOCLOUD_E2E_CHROMIUM ?? "/usr/bin/chromium" },
    timeout: { type: "string", default: process.env.ISOCLOUD_E2E_TIMEOUT_S ?? "120" },
    help: { type: "boolean", short: "h" },
  },
});

const USAGE = "usage: node dashboard.mjs --url <control plane URL> --token-file <path> --public <runner URL base> " +
  "--base-domain <domain> [--screenshot <png>] [--screenshot-dir <dir>] [--chromium <path>] [--timeout <s>]";
if (args.help) {
  console.log(USAGE);
  process.exit(0);
}
for (const required of ["url", "token-file", "public"]) {
  if (!args[required]) {
    console.error(`dashboard e2e: --${required} is required\n${USAGE}`);
    process.exit(2);
  }
}

const controlUrl = args.url.replace(/\/+$/, "");
const publicUrl = new URL(args.public);
const baseDomain = args["base-domain"];
const token = readFileSync(args["token-file"], "utf8").trim();
const overallMs = Number(args.timeout) * 1000;
const started = Date.now();
const suffix = randomBytes(4).toString("hex");
const project = `e2e-${suffix}`;
const marker = `e2e-hello-${suffix}`;
const REQUESTS = 5;

/** A failed expectation: what the test wanted and what it saw. */
class Expectation extends Error {
  constructor(expected, seen) {
    super(`expected ${expected}\n  seen: ${typeof seen === "string" ? seen : JSON.stringify(seen)}`);
  }
}

let currentStep = "start";
const log = (text) => console.log(`[${((Date.now() - started) / 1000).toFixed(1)}s] ${text}`);

async function step(name, fn) {
  currentStep = name;
  const t0 = Date.now();
  const result = await fn();
  log(`ok   ${name} (${Date.now() - t0} ms)`);
  return result;
}

/** Polls `probe` (→ { ok, seen }) until ok, else fails with the last thing seen. */
async function until(expected, probe, timeoutMs = 15_000, intervalMs = 250) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last.ok) return last.seen;
    } catch (e) {
      last = { seen: `(probe failed: ${e.message.split("\n")[0]})` };
    }
    if (Date.now() > deadline) throw new Expectation(`${expected} (within ${timeoutMs / 1000} s)`, last.seen);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

// ------------------------------------------------------------------ the API, from node

async function apiCall(method, pathname, body, { raw = false, as = token } = {}) {
  const headers = { authorization: `Bearer ${as}` };
  let payload;
  if (raw) {
    headers["content-type"] = "application/octet-stream";
    payload = body;
  } else if (body !== undefined) {
    headers["content-type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(`${controlUrl}/api/v1${pathname}`, {
    method, headers, body: payload, signal: AbortSignal.timeout(30_000),
  });
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    // left null; the text is reported below
  }
  return { status: response.status, json, text };
}

function expectStatus(what, answer, ...statuses) {
  if (!statuses.includes(answer.status)) {
    throw new Expectation(`${what} to answer ${statuses.join(" or ")}`, `${answer.status} ${answer.text.slice(0, 500)}`);
  }
  return answer.json;
}

const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex");

/** Uploads the files' blobs (only the missing ones) and creates a deployment. */
async function deploy(files, extra) {
  const manifest = {};
  const byHash = new Map();
  for (const [name, text] of Object.entries(files)) {
    const bytes = Buffer.from(text);
    const hash = sha256(bytes);
    manifest[name] = { hash, size: bytes.length };
    byHash.set(hash, bytes);
  }
  const { missing } = expectStatus("POST /blobs/missing",
    await apiCall("POST", "/blobs/missing", { hashes: [...byHash.keys()] }), 200);
  if (!Array.isArray(missing)) throw new Expectation("a `missing` array from /blobs/missing", missing);
  for (const hash of missing) {
    const stored = expectStatus(`PUT /blobs/${hash}`, await apiCall("PUT", `/blobs/${hash}`, byHash.get(hash), { raw: true }), 201, 200);
    if (stored?.hash !== hash) throw new Expectation(`the blob stored as ${hash}`, stored);
  }
  const deployment = expectStatus(`POST /projects/${project}/deployments`,
    await apiCall("POST", `/projects/${project}/deployments`, { entrypoint: "main.ts", files: manifest, ...extra }), 201);
  if (!/^[a-z0-9]{12}$/.test(deployment?.id ?? "")) throw new Expectation("a 12-character deployment id", deployment);
  return deployment;
}

function helloApp(version) {
  return {
    "main.ts": `// The dashboard end-to-end test's app (${version}).
Deno.serve((request: Request) => {
  const url = new URL(request.url);
  console.log("${marker}-${version} served " + url.pathname);
  if (url.pathname === "/missing") return new Response("no such page\\n", { status: 404 });
  return new Response("hello from ${marker}-${version} " + url.pathname + "\\n");
});
`,
  };
}

/** GET through the runner with Host `<project>.<base domain>` (fetch cannot set Host). */
function publicGet(pathname, host) {
  return new Promise((resolve, reject) => {
    const request = http.request({
      hostname: publicUrl.hostname, port: publicUrl.port || 80, path: pathname, method: "GET",
      headers: { host }, timeout: 30_000,
    }, (response) => {
      const chunks = [];
      response.on("data", (chunk) => chunks.push(chunk));
      response.on("end", () => resolve({ status: response.statusCode, body: Buffer.concat(chunks).toString() }));
      response.on("error", reject);
    });
    request.on("timeout", () => request.destroy(new Error(`no answer from ${publicUrl.host} for ${host}${pathname} within 30 s`)));
    request.on("error", reject);
    request.end();
  });
}

// ------------------------------------------------------------------ the browser

const userDataDir = mkdtempSync(path.join(os.tmpdir(), "isocloud-e2e-"));
const failureShot = `${userDataDir}-failure.png`;
let context = null;
let page = null;
const pageErrors = [];
const consoleErrors = [];
let finished = false;

const byTestId = (id) => `[data-testid="${id}"]`;

async function shot(name) {
  if (!args["screenshot-dir"]) return;
  mkdirSync(args["screenshot-dir"], { recursive: true });
  await page.screenshot({ path: path.join(args["screenshot-dir"], `${name}.png`), fullPage: true });
}

async function bannerText() {
  return page.evaluate(() => {
    const el = document.querySelector('[data-testid="error-banner"]');
    return el && !el.hidden ? el.textContent.trim() : null;
  });
}

async function deploymentRows() {
  return page.$$eval('[data-testid="deployment-row"]', (rows) => rows.map((row) => ({
    id: row.dataset.deploymentId,
    prod: !!row.querySelector('[data-testid="prod-label"]'),
    status: row.dataset.status,
    promote: !!row.querySelector('[data-testid="promote-button"]'),
    git: row.querySelector('[data-testid="deployment-git"]')?.textContent.trim() ?? null,
    url: row.querySelector('[data-testid="deployment-url"]')?.getAttribute("href") ?? null,
    created: row.querySelector('[data-testid="deployment-created"]')?.textContent.trim() ?? null,
  })));
}

/** Waits until exactly `id` carries the Prod label (and the header agrees). */
async function expectProd(id, others) {
  await until(`the Prod label on ${id} only`, async () => {
    const rows = await deploymentRows();
    const header = await page.textContent(byTestId("production-deployment-id")).catch(() => null);
    const labelled = rows.filter((r) => r.prod).map((r) => r.id);
    const ok = labelled.length === 1 && labelled[0] === id && header === id &&
      others.every((o) => rows.some((r) => r.id === o && r.promote));
    return { ok, seen: { prod_labels: labelled, header_production_id: header, rows } };
  });
}

async function openTab(tab) {
  await page.click(byTestId(`tab-${tab}`));
  await page.waitForSelector(byTestId(`panel-${tab}`), { timeout: 10_000 });
}

async function run() {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: args.chromium,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    timeout: 30_000,
  });
  context.setDefaultTimeout(15_000);
  page = context.pages()[0] ?? await context.newPage();
  page.on("pageerror", (error) => pageErrors.push(error.message));
  page.on("console", (message) => {
    if (message.type() === "error") consoleErrors.push(message.text());
  });

  await step("the dashboard shows the login screen", async () => {
    await page.goto(controlUrl, { waitUntil: "domcontentloaded" });
    await until("the login form", async () => ({
      ok: await page.isVisible(byTestId("login-form")),
      seen: `url ${page.url()}, body: ${(await page.textContent("body")).trim().slice(0, 200)}`,
    }));
    await shot("01-login");
  });

  await step("a wrong token is refused with a visible error", async () => {
    await page.fill(byTestId("login-token"), `wrong-${suffix}`);
    await page.click(byTestId("login-submit"));
    await until("an UNAUTHORIZED banner", async () => {
      const text = await bannerText();
      return { ok: !!text && text.includes("UNAUTHORIZED"), seen: text };
    });
  });

  await step("logging in with the token shows the projects", async () => {
    await page.fill(byTestId("login-token"), token);
    await page.click(byTestId("login-submit"));
    await page.waitForSelector(byTestId("create-project-form"));
    const who = await until("the token's name in the header", async () => {
      const text = (await page.textContent(byTestId("whoami")))?.trim();
      return { ok: !!text, seen: text };
    });
    const stored = await page.evaluate(() => localStorage.getItem("isocloud.token"));
    if (stored !== token) throw new Expectation("the token kept in localStorage", stored ? "another value" : stored);
    log(`     signed in as ${who}`);
  });

  await step("an invalid project name shows the API's error", async () => {
    await page.fill(byTestId("new-project-name"), "Not_A-Valid-Name");
    await page.click(byTestId("create-project"));
    await until("an INVALID_FIELD banner", async () => {
      const text = await bannerText();
      return { ok: !!text && text.includes("INVALID_FIELD"), seen: text };
    });
  });

  await step(`creating project ${project} in the UI`, async () => {
    await page.fill(byTestId("new-project-name"), project);
    await page.click(byTestId("create-project"));
    await until(`the project page of ${project}`, async () => ({
      ok: page.url().endsWith(`#/projects/${project}`) && (await page.isVisible(byTestId("no-deployments"))),
      seen: { url: page.url(), heading: await page.textContent(byTestId("project-name")).catch(() => null), banner: await bannerText() },
    }));
    const listed = expectStatus("GET /projects", await apiCall("GET", "/projects"), 200);
    if (!listed.some((p) => p.name === project)) throw new Expectation(`${project} in GET /projects`, listed.map((p) => p.name));
  });

  const commit1 = randomBytes(20).toString("hex");
  const v1 = await step("deploying v1 (production) through the API", () =>
    deploy(helloApp("v1"), { production: true, git: { commit: commit1, message: "e2e: first version", branch: "main" } }));
  log(`     v1 = ${v1.id} at ${v1.url}`);

  await step("v1 appears in the UI with its commit and the Prod label", async () => {
    await until(`deployment ${v1.id} with git ${commit1.slice(0, 7)}`, async () => {
      const rows = await deploymentRows();
      const row = rows.find((r) => r.id === v1.id);
      const ok = !!row && row.git?.includes(commit1.slice(0, 7)) && row.git.includes("e2e: first version") &&
        row.git.includes("main") && row.url === new URL(v1.url).href && !!row.created;
      return { ok, seen: rows };
    }, 20_000);
    await expectProd(v1.id, []);
  });

  // The commit message is markup on purpose: the dashboard must show it as text.
  const hostileMessage = `e2e: second <img src=x onerror="window.__xss=1"><b>bold</b>`;
  const v2 = await step("deploying v2 (not production) through the API", () =>
    deploy(helloApp("v2"), { git: { commit: randomBytes(20).toString("hex"), message: hostileMessage, branch: "feature/e2e" } }));
  log(`     v2 = ${v2.id}`);

  await step("v2 appears first, with a Promote button, and v1 keeps the Prod label", async () => {
    await until(`${v2.id} listed first, ready`, async () => {
      const rows = await deploymentRows();
      return { ok: rows[0]?.id === v2.id && rows[0].status === "ready" && rows[0].promote, seen: rows };
    }, 30_000);
    await expectProd(v1.id, [v2.id]);
    const shown = await page.evaluate((id) => {
      const row = document.querySelector(`[data-deployment-id="${id}"]`);
      return { git: row.querySelector('[data-testid="deployment-git"]')?.textContent ?? null,
        markup: row.querySelectorAll("img, b").length, xss: window.__xss ?? null };
    }, v2.id);
    if (!shown.git?.includes(hostileMessage) || shown.markup !== 0 || shown.xss !== null) {
      throw new Expectation(`the commit message shown as text: ${hostileMessage}`, shown);
    }
    await shot("02-deployments-before-promote");
  });

  await step("Promote moves the Prod label to v2", async () => {
    await page.click(`[data-deployment-id="${v2.id}"] ${byTestId("promote-button")}`);
    await expectProd(v2.id, [v1.id]);
    const p = expectStatus("GET project", await apiCall("GET", `/projects/${project}`), 200);
    if (p.production_deployment_id !== v2.id) throw new Expectation(`production_deployment_id ${v2.id}`, p);
  });

  await step("Rollback moves it back to v1, Promote to v2 again", async () => {
    await page.click(byTestId("rollback-button"));
    await expectProd(v1.id, [v2.id]);
    await page.click(`[data-deployment-id="${v2.id}"] ${byTestId("promote-button")}`);
    await expectProd(v2.id, [v1.id]);
  });

  const broken = await step("deploying a broken app through the API: its build fails", async () => {
    const d = await deploy({ "main.ts": "const x = ;\nDeno.serve(() => new Response(\"x\"));\n" });
    if (d.status !== "failed" || !String(d.error ?? "").includes("SyntaxError")) {
      throw new Expectation("status failed with a SyntaxError", d);
    }
    return d;
  });

  await step("the failed deployment shows a red failed badge, its error, no Promote, and its build log", async () => {
    await until(`${broken.id} listed as failed`, async () => {
      const rows = await deploymentRows();
      const row = rows.find((r) => r.id === broken.id);
      return { ok: row?.status === "failed" && !row.promote, seen: row ?? rows };
    }, 30_000);
    const error = await page.textContent(`[data-deployment-id="${broken.id}"] ${byTestId("deployment-error")}`);
    if (!error?.includes("file:///src/main.ts:1:11")) throw new Expectation("the error names main.ts:1:11", error);
    await page.click(`[data-deployment-id="${broken.id}"] ${byTestId("build-log-button")}`);
    const logText = await until("the build log under the deployment", async () => {
      const text = await page.textContent(`[data-deployment-id="${broken.id}"] ${byTestId("build-log")}`).catch(() => null);
      return { ok: Boolean(text?.includes("SyntaxError")), seen: text };
    });
    if (String(logText).includes("/builds/")) throw new Expectation("no host path in the build log", logText);
    await expectProd(v2.id, [v1.id]);
    await shot("02b-failed-build");
  });

  const host = `${project}.${baseDomain}`;
  await step(`${REQUESTS} requests to ${host} reach v2 through the runner`, async () => {
    for (let i = 0; i < REQUESTS; i++) {
      const answer = await publicGet(`/e2e/${i}`, host);
      const want = `hello from ${marker}-v2 /e2e/${i}`;
      if (answer.status !== 200 || !answer.body.includes(want)) {
        throw new Expectation(`200 "${want}" from ${host}`, `${answer.status} ${answer.body.slice(0, 300)}`);
      }
    }
  });

  await step(`2 requests to ${host}/missing are the app's 404s`, async () => {
    for (let i = 0; i < 2; i++) {
      const answer = await publicGet("/missing", host);
      if (answer.status !== 404) throw new Expectation(`404 from ${host}/missing`, `${answer.status} ${answer.body.slice(0, 200)}`);
    }
  });

  await step(`the requests chart counts the ${REQUESTS} requests`, async () => {
    await openTab("analytics");
    const seen = await until(`chart-requests data-total >= ${REQUESTS}, equal to the total shown as text`, async () => {
      const state = await page.evaluate(() => {
        const svg = document.querySelector('[data-testid="chart-requests"]');
        return {
          total: svg ? Number(svg.getAttribute("data-total")) : null,
          text: document.querySelector('[data-testid="total-requests"]')?.textContent.trim() ?? null,
          charts: [...document.querySelectorAll("svg[data-testid^=chart-]")].map((el) => el.getAttribute("data-testid")),
          banner: (() => {
            const b = document.querySelector('[data-testid="error-banner"]');
            return b && !b.hidden ? b.textContent.trim() : null;
          })(),
        };
      });
      const ok = state.total >= REQUESTS && state.text === state.total.toLocaleString("en-US") &&
        ["chart-requests", "chart-errors", "chart-cpu-ms", "chart-peak-memory-bytes"].every((c) => state.charts.includes(c));
      return { ok, seen: state };
    }, 35_000, 500);
    log(`     requests chart total ${seen.total}`);
    await shot("03-analytics");
  });

  await step("the latency, status and bandwidth charts render with totals matching the API", async () => {
    const keys = ["latency_p50_ms", "latency_p99_ms", "status_2xx", "status_3xx", "status_4xx", "status_5xx",
      "ingress_bytes", "egress_bytes"];
    const seen = await until("each chart's total (max for latency) equal to the API's analytics, the 404s among them", async () => {
      // The dashboard's default range: the last hour by minute.
      const since = new Date(Math.floor((Date.now() - 3600_000) / 60_000) * 60_000).toISOString();
      const analytics = expectStatus("GET analytics",
        await apiCall("GET", `/projects/${project}/analytics?since=${encodeURIComponent(since)}&step_s=60`), 200);
      const api = {};
      for (const key of keys) {
        const values = analytics.points.map((p) => Number(p[key] ?? 0));
        api[key] = key.startsWith("latency_") ? Math.max(0, ...values) : values.reduce((a, b) => a + b, 0);
      }
      const shown = await page.evaluate((keys) => Object.fromEntries(keys.map((key) => {
        const svg = document.querySelector(`[data-testid="chart-${key.replace(/_/g, "-")}"]`);
        if (!svg) return [key, null];
        return [key, Number(svg.getAttribute(key.startsWith("latency_") ? "data-max" : "data-total"))];
      })), keys);
      const ok = keys.every((k) => shown[k] === api[k]) && api.status_4xx >= 2 && api.status_2xx >= REQUESTS &&
        api.latency_p99_ms > 0 && api.egress_bytes > 0;
      return { ok, seen: { shown, api } };
    }, 35_000, 500);
    log(`     charts ${JSON.stringify(seen.shown)}`);
    await shot("03b-analytics-latency-status");
  });

  const secret = `s3cret-${randomBytes(8).toString("hex")}`;
  await step("setting an env var in the UI shows its name, never its value", async () => {
    await openTab("env");
    await page.fill(byTestId("env-name"), "E2E_SECRET");
    await page.fill(byTestId("env-value"), secret);
    await page.click(byTestId("env-submit"));
    await until("E2E_SECRET listed with an updated time", async () => {
      const rows = await page.$$eval('[data-testid="env-row"]', (els) => els.map((e) => ({
        name: e.dataset.name, updated: e.querySelector('[data-testid="env-updated"]')?.textContent.trim(),
      })));
      return { ok: rows.some((r) => r.name === "E2E_SECRET" && r.updated && r.updated !== "—"), seen: { rows, banner: await bannerText() } };
    });
    const html = await page.content();
    const inputValue = await page.inputValue(byTestId("env-value"));
    if (html.includes(secret) || inputValue !== "") {
      throw new Expectation("the value nowhere on the page", { in_html: html.includes(secret), input_value: inputValue });
    }
    const vars = expectStatus("GET env", await apiCall("GET", `/projects/${project}/env`), 200);
    if (JSON.stringify(vars).includes(secret)) throw new Expectation("GET env without the value", vars);
    await shot("04-env");
  });

  const v3 = await step("deploying v3 (two files, after the env var) through the API", () =>
    deploy({ ...helloApp("v3"), "static/notes.txt": "notes for the detail page\n" }));

  await step("the deployment's own page shows its entrypoint, files and env names (not values)", async () => {
    await openTab("deployments");
    await until(`${v3.id} listed with a link to its page`, async () => {
      const link = await page.$(`[data-deployment-id="${v3.id}"] ${byTestId("deployment-link")}`);
      return { ok: !!link, seen: await deploymentRows() };
    }, 20_000);
    await page.click(`[data-deployment-id="${v3.id}"] ${byTestId("deployment-link")}`);
    const shown = await until("the detail page with its files", async () => {
      const state = await page.evaluate(() => ({
        id: document.querySelector('[data-testid="detail-id"]')?.textContent ?? null,
        entrypoint: document.querySelector('[data-testid="detail-entrypoint"]')?.textContent ?? null,
        env: [...document.querySelectorAll('[data-testid="detail-env-name"]')].map((e) => e.textContent),
        files: [...document.querySelectorAll('[data-testid="detail-file"]')].map((e) => [e.dataset.path, Number(e.dataset.size)]),
        status: document.querySelector('[data-testid="detail-status"]')?.textContent ?? null,
      }));
      return { ok: state.id === v3.id && state.files.length >= 2, seen: { ...state, url: page.url(), banner: await bannerText() } };
    });
    const main = helloApp("v3")["main.ts"];
    const want = [["main.ts", Buffer.byteLength(main)], ["static/notes.txt", Buffer.byteLength("notes for the detail page\n")]];
    if (!page.url().endsWith(`#/projects/${project}/deployments/${v3.id}`) || shown.entrypoint !== "file:///src/main.ts" ||
        JSON.stringify(shown.env) !== JSON.stringify(["E2E_SECRET"]) || JSON.stringify(shown.files) !== JSON.stringify(want) ||
        shown.status !== "ready") {
      throw new Expectation(`entrypoint file:///src/main.ts, env names [E2E_SECRET], files ${JSON.stringify(want)}`, shown);
    }
    const html = await page.content();
    if (html.includes(secret)) throw new Expectation("the env value nowhere on the page", "it is in the page");
    const files = expectStatus("GET files", await apiCall("GET", `/deployments/${v3.id}/files`), 200);
    if (JSON.stringify(files.map((f) => [f.path, f.size_bytes])) !== JSON.stringify(want)) {
      throw new Expectation(`GET /deployments/${v3.id}/files lists ${JSON.stringify(want)}`, files);
    }
    const logsLink = await page.getAttribute(byTestId("detail-logs-link"), "href");
    if (logsLink !== `#/projects/${project}/logs?deployment=${v3.id}`) throw new Expectation("a link to its own logs", logsLink);
    await shot("04b-deployment-detail");
  });

  await step("the live logs show the app's console line with its request id", async () => {
    await openTab("logs");
    const line = await until(`a log line "${marker}-v2 served /e2e/…" with a request id`, async () => {
      const lines = await page.$$eval('[data-testid="log-line"]', (els) => els.map((e) => ({
        message: e.querySelector('[data-testid="log-message"]')?.textContent ?? "",
        request_id: e.dataset.requestId ?? null,
        level: e.dataset.level,
        type: e.dataset.type,
      })));
      const status = await page.getAttribute(byTestId("logs-status"), "data-state");
      const hit = lines.find((l) => l.message.includes(`${marker}-v2 served /e2e/`) && l.request_id);
      return { ok: !!hit, seen: hit ?? { status, banner: await bannerText(), lines: lines.slice(-10) } };
    }, 30_000, 500);
    log(`     log line: ${JSON.stringify(line)}`);
    // The line can come from the backlog read before the follow stream's
    // answer is in: "connecting…" is shown for that moment, then "live".
    const following = Date.now();
    await until("the log stream live", async () => {
      const state = await page.getAttribute(byTestId("logs-status"), "data-state");
      return { ok: state === "live", seen: { state, banner: await bannerText() } };
    }, 10_000, 50);
    log(`     stream live ${Date.now() - following} ms after the line was shown`);
  });

  await step("a request sent while watching shows up in the live stream", async () => {
    const answer = await publicGet("/e2e/live", host);
    if (answer.status !== 200) throw new Expectation(`200 from ${host}/e2e/live`, `${answer.status} ${answer.body.slice(0, 200)}`);
    await until(`a streamed log line "${marker}-v2 served /e2e/live"`, async () => {
      const messages = await page.$$eval('[data-testid="log-message"]', (els) => els.map((e) => e.textContent));
      return { ok: messages.some((m) => m.includes(`${marker}-v2 served /e2e/live`)), seen: messages.slice(-5) };
    }, 30_000, 500);
    await shot("05-logs");
  });

  const domain = `${project}.example.com`;
  await step(`attaching ${domain} shows it pending with its TXT record`, async () => {
    await openTab("domains");
    await page.fill(byTestId("domain-name"), domain);
    await page.click(byTestId("domain-add"));
    const card = `[data-domain="${domain}"]`;
    await until(`${domain} pending with the TXT name and value`, async () => {
      const state = await page.evaluate((sel) => {
        const el = document.querySelector(sel);
        const text = (id) => el?.querySelector(`[data-testid="${id}"]`)?.textContent.trim() ?? null;
        return { status: text("domain-status"), txt_name: text("txt-name"), txt_value: text("txt-value"), certificate: text("domain-certificate") };
      }, card);
      const ok = state.status === "pending" && state.txt_name === `_isocloud-challenge.${domain}` && !!state.txt_value &&
        !!state.certificate?.includes("none");
      return { ok, seen: { ...state, banner: await bannerText() } };
    });
    // Nobody published the record: Verify answers, and the domain stays pending.
    await page.click(`${card} ${byTestId("domain-verify")}`);
    await until(`Verify to report ${domain} still pending`, async () => {
      const text = await bannerText();
      const status = await page.textContent(`${card} ${byTestId("domain-status")}`).catch(() => null);
      return { ok: !!text?.includes("NOT_VERIFIED") && status === "pending", seen: { banner: text, status } };
    }, 30_000);
    await shot("06-domains");
  });

  await step("back on Deployments for the final screenshot", async () => {
    await openTab("deployments");
    await expectProd(v2.id, [v1.id]);
    if (args.screenshot) {
      await page.screenshot({ path: args.screenshot, fullPage: true });
      log(`     screenshot: ${args.screenshot}`);
    }
  });

  await step("the projects list shows the production URL and deployment", async () => {
    await page.click(byTestId("back-to-projects"));
    const card = `[data-testid="project-card"][data-project="${project}"]`;
    const want = { url: `http://${host}`, deployment: v2.id };
    await until(`the card of ${project} with ${JSON.stringify(want)}`, async () => {
      const seen = await page.evaluate((sel) => {
        const el = document.querySelector(sel);
        return el && {
          url: el.querySelector('[data-testid="project-production-url"]')?.getAttribute("href") ?? null,
          deployment: el.querySelector('[data-testid="project-production-deployment"]')?.textContent.trim() ?? null,
        };
      }, card);
      const ok = !!seen && (seen.url ?? "").startsWith(want.url) && seen.deployment === want.deployment;
      return { ok, seen };
    });
    await shot("07-projects");
  });

  await step("a long projects list loads a page at a time", async () => {
    // 100 more projects than the one made above: more than the first page.
    for (let n = 0; n < 100; n++) {
      expectStatus("POST /projects", await apiCall("POST", "/projects", { name: `${project}-page-${String(n).padStart(3, "0")}` }), 201);
    }
    await page.reload();
    await page.waitForSelector(byTestId("project-card"));
    const cards = () => page.$$eval(byTestId("project-card"), (els) => els.map((e) => e.dataset.project));
    await until("the first page: 100 cards and a More projects button", async () => {
      const seen = await cards();
      const more = await page.$(byTestId("more-projects"));
      return { ok: seen.length === 100 && !!more, seen: { cards: seen.length, more: !!more } };
    });
    await page.click(byTestId("more-projects"));
    await until("all 101 projects, each once, in name order, and no more button", async () => {
      const seen = await cards();
      const sorted = [...seen].sort();
      const more = await page.$(byTestId("more-projects"));
      const ok = seen.length === 101 && new Set(seen).size === 101 && JSON.stringify(seen) === JSON.stringify(sorted) && !more;
      return { ok, seen: { cards: seen.length, more: !!more } };
    });
  });

  await step("a read token made on the Tokens page: its secret shown once, scoped to its project, revoked there", async () => {
    await page.click(byTestId("nav-tokens"));
    await page.waitForSelector(byTestId("token-form"));
    await page.selectOption(byTestId("token-kind"), "read");
    await page.fill(byTestId("token-project"), project);
    const name = `${project}-ui-read`;
    await page.fill(byTestId("token-name"), name);
    await page.click(byTestId("token-create"));
    const secret = await until("the new token's secret shown", async () => {
      const text = (await page.$(byTestId("token-secret"))) ? (await page.textContent(byTestId("token-secret"))).trim() : null;
      return { ok: !!text && text.startsWith("isc_"), seen: text ?? { banner: await bannerText() } };
    });
    const rows = () => page.$$eval('[data-testid="token-row"]', (els) => els.map((e) => ({
      name: e.dataset.name, status: e.dataset.status, scope: e.querySelector('[data-testid="token-scope"]')?.textContent.trim(),
    })));
    await until(`${name} listed, active, project:${project}:read`, async () => {
      const mine = (await rows()).filter((r) => r.name === name);
      return { ok: mine.length === 1 && mine[0].status === "active" && mine[0].scope === `project:${project}:read`, seen: mine };
    });
    if ((await page.content()).split(secret).length > 2) throw new Expectation("the secret on the page once", "more than once");
    // What the token may do: read its project, nothing else.
    expectStatus("GET its project with the read token", await apiCall("GET", `/projects/${project}`, undefined, { as: secret }), 200);
    expectStatus("PUT an env var with the read token", await apiCall("PUT", `/projects/${project}/env/X`, { value: "y" }, { as: secret }), 403);
    expectStatus("GET the tokens with the read token", await apiCall("GET", "/tokens", undefined, { as: secret }), 403);
    await page.click(byTestId("token-secret-done"));
    if (await page.$(byTestId("token-secret"))) throw new Expectation("the secret gone once dismissed", "still shown");
    const revoke = `[data-testid="token-row"][data-name="${name}"] [data-testid="token-revoke"]`;
    await page.click(revoke);
    await until(`${name} revoked`, async () => {
      const mine = (await rows()).filter((r) => r.name === name);
      return { ok: mine.length === 1 && mine[0].status === "revoked", seen: mine };
    });
    const after = await apiCall("GET", `/projects/${project}`, undefined, { as: secret });
    if (after.status !== 401 || after.json?.error?.code !== "TOKEN_REVOKED") {
      throw new Expectation("401 TOKEN_REVOKED for the revoked token", `${after.status} ${after.text.slice(0, 200)}`);
    }
    await page.click(byTestId("nav-audit"));
    await until("the audit page lists the token's creation and revocation", async () => {
      const actions = await page.$$eval('[data-testid="audit-row"]', (els) => els.map((e) => e.dataset.action));
      return { ok: actions.includes("token.create") && actions.includes("token.revoke"), seen: actions.slice(0, 10) };
    });
    await shot("08-tokens");
  });

  await step("logging out returns to the login screen and forgets the token", async () => {
    await page.click(byTestId("logout"));
    await page.waitForSelector(byTestId("login-form"));
    const stored = await page.evaluate(() => localStorage.getItem("isocloud.token"));
    if (stored !== null) throw new Expectation("no token in localStorage", "a token");
  });

  if (pageErrors.length) throw new Expectation("no uncaught errors in the page", pageErrors);
}

async function fail(error) {
  if (finished) return;
  finished = true;
  console.error(`\ndashboard e2e: FAILED at step "${currentStep}"\n  ${error?.message ?? error}`);
  if (!(error instanceof Expectation) && error?.stack) console.error(error.stack);
  if (pageErrors.length) console.error(`  page errors: ${JSON.stringify(pageErrors)}`);
  if (consoleErrors.length) console.error(`  browser console errors: ${JSON.stringify(consoleErrors.slice(-10))}`);
  if (page) {
    try {
      console.error(`  page: ${page.url()}`);
      await page.screenshot({ path: failureShot, fullPage: true, timeout: 10_000 });
      console.error(`  screenshot: ${failureShot}`);
    } catch (e) {
      console.error(`  (no screenshot: ${e.message.split("\n")[0]})`);
    }
  }
}

async function closeBrowser() {
  if (!context) return;
  const closing = context.close().catch(() => {});
  await Promise.race([closing, new Promise((resolve) => setTimeout(resolve, 10_000))]);
  context = null;
  rmSync(userDataDir, { recursive: true, force: true, maxRetries: 3 });
}

const watchdog = setTimeout(async () => {
  await fail(new Expectation(`the whole test to finish within ${overallMs / 1000} s`, "still running"));
  await closeBrowser();
  process.exit(1);
}, overallMs);

let code = 0;
try {
  await run();
  finished = true;
  console.log(`dashboard e2e: ok (${((Date.now() - started) / 1000).toFixed(1)} s)`);
} catch (error) {
  await fail(error);
  code = 1;
} finally {
  clearTimeout(watchdog);
  await closeBrowser();
}
process.exit(code);
