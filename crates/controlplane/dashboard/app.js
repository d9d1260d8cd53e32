// The isocloud dashboard: one page over the control-plane API (/api/v1, see
// docs/control-plane-api.md). No build step and no dependencies; the server
// embeds this file. Every server-provided string reaches the DOM as text or
// as an attribute value (never through innerHTML), and only http(s) URLs
// become links. Elements a test needs carry a `data-testid`.

const TOKEN_KEY = "isocloud.token";
const SVG_NS = "http://www.w3.org/2000/svg";
const TABS = [
  ["deployments", "Deployments"],
  ["analytics", "Analytics"],
  ["logs", "Logs"],
  ["env", "Environment"],
  ["domains", "Domains"],
];
const RANGES = [
  // [label, seconds, step_s]
  ["15 minutes", 900, 15],
  ["1 hour", 3600, 60],
  ["6 hours", 21600, 300],
  ["24 hours", 86400, 900],
];
const MAX_LOG_LINES = 2000;

const app = document.getElementById("app");
const banner = document.getElementById("banner");
const bannerText = document.getElementById("banner-text");

let token = localStorage.getItem(TOKEN_KEY);
/** The signed-in token's `/whoami` (name, scope, project); null until known. */
let me = null;

/** Whether the signed-in token may `need` ("admin", "deploy" or "read") on its
 * project: tabs and buttons it cannot use are hidden, not shown to fail. */
function can(need) {
  const scope = me?.scope ?? "admin";
  if (scope === "admin") return true;
  if (need === "read") return true;
  return need === "deploy" && scope.endsWith(":deploy");
}
/** The current view's lifetime: aborted (fetches, streams, timers) on navigation. */
let view = new AbortController();
/** An error to show once the next view is up (e.g. why we signed out). */
let carriedError = null;
/** Where to go after signing in (the page asked for before the login). */
let afterLogin = "#/projects";

// ------------------------------------------------------------------ DOM

/** Creates an element; strings among `children` become text nodes. */
function h(tag, props, ...children) {
  return build(document.createElement(tag), props, children);
}

/** Creates an SVG element. */
function s(tag, props, ...children) {
  return build(document.createElementNS(SVG_NS, tag), props, children);
}

function build(el, props, children) {
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "testid") el.setAttribute("data-testid", value);
    else if (key === "href") {
      const href = safeHref(value);
      if (href) el.setAttribute("href", href);
    } else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Only in-app routes and http(s) URLs become links (no `javascript:`). */
function safeHref(value) {
  const text = String(value);
  if (text.startsWith("#/")) return text;
  try {
    const url = new URL(text);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function replace(el, ...children) {
  el.replaceChildren();
  build(el, null, children);
}

const enc = encodeURIComponent;

function formatTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  return date.toLocaleString(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

function timeEl(iso, testid) {
  return h("time", { datetime: iso, title: iso, testid }, formatTime(iso));
}

/** RFC 3339 in UTC, whole seconds. */
function rfc3339(date) {
  return date.toISOString().replace(/\.\d{3}Z$/, "Z");
}

function formatClock(date) {
  return date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function formatBytes(bytes) {
  if (!bytes) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value >= 10 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

function formatCount(n) {
  return Number(n ?? 0).toLocaleString("en-US");
}

// ------------------------------------------------------------------ errors

class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field ?? null;
  }
}

function showError(error) {
  if (error?.name === "AbortError") return;
  const code = error instanceof ApiError ? error.code : "ERROR";
  let text = `${code}: ${error?.message ?? error}`;
  if (error?.field) text += ` (field: ${error.field})`;
  bannerText.textContent = text;
  banner.dataset.code = code;
  banner.hidden = false;
}

function clearError() {
  banner.hidden = true;
  bannerText.textContent = "";
  delete banner.dataset.code;
}

document.getElementById("banner-close").addEventListener("click", clearError);

// ------------------------------------------------------------------ API

async function errorFrom(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: the message is the text itself
  }
  const error = body?.error ?? {};
  let message = error.message || text.slice(0, 300) || response.statusText || `HTTP ${response.status}`;
  if (Array.isArray(body?.error?.missing)) message += ` (${body.error.missing.length} missing)`;
  return new ApiError(response.status, error.code || `HTTP_${response.status}`, message, error.field);
}

/** Calls `/api/v1{path}`; resolves to the JSON answer (null for 204), or throws an ApiError. */
async function api(method, path, body, { signal = view.signal, authToken = token } = {}) {
  const headers = { authorization: `Bearer ${authToken}` };
  const init = { method, headers, signal };
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`/api/v1${path}`, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "NETWORK", `cannot reach the control plane (${e.message})`);
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401 && authToken === token && token) signOut(error);
    throw error;
  }
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** One page of a list: its items, and the path of the next page (from the
 * answer's `Link: <…>; rel="next"`), or null on the last page. */
async function apiPage(path, { signal = view.signal } = {}) {
  let response;
  try {
    response = await fetch(`/api/v1${path}`, { headers: { authorization: `Bearer ${token}` }, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "NETWORK", `cannot reach the control plane (${e.message})`);
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (response.status === 401 && token) signOut(error);
    throw error;
  }
  const link = response.headers.get("link") || "";
  const match = /<\/api\/v1(\/[^>]*)>;\s*rel="next"/.exec(link);
  return { items: await response.json(), next: match ? match[1] : null };
}

/** Runs an action of a button: disables it meanwhile, shows any error. */
async function act(button, action) {
  clearError();
  button.disabled = true;
  try {
    await action();
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

/** Re-runs `fn` every `ms` while the current view lives. */
function every(ms, fn) {
  const signal = view.signal;
  const timer = setInterval(() => {
    if (!signal.aborted) fn();
  }, ms);
  signal.addEventListener("abort", () => clearInterval(timer));
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

// ------------------------------------------------------------------ session

function signOut(error) {
  token = null;
  localStorage.removeItem(TOKEN_KEY);
  document.getElementById("session").hidden = true;
  carriedError = error ?? null;
  if (location.hash === "#/login") route();
  else location.hash = "#/login"; // routes on hashchange
}

document.getElementById("logout").addEventListener("click", () => signOut());

function showSession(whoami) {
  me = whoami ?? null;
  const session = document.getElementById("session");
  document.getElementById("whoami").textContent = me?.token_name ?? "";
  session.querySelector(".admin-links")?.remove();
  if (can("admin")) {
    session.prepend(h("span", { class: "admin-links" },
      h("a", { href: "#/tokens", testid: "nav-tokens" }, "Tokens"), " · ",
      h("a", { href: "#/audit", testid: "nav-audit" }, "Audit"), " · "));
  } else {
    session.prepend(h("span", { class: "admin-links muted", testid: "scope" }, me.scope, " · "));
  }
  session.hidden = false;
}

function loginView() {
  const input = h("input", {
    id: "token", type: "password", name: "token", required: true, autocomplete: "off", spellcheck: "false",
    placeholder: "paste an API token", testid: "login-token",
  });
  const submit = h("button", { type: "submit", class: "button primary", testid: "login-submit" }, "Sign in");
  const form = h("form", { class: "card login", testid: "login-form" },
    h("h1", null, "Sign in to isocloud"),
    h("p", { class: "muted" },
      "Paste an API token. The first start of a data dir writes the admin token to ",
      h("code", null, "<data dir>/admin-token"), "."),
    h("label", { for: "token" }, "Token"),
    input,
    h("div", { class: "actions" }, submit));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const candidate = input.value.trim();
    act(submit, async () => {
      const me = await api("GET", "/whoami", undefined, { authToken: candidate });
      token = candidate;
      localStorage.setItem(TOKEN_KEY, candidate);
      showSession(me);
      location.hash = afterLogin;
      afterLogin = "#/projects";
    });
  });
  replace(app, form);
  input.focus();
}

// ------------------------------------------------------------------ routing

function route() {
  const path = location.hash.replace(/^#/, "").split("?")[0] || "/projects";
  const parts = path.split("/").filter(Boolean).map((part) => {
    try {
      return decodeURIComponent(part);
    } catch {
      return part;
    }
  });
  // Redirects route again (on hashchange).
  if (!token && parts[0] !== "login") {
    if (parts[0] === "projects") afterLogin = location.hash;
    return location.replace("#/login");
  }
  if (token && parts[0] === "login") return location.replace("#/projects");
  view.abort();
  view = new AbortController();
  clearError();
  if (carriedError) {
    showError(carriedError);
    carriedError = null;
  }
  if (!token) {
    loginView();
  } else if (parts[0] === "projects" && parts[1]) {
    projectView(parts[1], parts[2] ?? "deployments", parts[2] === "deployments" ? parts[3] : undefined).catch(showError);
  } else if (parts[0] === "tokens" && can("admin")) {
    tokensView().catch(showError);
  } else if (parts[0] === "audit" && can("admin")) {
    auditView().catch(showError);
  } else {
    projectsView().catch(showError);
  }
}

window.addEventListener("hashchange", route);

// ------------------------------------------------------------------ projects

async function projectsView() {
  const nameInput = h("input", {
    id: "new-project", name: "name", required: true, placeholder: "my-project", autocomplete: "off",
    spellcheck: "false", testid: "new-project-name",
  });
  const create = h("button", { type: "submit", class: "button primary", testid: "create-project" }, "Create project");
  const form = h("form", { class: "inline-form", testid: "create-project-form" },
    h("label", { for: "new-project", class: "sr-only" }, "Project name"), nameInput, create);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(create, async () => {
      const project = await api("POST", "/projects", { name: nameInput.value.trim() });
      location.hash = `#/projects/${enc(project.name)}`;
    });
  });
  const list = h("ul", { class: "project-list", testid: "project-list" }, h("li", { class: "muted" }, "Loading…"));
  // Only an admin creates projects; a project token sees its own one.
  replace(app, h("section", null, h("div", { class: "page-head" }, h("h1", null, "Projects"), can("admin") ? form : null), list));

  // A page at a time: a platform may hold more projects than a page should.
  const first = await apiPage("/projects?limit=100");
  if (!first.items.length) {
    replace(list, h("li", { class: "empty", testid: "no-projects" }, "No projects yet. Create one above, then deploy with ",
      h("code", null, "isocloud deploy"), "."));
    return;
  }
  replace(list, first.items.map(projectCard));
  let next = first.next;
  const more = h("button", { type: "button", class: "more", testid: "more-projects" }, "More projects");
  more.addEventListener("click", () => act(more, async () => {
    const page = await apiPage(next);
    for (const p of page.items) list.append(projectCard(p));
    next = page.next;
    if (!next) more.remove();
  }));
  if (next) list.after(more);
}

function projectCard(p) {
  return h("li", { class: "card project-card", testid: "project-card", "data-project": p.name },
    h("a", { class: "project-name", href: `#/projects/${enc(p.name)}`, testid: "project-link" }, p.name),
    h("dl", { class: "facts" },
      h("dt", null, "Production"),
      h("dd", null, p.production_url
        ? h("a", { href: p.production_url, target: "_blank", rel: "noopener", testid: "project-production-url" }, p.production_url)
        : h("span", { class: "muted" }, "not deployed")),
      h("dt", null, "Prod deployment"),
      h("dd", { testid: "project-production-deployment" },
        p.production_deployment_id ? h("code", null, p.production_deployment_id) : h("span", { class: "muted" }, "—")),
      h("dt", null, "Created"),
      h("dd", null, timeEl(p.created_at))));
}

// ------------------------------------------------------------------ one project

/** A project's page on `tab`; with `deploymentId`, that deployment's own page
 * under the Deployments tab (`#/projects/NAME/deployments/ID`). */
async function projectView(name, tab, deploymentId) {
  // Domains are an admin's (they move traffic between projects).
  const tabs = TABS.filter(([id]) => id !== "domains" || can("admin"));
  if (!tabs.some(([id]) => id === tab)) tab = "deployments";
  const head = h("div", { class: "project-head" }, h("h1", { testid: "project-name" }, name));
  const panel = h("section", { class: "panel", testid: `panel-${tab}` });
  const nav = h("nav", { class: "tabs", "aria-label": "Project" },
    tabs.map(([id, label]) => h("a", {
      href: `#/projects/${enc(name)}/${id}`, class: id === tab ? "tab active" : "tab", testid: `tab-${id}`,
      "aria-current": id === tab ? "page" : null,
    }, label)));
  replace(app, h("p", { class: "crumbs" }, h("a", { href: "#/projects", testid: "back-to-projects" }, "Projects"), " / ", name),
    head, nav, panel);

  const ctx = { name, head, panel, project: null, shownProject: "" };
  /** Takes a fresh Project; re-renders the head only when it changed. */
  ctx.setProject = (project) => {
    ctx.project = project;
    const key = JSON.stringify(project);
    if (key !== ctx.shownProject) {
      ctx.shownProject = key;
      renderProjectHead(ctx);
    }
  };
  ctx.setProject(await api("GET", `/projects/${enc(name)}`));
  if (tab === "deployments" && deploymentId) return deploymentView(ctx, deploymentId);
  const views = { deployments: deploymentsTab, analytics: analyticsTab, logs: logsTab, env: envTab, domains: domainsTab };
  await views[tab](ctx);
}

function renderProjectHead(ctx) {
  const p = ctx.project;
  const rollback = h("button", {
    type: "button", class: "button", testid: "rollback-button", disabled: !p.production_deployment_id,
    title: "Make the previous production deployment production again",
  }, "Rollback");
  rollback.addEventListener("click", () => act(rollback, async () => {
    const project = await api("POST", `/projects/${enc(p.name)}/rollback`);
    if (ctx.onProductionChange) await ctx.onProductionChange();
    else ctx.setProject(project);
  }));
  replace(ctx.head,
    h("div", null,
      h("h1", { testid: "project-name" }, p.name),
      h("p", { class: "project-meta" },
        "Production: ",
        p.production_url
          ? h("a", { href: p.production_url, target: "_blank", rel: "noopener", testid: "production-url" }, p.production_url)
          : h("span", { class: "muted", testid: "production-url" }, "no production deployment"),
        p.production_deployment_id
          ? [" · ", h("code", { testid: "production-deployment-id" }, p.production_deployment_id)] : null,
        p.git ? [" · git ", h("code", null, p.git.repository), " ", h("span", { class: "branch" }, p.git.branch)] : null)),
    h("div", { class: "head-actions" }, can("deploy") ? rollback : null));
}

// ------------------------------------------------------------------ deployments

async function deploymentsTab(ctx) {
  const list = h("div", { class: "deployments", testid: "deployment-list" });
  // The newest page, polled; "Show older" widens it a page at a time (up to
  // the API's largest page; the CLI lists further back).
  const PAGE = 50;
  let limit = PAGE;
  let hasMore = false;
  const older = h("button", { type: "button", class: "more", testid: "older-deployments", hidden: true }, "Show older");
  older.addEventListener("click", () => act(older, async () => {
    limit = Math.min(1000, limit + PAGE);
    await load();
  }));
  replace(ctx.panel, list, older);
  let shown = "";
  let started = 0;
  let latest = 0;
  // The project (which deployment is production) and the deployments are
  // fetched together, and an answer older than the one shown is dropped, so a
  // poll that crosses a promotion never shows a stale Prod label.
  const load = async () => {
    const mine = ++started;
    const [project, page] = await Promise.all([
      api("GET", `/projects/${enc(ctx.name)}`),
      apiPage(`/projects/${enc(ctx.name)}/deployments?limit=${limit}`),
    ]);
    const deployments = page.items;
    hasMore = page.next !== null && limit < 1000;
    older.hidden = !hasMore;
    if (mine < latest) return;
    latest = mine;
    ctx.setProject(project);
    const key = JSON.stringify([deployments, project.production_deployment_id]);
    if (key === shown) return;
    shown = key;
    renderDeployments(ctx, list, deployments, load);
  };
  ctx.onProductionChange = load;
  await load();
  every(3000, () => load().catch(showError));
}

function renderDeployments(ctx, list, deployments, reload) {
  if (!deployments.length) {
    replace(list, h("p", { class: "empty", testid: "no-deployments" },
      "No deployments yet. Deploy with ", h("code", null, `isocloud deploy --project ${ctx.name}`),
      " or POST /api/v1/projects/", ctx.name, "/deployments."));
    return;
  }
  replace(list, deployments.map((d) => {
    const prodId = ctx.project.production_deployment_id;
    const prod = prodId ? d.id === prodId : d.production === true;
    let promote = null;
    if (!prod && d.status === "ready" && can("deploy")) {
      promote = h("button", { type: "button", class: "button", testid: "promote-button" }, "Promote");
      promote.addEventListener("click", () => act(promote, async () => {
        await api("POST", `/projects/${enc(ctx.name)}/promote`, { deployment_id: d.id });
        await reload();
      }));
    }
    const card = h("article", {
      class: prod ? "card deployment production" : "card deployment", testid: "deployment-row",
      "data-deployment-id": d.id, "data-production": String(prod), "data-status": d.status,
    },
    h("div", { class: "deployment-main" },
      h("div", { class: "deployment-title" },
        h("a", { class: "deployment-link", href: `#/projects/${enc(ctx.name)}/deployments/${enc(d.id)}`, testid: "deployment-link",
          title: "This deployment's page: files, entrypoint, env names, logs" },
        h("code", { class: "deployment-id", testid: "deployment-id" }, d.id)),
        prod ? h("span", { class: "badge prod", testid: "prod-label" }, "Prod") : null,
        h("span", { class: `badge status-${d.status}`, testid: "deployment-status" }, d.status)),
      d.git ? h("p", { class: "git", testid: "deployment-git" },
        h("code", { class: "commit", title: d.git.commit }, String(d.git.commit ?? "").slice(0, 7)), " ",
        h("span", { class: "commit-message" }, d.git.message ?? ""),
        d.git.branch ? h("span", { class: "branch" }, d.git.branch) : null) : null,
      d.error ? h("p", { class: "deployment-error", testid: "deployment-error" }, d.error) : null,
      h("p", { class: "deployment-url" },
        h("a", { href: d.url, target: "_blank", rel: "noopener", testid: "deployment-url" }, d.url))),
    h("div", { class: "deployment-side" },
      timeEl(d.created_at, "deployment-created"),
      h("span", { class: "muted small" }, `${d.files ?? 0} file${d.files === 1 ? "" : "s"} · ${formatBytes(d.size_bytes)}`),
      h("div", { class: "row-actions" },
        h("a", { class: "button subtle", href: `#/projects/${enc(ctx.name)}/logs?deployment=${enc(d.id)}`, testid: "deployment-logs" }, "Logs"),
        buildLogButton(d),
        promote)));
    // A build log stays open across the list's refreshes.
    if (openBuildLogs.has(d.id)) card.append(buildLogBlock(openBuildLogs.get(d.id)));
    return card;
  }));
}

/** Build logs the user opened, by deployment id (the list re-renders every few seconds). */
const openBuildLogs = new Map();

function buildLogBlock(text) {
  return h("pre", { class: "build-log", testid: "build-log" }, text);
}

/** "Build log": what deno printed when the deployment was built, shown under it. */
function buildLogButton(d) {
  const button = h("button", { type: "button", class: "button subtle", testid: "build-log-button" }, "Build log");
  button.addEventListener("click", () => act(button, async () => {
    const card = button.closest("article");
    const shown = card.querySelector(".build-log");
    if (shown) { shown.remove(); openBuildLogs.delete(d.id); return; }
    const build = await api("GET", `/deployments/${enc(d.id)}/build`);
    const text = build.log == null ? "(no build: this deployment was not made from files)"
      : (build.log.trim() === "" ? "(the build printed nothing)" : build.log);
    openBuildLogs.set(d.id, text);
    card.append(buildLogBlock(text));
  }));
  return button;
}

// ------------------------------------------------------------------ one deployment

/** A deployment's own page: what it is made of (entrypoint, files, the env
 * var names it was given, never their values), where it came from (commit),
 * its status and build, and its own logs. */
async function deploymentView(ctx, id) {
  const base = `#/projects/${enc(ctx.name)}`;
  const d = await api("GET", `/deployments/${enc(id)}`);
  const prod = ctx.project.production_deployment_id === d.id;
  const fact = (label, value, testid) => [h("dt", null, label), h("dd", { testid }, value)];
  const git = d.git
    ? [h("code", { class: "commit", title: d.git.commit }, String(d.git.commit).slice(0, 12)), " ",
      h("span", { class: "branch" }, d.git.branch), " ", h("span", { class: "commit-message" }, d.git.message)]
    : h("span", { class: "muted" }, "not from a commit");
  const envNames = d.env_names.length
    ? h("ul", { class: "env-names" }, d.env_names.map((n) => h("li", null, h("code", { testid: "detail-env-name" }, n))))
    : h("span", { class: "muted" }, "none");
  const files = h("tbody", { testid: "detail-files" });
  const moreFiles = h("button", { type: "button", class: "more", testid: "more-files", hidden: true }, "More files");
  const buildLog = h("button", { type: "button", class: "button subtle", testid: "detail-build-log-button" }, "Build log");
  const buildBox = h("div", { class: "build-box" });
  const recent = h("div", { class: "logs logs-short", testid: "detail-logs", role: "log" });
  replace(ctx.panel,
    h("p", { class: "crumbs" }, h("a", { href: base, testid: "back-to-deployments" }, "Deployments"), " / ", h("code", null, d.id)),
    h("div", { class: "deployment-title" },
      h("h2", null, h("code", { testid: "detail-id" }, d.id)),
      prod ? h("span", { class: "badge prod", testid: "prod-label" }, "Prod") : null,
      h("span", { class: `badge status-${d.status}`, testid: "detail-status" }, d.status)),
    d.error ? h("p", { class: "deployment-error", testid: "detail-error" }, d.error) : null,
    h("dl", { class: "facts detail-facts" },
      fact("URL", h("a", { href: d.url, target: "_blank", rel: "noopener", testid: "detail-url" }, d.url)),
      fact("Entrypoint", h("code", null, d.entrypoint), "detail-entrypoint"),
      fact("Created", timeEl(d.created_at)),
      fact("Commit", git, "detail-git"),
      fact("Env var names", envNames, "detail-env-names"),
      fact("Files", `${formatCount(d.files)} · ${formatBytes(d.size_bytes)}`, "detail-file-count")),
    h("div", { class: "row-actions" }, buildLog,
      h("a", { class: "button subtle", href: `${base}/logs?deployment=${enc(d.id)}`, testid: "detail-logs-link" }, "All its logs")),
    buildBox,
    h("h3", null, "Files"),
    h("table", { class: "files" }, h("thead", null, h("tr", null, h("th", null, "Path"), h("th", { class: "num" }, "Size"))), files),
    moreFiles,
    h("h3", null, "Recent logs"),
    recent);

  buildLog.addEventListener("click", () => act(buildLog, async () => {
    if (buildBox.firstChild) return replace(buildBox);
    const build = await api("GET", `/deployments/${enc(d.id)}/build`);
    replace(buildBox,
      build.npm_packages.length ? h("p", { class: "muted small", testid: "detail-npm-packages" }, `npm: ${build.npm_packages.join(", ")}`) : null,
      h("pre", { class: "build-log", testid: "build-log" }, build.log == null
        ? "(no build: this deployment was not made from files)" : (build.log.trim() === "" ? "(the build printed nothing)" : build.log)));
  }));

  const fileRow = (f) => h("tr", { testid: "detail-file", "data-path": f.path, "data-size": String(f.size_bytes) },
    h("td", null, h("code", null, f.path), f.symlink_target != null ? h("span", { class: "muted" }, ` → ${f.symlink_target}`) : null),
    h("td", { class: "num" }, f.symlink_target != null ? "link" : formatBytes(f.size_bytes)));
  let next = null;
  const loadFiles = async (path) => {
    const page = await apiPage(path);
    for (const f of page.items) files.append(fileRow(f));
    next = page.next;
    moreFiles.hidden = !next;
  };
  moreFiles.addEventListener("click", () => act(moreFiles, () => loadFiles(next)));
  await loadFiles(`/deployments/${enc(d.id)}/files?limit=200`);

  const showRecent = async () => {
    const entries = await api("GET", `/deployments/${enc(d.id)}/logs?limit=20`);
    if (!entries.length) replace(recent, h("p", { class: "muted", testid: "detail-no-logs" }, "No log entries yet."));
    else replace(recent, entries.map(logLine));
  };
  await showRecent();
  every(5000, () => showRecent().catch(showError));
}

// ------------------------------------------------------------------ analytics

const CHARTS = [
  { key: "requests", title: "Requests", sum: true, integer: true, format: formatCount },
  { key: "errors", title: "Errors", sum: true, integer: true, format: formatCount },
  { key: "cpu_ms", title: "CPU time (ms)", sum: true, format: (v) => `${formatCount(Math.round(v))} ms` },
  { key: "peak_memory_bytes", title: "Peak memory", sum: false, format: formatBytes },
  // Time to the response head (a boot included): the upper bound of the
  // histogram bucket the quantile falls in, per step (the API's, see
  // docs/control-plane-api.md); the headline is the worst step.
  { key: "latency_p50_ms", title: "Latency p50", sum: false, integer: true, format: (v) => `${formatCount(v)} ms` },
  { key: "latency_p99_ms", title: "Latency p99", sum: false, integer: true, format: (v) => `${formatCount(v)} ms` },
  // Requests by the class of their answer (the runner's own for the deployment included).
  { key: "status_2xx", title: "Status 2xx", sum: true, integer: true, format: formatCount },
  { key: "status_3xx", title: "Status 3xx", sum: true, integer: true, format: formatCount },
  { key: "status_4xx", title: "Status 4xx", sum: true, integer: true, format: formatCount },
  { key: "status_5xx", title: "Status 5xx", sum: true, integer: true, format: formatCount },
  // Bandwidth: HTTP body bytes into the deployment and out of it.
  { key: "ingress_bytes", title: "Bandwidth in", sum: true, format: formatBytes },
  { key: "egress_bytes", title: "Bandwidth out", sum: true, format: formatBytes },
];

async function analyticsTab(ctx) {
  const select = h("select", { id: "range", testid: "analytics-range" },
    RANGES.map(([label, seconds], i) => h("option", { value: String(i), selected: seconds === 3600 }, label)));
  const updated = h("span", { class: "muted small", testid: "analytics-updated" }, "");
  const tiles = h("div", { class: "tiles" });
  const charts = h("div", { class: "charts" });
  replace(ctx.panel,
    h("div", { class: "toolbar" }, h("label", { for: "range" }, "Range "), select, updated),
    tiles, charts);
  const load = async () => {
    const [, seconds, step] = RANGES[Number(select.value)];
    const now = Date.now();
    const since = new Date(Math.floor((now - seconds * 1000) / (step * 1000)) * step * 1000);
    const data = await api("GET",
      `/projects/${enc(ctx.name)}/analytics?since=${enc(rfc3339(since))}&step_s=${step}`);
    renderAnalytics(tiles, charts, data, since.getTime(), now, step);
    updated.textContent = `updated ${formatClock(new Date())}`;
  };
  select.addEventListener("change", () => load().catch(showError));
  await load();
  every(4000, () => load().catch(showError));
}

function renderAnalytics(tiles, charts, data, sinceMs, nowMs, requestedStep) {
  const step = Number(data?.step_s) || requestedStep;
  const points = Array.isArray(data?.points) ? data.points : [];
  // One bucket per step from `since` to now; the server may leave empty ones out.
  const first = Math.floor(sinceMs / (step * 1000));
  const last = Math.floor(nowMs / (step * 1000));
  const count = Math.max(1, Math.min(last - first + 1, 2000));
  const buckets = Array.from({ length: count }, (_, i) => ({ t: (first + i) * step * 1000 }));
  for (const point of points) {
    const t = Date.parse(point.t);
    let i = Math.floor(t / (step * 1000)) - first;
    if (Number.isNaN(i)) continue;
    i = Math.min(Math.max(i, 0), count - 1);
    for (const { key, sum } of CHARTS) {
      const value = Number(point[key] ?? 0);
      buckets[i][key] = sum ? (buckets[i][key] ?? 0) + value : Math.max(buckets[i][key] ?? 0, value);
    }
  }
  const summary = [];
  const svgs = [];
  for (const chart of CHARTS) {
    const values = buckets.map((b) => b[chart.key] ?? 0);
    const total = values.reduce((a, b) => a + b, 0);
    const max = Math.max(0, ...values);
    const headline = chart.sum ? total : max;
    summary.push(h("div", { class: `tile tile-${chart.key}` },
      h("span", { class: "tile-label" }, chart.sum ? `${chart.title}` : `${chart.title} (max)`),
      h("strong", { class: "tile-value", testid: `total-${chart.key.replace(/_/g, "-")}` }, chart.format(headline))));
    svgs.push(h("figure", { class: "chart" },
      h("figcaption", null, chart.title, h("span", { class: "muted" }, ` ${chart.sum ? "total" : "max"} ${chart.format(headline)}`)),
      barChart(chart, buckets, values, step, total, max)));
  }
  replace(tiles, summary);
  replace(charts, svgs);
}

/** The top of a chart's axis: a round number ≥ max whose half is round too. */
function axisTop(max, integer) {
  if (integer && max <= 10) return Math.max(2, Math.ceil(max / 2) * 2);
  const power = 10 ** Math.floor(Math.log10(max));
  const steps = integer ? [1, 2, 4, 5, 10] : [1, 2, 2.5, 5, 10];
  return steps.map((m) => m * power).find((top) => top >= max) ?? 10 * power;
}

function barChart(chart, buckets, values, step, total, max) {
  const W = 640, H = 170, left = 56, right = 8, top = 10, bottom = 22;
  const plotW = W - left - right, plotH = H - top - bottom;
  const scale = max > 0 ? axisTop(max, chart.integer) : 1;
  const slot = plotW / values.length;
  const testid = `chart-${chart.key.replace(/_/g, "-")}`;
  const svg = s("svg", {
    viewBox: `0 0 ${W} ${H}`, class: `bars bars-${chart.key}`, role: "img", testid,
    "data-total": String(Math.round(total * 1000) / 1000), "data-max": String(max), "data-points": String(values.length),
    "data-step": String(step), "aria-label": `${chart.title}: ${chart.sum ? "total" : "max"} ${chart.format(chart.sum ? total : max)}`,
  });
  for (const frac of max > 0 ? [0, 0.5, 1] : [0]) {
    const y = top + plotH - frac * plotH;
    svg.append(s("line", { x1: left, x2: W - right, y1: y, y2: y, class: frac === 0 ? "axis" : "grid" }),
      s("text", { x: left - 6, y: y + 4, class: "tick", "text-anchor": "end" }, frac === 0 ? "0" : chart.format(scale * frac)));
  }
  values.forEach((value, i) => {
    if (!value) return;
    const barH = Math.max(1.5, (value / scale) * plotH);
    const x = left + i * slot + Math.min(1, slot * 0.1);
    svg.append(s("rect", {
      x: x.toFixed(2), y: (top + plotH - barH).toFixed(2), width: Math.max(1, slot - Math.min(2, slot * 0.2)).toFixed(2),
      height: barH.toFixed(2), class: "bar", "data-value": String(value),
    }, s("title", null, `${formatClock(new Date(buckets[i].t))}: ${chart.format(value)}`)));
  });
  const startLabel = formatClock(new Date(buckets[0].t));
  const endLabel = formatClock(new Date(buckets[buckets.length - 1].t + step * 1000));
  svg.append(s("text", { x: left, y: H - 6, class: "tick" }, startLabel),
    s("text", { x: W - right, y: H - 6, class: "tick", "text-anchor": "end" }, endLabel));
  return svg;
}

// ------------------------------------------------------------------ logs

async function logsTab(ctx) {
  const query = new URLSearchParams(location.hash.split("?")[1] ?? "");
  const deployments = await api("GET", `/projects/${enc(ctx.name)}/deployments`).catch(() => []);
  const select = h("select", { id: "log-deployment", testid: "logs-deployment" },
    h("option", { value: "" }, "All deployments"),
    deployments.map((d) => h("option", { value: d.id, selected: d.id === query.get("deployment") },
      `${d.id}${d.production ? " (Prod)" : ""}`)));
  const status = h("span", { class: "stream-status", testid: "logs-status", "data-state": "connecting" }, "connecting…");
  const clear = h("button", { type: "button", class: "button subtle", testid: "logs-clear" }, "Clear");
  const older = h("button", { type: "button", class: "button subtle", testid: "logs-older", hidden: true }, "Older entries");
  const lines = h("div", { class: "logs", testid: "log-view", role: "log", tabindex: "0" });
  replace(ctx.panel, h("div", { class: "toolbar" },
    h("label", { for: "log-deployment" }, "Deployment "), select, status, older, clear), lines);
  clear.addEventListener("click", () => lines.replaceChildren());
  // The list's pages go back in time: each click puts the next one on top.
  let olderPage = null;
  const setOlder = (next) => {
    olderPage = next;
    older.hidden = !next;
  };
  older.addEventListener("click", () => act(older, async () => {
    const page = await apiPage(olderPage);
    lines.prepend(...page.items.map(logLine));
    setOlder(page.next);
  }));
  select.addEventListener("change", () => {
    const q = select.value ? `?deployment=${enc(select.value)}` : "";
    location.hash = `#/projects/${enc(ctx.name)}/logs${q}`;
  });
  const setStatus = (state, text) => {
    status.dataset.state = state;
    status.textContent = text;
  };
  followLogs(ctx.name, select.value, view.signal, (entry) => appendLog(lines, entry), setStatus, setOlder).catch((e) => {
    setStatus("stopped", "stopped");
    showError(e);
  });
}

function appendLog(container, entry) {
  const stick = container.scrollHeight - container.scrollTop - container.clientHeight < 48;
  container.append(logLine(entry));
  while (container.childElementCount > MAX_LOG_LINES) container.firstElementChild.remove();
  if (stick) container.scrollTop = container.scrollHeight;
}

function logLine(entry) {
  const level = entry.level ?? (entry.type === "log" ? "info" : "event");
  const lifecycle = entry.type && entry.type !== "log";
  return h("div", {
    class: `log-line level-${level}${lifecycle ? ` event event-${entry.type}` : ""}`, testid: "log-line",
    "data-level": level, "data-type": entry.type ?? "log", "data-request-id": entry.request_id ?? null,
    "data-deployment-id": entry.deployment_id ?? null,
  },
  h("time", { class: "log-time", datetime: entry.timestamp, title: entry.timestamp },
    entry.timestamp ? formatClock(new Date(entry.timestamp)) : ""),
  h("span", { class: "log-deployment", title: entry.deployment_id ?? "" }, String(entry.deployment_id ?? "").slice(0, 12)),
  h("span", { class: "log-level" }, lifecycle ? entry.type : level),
  entry.request_id ? h("span", { class: "log-request", testid: "log-request-id", title: "request id" }, entry.request_id) : null,
  h("span", { class: "log-message", testid: "log-message" }, String(entry.message ?? "")));
}

/**
 * Shows the recent log entries, then follows the NDJSON stream
 * (`?follow=true`, read through fetch so the Authorization header goes
 * along), reconnecting after a drop; entries are shown once each (by id).
 */
async function followLogs(name, deployment, signal, onEntry, setStatus, setOlder) {
  const seen = new Set();
  let since = null;
  const emit = (entry) => {
    if (!entry || typeof entry !== "object") return;
    if (entry.id != null) {
      if (seen.has(entry.id)) return;
      seen.add(entry.id);
    }
    if (entry.timestamp && (!since || entry.timestamp > since)) since = entry.timestamp;
    onEntry(entry);
  };
  const base = new URLSearchParams();
  if (deployment) base.set("deployment", deployment);

  const recent = new URLSearchParams(base);
  recent.set("limit", "200");
  const backlog = await apiPage(`/projects/${enc(name)}/logs?${recent}`, { signal });
  const order = (a, b) => (a.id != null && b.id != null ? a.id - b.id : String(a.timestamp).localeCompare(String(b.timestamp)));
  for (const entry of [...(backlog.items ?? [])].sort(order)) emit(entry);
  setOlder(backlog.next);

  while (!signal.aborted) {
    const follow = new URLSearchParams(base);
    follow.set("follow", "true");
    if (since) follow.set("since", since);
    try {
      const response = await fetch(`/api/v1/projects/${enc(name)}/logs?${follow}`, {
        headers: { authorization: `Bearer ${token}` }, signal,
      });
      if (!response.ok) {
        const error = await errorFrom(response);
        if (response.status === 401) signOut(error);
        throw error;
      }
      setStatus("live", "● live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline).trim();
          buffer = buffer.slice(newline + 1);
          if (!line) continue;
          try {
            emit(JSON.parse(line));
          } catch {
            // a malformed line is skipped; the stream goes on
          }
        }
      }
    } catch (e) {
      if (signal.aborted || e.name === "AbortError") return;
      if (e instanceof ApiError && e.status >= 400 && e.status < 500) throw e;
    }
    if (signal.aborted) return;
    setStatus("reconnecting", "reconnecting…");
    await sleep(2000, signal);
  }
}

// ------------------------------------------------------------------ env vars

async function envTab(ctx) {
  const nameInput = h("input", {
    id: "env-name", name: "name", required: true, placeholder: "API_KEY", autocomplete: "off", spellcheck: "false",
    pattern: "[A-Za-z_][A-Za-z0-9_]*", testid: "env-name",
  });
  const valueInput = h("input", {
    id: "env-value", name: "value", type: "password", placeholder: "value", autocomplete: "new-password", testid: "env-value",
  });
  const submit = h("button", { type: "submit", class: "button primary", testid: "env-submit" }, "Set");
  const form = h("form", { class: "inline-form", testid: "env-form" },
    h("label", { for: "env-name", class: "sr-only" }, "Name"), nameInput,
    h("label", { for: "env-value", class: "sr-only" }, "Value"), valueInput, submit);
  const table = h("table", { class: "table", testid: "env-list" });
  replace(ctx.panel,
    h("p", { class: "muted" }, "Values are write-only: they are never shown again. A change applies to deployments created after it."),
    can("admin") ? form : null, table);
  const load = async () => {
    const vars = await api("GET", `/projects/${enc(ctx.name)}/env`);
    if (!vars.length) {
      replace(table, h("tbody", null, h("tr", null, h("td", { class: "empty", testid: "no-env" }, "No environment variables."))));
      return;
    }
    replace(table,
      h("thead", null, h("tr", null, h("th", null, "Name"), h("th", null, "Updated"), h("th", null, ""))),
      h("tbody", null, vars.map((v) => {
        const remove = h("button", { type: "button", class: "button subtle danger", testid: "env-delete" }, "Delete");
        remove.addEventListener("click", () => act(remove, async () => {
          await api("DELETE", `/projects/${enc(ctx.name)}/env/${enc(v.name)}`);
          await load();
        }));
        return h("tr", { testid: "env-row", "data-name": v.name },
          h("td", null, h("code", { testid: "env-var-name" }, v.name)),
          h("td", null, timeEl(v.updated_at, "env-updated")),
          h("td", { class: "right" }, can("admin") ? remove : null));
      })));
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(submit, async () => {
      await api("PUT", `/projects/${enc(ctx.name)}/env/${enc(nameInput.value.trim())}`, { value: valueInput.value });
      nameInput.value = "";
      valueInput.value = "";
      await load();
    });
  });
  await load();
}

// ------------------------------------------------------------------ domains

async function domainsTab(ctx) {
  const input = h("input", {
    id: "domain-name", name: "domain", required: true, placeholder: "www.example.com", autocomplete: "off",
    spellcheck: "false", testid: "domain-name",
  });
  const add = h("button", { type: "submit", class: "button primary", testid: "domain-add" }, "Add domain");
  const form = h("form", { class: "inline-form", testid: "domain-form" },
    h("label", { for: "domain-name", class: "sr-only" }, "Domain"), input, add);
  const list = h("div", { class: "domains", testid: "domain-list" });
  replace(ctx.panel, form, list);
  const load = async () => {
    const mine = [];
    for (let next = `/domains?project=${enc(ctx.name)}&limit=1000`; next;) {
      const page = await apiPage(next);
      mine.push(...page.items);
      next = page.next;
    }
    if (!mine.length) {
      replace(list, h("p", { class: "empty", testid: "no-domains" }, "No custom domains attached to this project."));
      return;
    }
    replace(list, mine.map((d) => domainCard(ctx, d, load)));
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(add, async () => {
      await api("POST", "/domains", { domain: input.value.trim().toLowerCase(), project: ctx.name });
      input.value = "";
      await load();
    });
  });
  await load();
}

// Automatic certificates (ACME): the last order's outcome, the next attempt
// and, after a failure, the ACME server's error (text only).
function acmeLine(acme) {
  const failed = acme.status === "failed";
  return h("div", { class: "acme", testid: "domain-acme", "data-state": acme.status },
    h("span", null, "Automatic certificate: "),
    h("span", { class: failed ? "badge error" : acme.status === "valid" ? "badge ok" : "badge pending" }, acme.status),
    failed ? ` ${acme.failures}× in a row, next try ` : " next renewal ", timeEl(acme.next_attempt_at),
    failed && acme.error ? h("pre", { class: "acme-error small", testid: "acme-error" }, acme.error) : null);
}

function domainCard(ctx, d, reload) {
  const path = `/domains/${enc(d.domain)}`;
  const verify = h("button", { type: "button", class: "button", testid: "domain-verify" }, d.verified ? "Re-check" : "Verify");
  verify.addEventListener("click", () => act(verify, async () => {
    const answer = await api("POST", `${path}/verify`);
    await reload();
    if (!answer?.verified) {
      showError(new ApiError(200, "NOT_VERIFIED", `${d.domain}: neither the TXT record nor the HTTP token was found yet`));
    }
  }));
  const remove = h("button", { type: "button", class: "button subtle danger", testid: "domain-remove" }, "Remove");
  remove.addEventListener("click", () => act(remove, async () => {
    await api("DELETE", path);
    await reload();
  }));
  const v = d.verification ?? {};
  const cert = d.certificate;
  const expired = cert && Date.parse(cert.not_after) < Date.now();
  const certPem = h("textarea", { rows: "4", placeholder: "-----BEGIN CERTIFICATE-----", testid: "cert-pem", spellcheck: "false" });
  const keyPem = h("textarea", { rows: "4", placeholder: "-----BEGIN PRIVATE KEY-----", testid: "key-pem", spellcheck: "false" });
  const upload = h("button", { type: "submit", class: "button", testid: "cert-upload" }, "Upload certificate");
  const certForm = h("form", { class: "cert-form" }, h("label", null, "Certificate chain (PEM)", certPem),
    h("label", null, "Private key (PEM)", keyPem), upload);
  certForm.addEventListener("submit", (event) => {
    event.preventDefault();
    act(upload, async () => {
      await api("PUT", `${path}/certificate`, { cert_pem: certPem.value, key_pem: keyPem.value });
      await reload();
    });
  });
  let removeCert = null;
  if (cert) {
    removeCert = h("button", { type: "button", class: "button subtle danger", testid: "cert-remove" }, "Remove certificate");
    removeCert.addEventListener("click", () => act(removeCert, async () => {
      await api("DELETE", `${path}/certificate`);
      await reload();
    }));
  }
  return h("article", { class: "card domain", testid: "domain-card", "data-domain": d.domain, "data-verified": String(!!d.verified) },
    h("div", { class: "domain-head" },
      h("strong", { class: "domain-name" }, d.domain),
      h("span", { class: d.verified ? "badge ok" : "badge pending", testid: "domain-status" }, d.verified ? "verified" : "pending"),
      h("span", { class: "spacer" }),
      verify, remove),
    d.verified
      ? h("p", { class: "muted small" }, "Verified ", timeEl(d.verified_at), ". Requests to it reach the production deployment.")
      : h("div", { class: "verification", testid: "domain-verification" },
        h("p", null, "Prove you control this domain with either:"),
        h("ol", null,
          h("li", null, "a DNS TXT record ", h("code", { testid: "txt-name" }, v.txt_name ?? ""), " with the value ",
            h("code", { testid: "txt-value" }, v.txt_value ?? ""), ", or"),
          h("li", null, "an HTTP answer at ", h("code", { testid: "http-url" }, v.http_url ?? ""), " with the body ",
            h("code", { testid: "http-body" }, v.http_body ?? ""), ".")),
        h("p", { class: "muted small" }, "Then press Verify. Only verified domains route.")),
    h("div", { class: "certificate", testid: "domain-certificate", "data-state": cert ? (expired ? "expired" : "valid") : "none" },
      h("span", null, "Certificate: "),
      cert
        ? [h("span", { class: expired ? "badge error" : "badge ok" }, expired ? "expired" : "valid"),
          ` ${cert.source === "acme" ? "automatic" : "uploaded"}, until ${formatTime(cert.not_after)} for ${(cert.names ?? []).join(", ")} `, removeCert]
        : h("span", { class: "muted" }, "none (served over HTTP)")),
    d.acme ? acmeLine(d.acme) : null,
    h("details", { class: "cert-upload" }, h("summary", null, cert ? "Replace certificate" : "Upload a certificate"), certForm));
}

// ------------------------------------------------------------------ tokens (admin)

/** Scoped API tokens: create (the secret shown once, with a copy button), list, revoke. */
async function tokensView() {
  const scopeKind = h("select", { id: "token-kind", testid: "token-kind" },
    h("option", { value: "read" }, "read one project"),
    h("option", { value: "deploy" }, "deploy one project"),
    h("option", { value: "admin" }, "admin"));
  const projectInput = h("input", {
    id: "token-project", placeholder: "project", autocomplete: "off", spellcheck: "false", testid: "token-project",
  });
  const nameInput = h("input", {
    id: "token-name", placeholder: "name (optional)", autocomplete: "off", spellcheck: "false", testid: "token-name",
  });
  const expires = h("select", { id: "token-expires", testid: "token-expires" },
    h("option", { value: "" }, "never expires"),
    h("option", { value: String(7 * 86400) }, "7 days"),
    h("option", { value: String(30 * 86400), selected: true }, "30 days"),
    h("option", { value: String(90 * 86400) }, "90 days"),
    h("option", { value: String(365 * 86400) }, "1 year"));
  scopeKind.addEventListener("change", () => { projectInput.hidden = scopeKind.value === "admin"; });
  const create = h("button", { type: "submit", class: "button primary", testid: "token-create" }, "Create token");
  const form = h("form", { class: "inline-form", testid: "token-form" },
    h("label", { for: "token-kind", class: "sr-only" }, "Scope"), scopeKind,
    h("label", { for: "token-project", class: "sr-only" }, "Project"), projectInput,
    h("label", { for: "token-name", class: "sr-only" }, "Name"), nameInput,
    h("label", { for: "token-expires", class: "sr-only" }, "Expiry"), expires, create);
  const shown = h("div", { testid: "token-secret-box" });
  const table = h("table", { class: "table", testid: "token-list" });
  replace(app, h("section", null,
    h("div", { class: "page-head" }, h("h1", null, "API tokens")),
    h("p", { class: "muted" }, "A project token deploys (upload, deploy, promote, roll back) or reads one project; ",
      "only admin tokens set env vars, domains, limits and tokens. A secret is shown once, when it is made."),
    form, shown, table));

  const load = async () => {
    const rows = [];
    for (let path = "/tokens?limit=100"; path;) {
      const page = await apiPage(path);
      rows.push(...page.items);
      path = page.next;
    }
    replace(table,
      h("thead", null, h("tr", null, ["Name", "Scope", "Status", "Expires", "Last used", ""].map((t) => h("th", null, t)))),
      h("tbody", null, rows.map((t) => {
        let revoke = null;
        if (t.status === "active") {
          revoke = h("button", { type: "button", class: "button subtle danger", testid: "token-revoke" }, "Revoke");
          revoke.addEventListener("click", () => act(revoke, async () => {
            await api("DELETE", `/tokens/${enc(t.id)}`);
            await load();
          }));
        }
        return h("tr", { testid: "token-row", "data-name": t.name, "data-status": t.status },
          h("td", null, h("code", null, t.name)),
          h("td", { testid: "token-scope" }, t.scope),
          h("td", { testid: "token-status" }, t.status),
          h("td", null, t.expires_at ? timeEl(t.expires_at) : h("span", { class: "muted" }, "never")),
          h("td", null, t.last_used_at ? timeEl(t.last_used_at) : h("span", { class: "muted" }, "—")),
          h("td", { class: "right" }, revoke));
      })));
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(create, async () => {
      const kind = scopeKind.value;
      const body = { scope: kind === "admin" ? "admin" : `project:${projectInput.value.trim()}:${kind}` };
      if (nameInput.value.trim()) body.name = nameInput.value.trim();
      if (expires.value) body.expires_in_s = Number(expires.value);
      const created = await api("POST", "/tokens", body);
      const secret = h("code", { class: "secret", testid: "token-secret" }, created.secret);
      const copy = h("button", { type: "button", class: "button", testid: "token-copy" }, "Copy");
      copy.addEventListener("click", () => act(copy, async () => {
        await navigator.clipboard.writeText(created.secret);
        copy.textContent = "Copied";
      }));
      const dismiss = h("button", { type: "button", class: "button subtle", testid: "token-secret-done" }, "Done");
      dismiss.addEventListener("click", () => replace(shown));
      replace(shown, h("div", { class: "card", testid: "token-created" },
        h("p", null, "Token ", h("code", null, created.token.name), " (", created.token.scope, "). ",
          h("strong", null, "Copy its secret now: it is not shown again.")),
        h("p", null, secret, " ", copy, " ", dismiss)));
      nameInput.value = "";
      await load();
    });
  });
  await load();
}

// ------------------------------------------------------------------ audit (admin)

/** The audit log, newest first, a page at a time; of one project when asked. */
async function auditView() {
  const projectInput = h("input", {
    id: "audit-project", placeholder: "all projects", autocomplete: "off", spellcheck: "false", testid: "audit-project",
  });
  const filter = h("button", { type: "submit", class: "button", testid: "audit-filter" }, "Filter");
  const form = h("form", { class: "inline-form", testid: "audit-form" },
    h("label", { for: "audit-project", class: "sr-only" }, "Project"), projectInput, filter);
  const table = h("table", { class: "table", testid: "audit-list" });
  const more = h("button", { type: "button", class: "more", testid: "more-audit", hidden: true }, "Older entries");
  replace(app, h("section", null, h("div", { class: "page-head" }, h("h1", null, "Audit log"), form), table, more));
  let next = null;
  const row = (e) => h("tr", { testid: "audit-row", "data-action": e.action, "data-outcome": e.outcome },
    h("td", null, timeEl(e.at)),
    h("td", null, h("code", null, e.token_name)),
    h("td", null, e.action),
    h("td", null, e.project ?? ""),
    h("td", { class: `outcome-${e.outcome}` }, `${e.status} ${e.outcome}`),
    h("td", null, h("code", null, e.target)));
  const body = h("tbody");
  const load = async () => {
    const project = projectInput.value.trim();
    const page = await apiPage(`/audit?limit=100${project ? `&project=${enc(project)}` : ""}`);
    replace(table,
      h("thead", null, h("tr", null, ["When", "Token", "Action", "Project", "Outcome", "Target"].map((t) => h("th", null, t)))),
      body);
    replace(body, page.items.length ? page.items.map(row) : h("tr", null, h("td", { class: "empty" }, "No entries.")));
    next = page.next;
    more.hidden = !next;
  };
  more.addEventListener("click", () => act(more, async () => {
    const page = await apiPage(next);
    for (const e of page.items) body.append(row(e));
    next = page.next;
    more.hidden = !next;
  }));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    act(filter, load);
  });
  await load();
}

// ------------------------------------------------------------------ start

async function start() {
  if (token) {
    try {
      showSession(await api("GET", "/whoami"));
    } catch (e) {
      if (!token) return; // a 401: api() signed out and routed to the login
      carriedError = e;
    }
  }
  route();
}

start();
