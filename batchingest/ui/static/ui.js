// The dashboard's one script: no framework, no build step.
// The token lives in sessionStorage (this tab only) and goes out as X-Api-Token; it is
// never put in a URL or a cookie. Every text from the service is set with textContent.
"use strict";

const KEY = "batchingest.token";
const page = document.body.dataset.page;
const JOB = document.body.dataset.job || "";
const enc = encodeURIComponent;

function token() {
  return sessionStorage.getItem(KEY);
}

function toLogin() {
  const here = location.pathname + location.search;
  location.assign("/ui/login?next=" + enc(here));
}

// Only a page of this dashboard: never an address given by someone else.
function safeNext(raw) {
  return raw && /^\/ui(\/|$|\?)/.test(raw) && !raw.startsWith("//") ? raw : "/ui";
}

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function failure(r) {
  let code = r.headers.get("X-Error-Code") || "";
  let message = `HTTP ${r.status}`;
  try {
    const body = await r.json();
    code = body.code || code;
    message = body.message || message;
  } catch (e) {
    // not JSON: keep the status
  }
  return new ApiFailure(r.status, code, message);
}

async function call(method, path, headers = {}) {
  const r = await fetch(path, {
    method,
    headers: { "X-Api-Token": token(), ...headers },
    cache: "no-store",
    credentials: "omit",
  });
  if (r.status === 401) {
    sessionStorage.removeItem(KEY);
    toLogin();
    throw new ApiFailure(401, "Unauthorized", "the token is no longer valid");
  }
  return r;
}

async function getJson(path) {
  const r = await call("GET", path);
  if (!r.ok) throw await failure(r);
  return r.json();
}

// A route a service without that feature does not have (an older version).
function missingRoute(e) {
  return e instanceof ApiFailure && (
    (e.status === 404 && e.code === "NotFound") || e.status === 405 || e.status === 501);
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function $(id) {
  return document.getElementById(id);
}

// What each polling loop last failed with: the banner shows while any of them fails.
const failing = new Map();

function problem(message, loop = "page") {
  const box = $("problem");
  if (!box) return;
  if (message) failing.set(loop, message);
  else failing.delete(loop);
  box.hidden = failing.size === 0;
  box.textContent = [...new Set(failing.values())].join("; ");
}

function updated() {
  const u = $("updated");
  if (u) u.textContent = "updated " + new Date().toLocaleTimeString();
}

function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function seconds(s) {
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function badge(status, look = status) {
  return el("span", { class: "badge state-" + look, text: status });
}

function confirmed(message, yes = "OK") {
  const dialog = $("confirm");
  $("confirm-text").textContent = message;
  $("confirm-yes").textContent = yes;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

// Run fn now and every `ms`, one at a time; a failure shows and the next round retries.
let loops = 0;
function every(ms, fn, loop = "loop" + loops++) {
  let busy = false;
  const tick = async () => {
    if (busy) return;
    busy = true;
    try {
      await fn();
      problem("", loop);
      updated();
    } catch (e) {
      if (!(e instanceof ApiFailure && e.status === 401)) problem("Cannot reach the service: " + e.message, loop);
    } finally {
      busy = false;
    }
  };
  tick();
  return setInterval(tick, ms);
}

// -- log in ------------------------------------------------------------------------------

function loginPage() {
  const form = $("login-form");
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const typed = $("token").value.trim();
    const error = $("login-error");
    error.hidden = true;
    let r;
    try {
      r = await fetch("/ui/api/overview", {
        headers: { "X-Api-Token": typed },
        cache: "no-store",
        credentials: "omit",
      });
    } catch (e) {
      error.textContent = "Cannot reach the service: " + e.message;
      error.hidden = false;
      return;
    }
    if (r.status === 401) {
      error.textContent = "This token is not valid for this service.";
      error.hidden = false;
      $("token").select();
      return;
    }
    sessionStorage.setItem(KEY, typed);
    location.assign(safeNext(new URLSearchParams(location.search).get("next")));
  });
}

// -- overview -----------------------------------------------------------------------------

function fillNames(list, names, link = true) {
  list.replaceChildren(...names.map((n) => {
    const name = typeof n === "string" ? n : n.name;
    const item = el("li", {}, link ? el("a", { href: "/ui/jobs/" + enc(name), text: name }) : name);
    if (n.time) item.append(el("span", { class: "muted small", text: " " + n.time }));
    return item;
  }));
  if (!names.length) list.replaceChildren(el("li", { class: "muted", text: "none" }));
}

function chart(box, buckets) {
  const most = Math.max(1, ...buckets.map((b) => b.success + b.error));
  box.replaceChildren(...buckets.map((b) => {
    const bar = el("div", { class: "bar", title: `${b.start}: ${b.success} ok, ${b.error} failed` });
    const ok = el("div", { class: "ok" });
    const bad = el("div", { class: "bad" });
    ok.style.height = (100 * b.success) / most + "%";
    bad.style.height = (100 * b.error) / most + "%";
    bar.append(bad, ok);
    return bar;
  }));
}

async function stagingRows(items) {
  const box = $("staging");
  if (!items.length) {
    box.replaceChildren(el("p", { class: "muted", text: "none in progress or in the last hour" }));
    return;
  }
  const rows = [];
  for (const item of items) {
    let doc;
    try {
      doc = await getJson("/dts/staging/" + enc(item.id));
    } catch (e) {
      if (e.status === 503 || missingRoute(e)) {
        box.replaceChildren(el("p", { class: "muted", text: "staging is not available on this service" }));
        return;
      }
      continue; // not a staging job after all, or gone
    }
    const bar = el("progress", { max: String(doc.bytes_total || 1), value: String(doc.bytes_staged || 0) });
    if (!doc.bytes_total) bar.value = doc.status === "ready" ? 1 : 0;
    rows.push(el("div", { class: "staging-row" },
      el("a", { href: "/ui/jobs/" + enc(item.id), text: item.id }),
      badge(doc.status, doc.status === "ready" ? "complete" : doc.status), bar,
      el("span", { class: "small muted", text:
        `${doc.files_staged}/${doc.files_total} files, ${bytes(doc.bytes_staged)} of ${bytes(doc.bytes_total)}` +
        (doc.message ? " — " + doc.message : "") })));
  }
  box.replaceChildren(...rows);
}

function transferRow(label, state, done, total, unit) {
  const bar = el("progress", { max: String(total || 1), value: String(total ? done : 0) });
  if (!total) bar.removeAttribute("value"); // size unknown: an indeterminate bar
  const amount = unit === "bytes" ? bytes(done) + (total ? " of " + bytes(total) : "") : `${done}/${total} files`;
  return el("div", { class: "staging-row" }, el("span", { text: label }), badge(state), bar,
    el("span", { class: "small muted", text: amount }));
}

// Transfers: the Staccato-style /v1/transfers and the Globus task list, where served.
async function transferRows() {
  const box = $("transfers");
  const rows = [];
  let served = false;
  try {
    const list = await getJson("/v1/transfers?limit=10");
    served = true;
    for (const t of Array.isArray(list) ? list : list.transfers || []) {
      const total = t.end_offset > 0 ? t.end_offset - (t.start_offset || 0) : 0;
      rows.push(transferRow(t.id, String(t.state).replace(/^STATE_/, "").toLowerCase(), t.progress || 0, total, "bytes"));
    }
  } catch (e) {
    if (!(missingRoute(e) || e.status === 503)) throw e;
  }
  try {
    const doc = await getJson("/globus/v0.10/task_list?limit=10");
    served = true;
    for (const t of doc.DATA || []) {
      rows.push(transferRow(t.label || t.task_id, String(t.status).toLowerCase(), t.files_transferred || 0, t.files || 0, "files"));
    }
  } catch (e) {
    if (!(missingRoute(e) || e.status === 503)) throw e;
  }
  if (!served) {
    box.replaceChildren(el("p", { class: "muted", text: "transfers are not available on this service" }));
  } else {
    box.replaceChildren(...(rows.length ? rows : [el("p", { class: "muted", text: "none" })]));
  }
}

function overviewPage() {
  every(2000, async () => {
    const o = await getJson("/ui/api/overview");
    for (const [status, n] of Object.entries(o.counts)) $("count-" + status).textContent = String(n);
    $("hour-finished").textContent = String(o.hour.finished);
    $("hour-success").textContent = String(o.hour.success);
    $("hour-error").textContent = String(o.hour.error);
    $("hour-rate").textContent = String(o.hour.per_minute);
    chart($("hour-chart"), o.hour.buckets);
    fillNames($("recent-errors"), o.recent_errors);
    fillNames($("processing"), o.processing);
    $("requeue-failed").disabled = o.counts.error === 0;
    await stagingRows(o.staging);
    await transferRows();
  });
  $("requeue-failed").addEventListener("click", async () => {
    const n = $("count-error").textContent;
    if (!(await confirmed(`Move all ${n} failed jobs from error/ back to queue/?`, "Requeue all"))) return;
    const out = $("requeue-result");
    try {
      const r = await call("POST", "/ui/api/requeue-failed");
      if (!r.ok) throw await failure(r);
      const res = await r.json();
      out.textContent = `${res.requeued} requeued` +
        (res.failed.length ? `; not moved: ${res.failed.map((f) => f.name + " (" + f.reason + ")").join(", ")}` : "");
    } catch (e) {
      out.textContent = "Requeue failed: " + e.message;
    }
  });
}

// -- job list -----------------------------------------------------------------------------

function jobsPage() {
  const params = new URLSearchParams(location.search);
  const form = $("filter");
  $("f-status").value = params.get("status") || "";
  $("f-q").value = params.get("q") || "";
  $("f-sort").value = params.get("sort") || "name";
  let offset = Number(params.get("offset")) || 0;
  const limit = 50;
  let total = 0;

  const query = () => {
    const q = new URLSearchParams();
    for (const key of ["status", "q", "sort"]) {
      const v = form.elements[key].value;
      if (v && !(key === "sort" && v === "name")) q.set(key, v);
    }
    if (offset) q.set("offset", String(offset));
    return q;
  };
  const load = async () => {
    const q = query();
    history.replaceState(null, "", "/ui/jobs" + (q.size ? "?" + q : ""));
    q.set("limit", String(limit));
    const res = await getJson("/ui/api/jobs?" + q);
    total = res.total;
    $("job-rows").replaceChildren(...res.jobs.map((j) => el("tr", {},
      el("td", {}, el("a", { href: "/ui/jobs/" + enc(j.name), text: j.name })),
      el("td", {}, badge(j.status)),
      el("td", { class: "muted", text: j.changed || "" }))));
    if (!res.jobs.length) $("job-rows").replaceChildren(el("tr", {}, el("td", { colspan: "3", class: "muted", text: "no jobs" })));
    const last = Math.min(offset + limit, total);
    $("page-info").textContent = total ? `${offset + 1}-${last} of ${total}` : "";
    $("prev").disabled = offset === 0;
    $("next").disabled = last >= total;
  };
  const reload = () => {
    offset = 0;
    refresh();
  };
  let timer = null;
  const refresh = () => {
    clearInterval(timer);
    timer = every(3000, load, "jobs");
  };
  form.addEventListener("submit", (ev) => ev.preventDefault());
  form.addEventListener("change", reload);
  $("f-q").addEventListener("input", reload);
  $("prev").addEventListener("click", () => { offset = Math.max(0, offset - limit); refresh(); });
  $("next").addEventListener("click", () => { offset += limit; refresh(); });
  refresh();
}

// -- one job ------------------------------------------------------------------------------

function timeline(info) {
  const list = $("timeline");
  const items = [];
  const runs = (info.Finished || []).map((f) => ({ ...f, took: (Date.parse(f.Finish) - Date.parse(f.Start)) / 1000 }));
  const longest = Math.max(0.001, ...runs.map((f) => f.took || 0));
  for (const f of runs) {
    const item = el("li", { class: "task " + (f.Status === "ok" ? "ok" : "failed") },
      el("span", { class: "task-name", text: f.Name }),
      el("span", { class: "small", text: `${f.Status}${isNaN(f.took) ? "" : " in " + seconds(f.took)}` }),
      el("span", { class: "muted small", text: f.Start || "" }));
    const fill = el("div", { class: "fill" });
    fill.style.width = Math.max(1, (100 * (f.took || 0)) / longest) + "%";
    item.append(el("div", { class: "track" }, fill));
    if (f.Reason) item.append(el("div", { class: "small error", text: f.Reason }));
    items.push(item);
  }
  (info.Todo || []).forEach((name, i) => {
    const running = i === 0 && info.Status === "processing";
    items.push(el("li", { class: "task " + (running ? "running" : "todo") },
      el("span", { class: "task-name", text: name }),
      el("span", { class: "small", text: running ? "running" : "to do" })));
  });
  if (info.JobError) items.push(el("li", { class: "error", text: "JOB cannot be read: " + info.JobError }));
  list.replaceChildren(...items);
}

async function download(path, name) {
  const r = await call("GET", `/jobs/${enc(JOB)}/files/${path.split("/").map(enc).join("/")}`);
  if (!r.ok) throw await failure(r);
  const url = URL.createObjectURL(await r.blob());
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function files(path) {
  const list = await getJson(`/ui/api/jobs/${enc(JOB)}/entries?path=${enc(path)}`);
  $("files-path").textContent = path ? "/" + path : "";
  const rows = [];
  if (path) {
    const up = path.split("/").slice(0, -1).join("/");
    rows.push(el("tr", {}, el("td", { colspan: "3" }, el("button", { class: "plain", type: "button", text: "↑ ..", onclick: () => showFiles(up) }))));
  }
  for (const f of list) {
    const rel = path ? path + "/" + f.name : f.name;
    let action = "";
    if (f.type === "file") {
      action = el("button", { class: "plain", type: "button", text: "Download", onclick: () => download(rel, f.name).catch((e) => problem("Download failed: " + e.message)) });
    }
    const name = f.type === "dir"
      ? el("button", { class: "plain", type: "button", text: f.name + "/", onclick: () => showFiles(rel) })
      : el("span", { text: f.name + (f.type === "file" ? "" : ` (${f.type})`) });
    rows.push(el("tr", {}, el("td", {}, name), el("td", { class: "num", text: f.type === "file" ? bytes(f.size) : "" }), el("td", {}, action)));
  }
  $("files").replaceChildren(...rows);
}

let filesPath = "";
function showFiles(path) {
  filesPath = path;
  files(path).catch((e) => problem("Cannot list files: " + e.message));
}

// Follows LOG by asking for the bytes after those shown (HTTP Range), wherever the job is.
const logState = { offset: 0, decoder: new TextDecoder() };
const LOG_KEEP = 256 * 1024; // characters kept on the page

function showLog(text, reset) {
  const pre = $("log");
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  let all = (reset ? "" : pre.textContent) + text;
  if (all.length > LOG_KEEP) all = all.slice(all.length - LOG_KEEP);
  pre.textContent = all;
  if ($("log-follow").checked && (atEnd || reset)) pre.scrollTop = pre.scrollHeight;
}

async function followLog() {
  const first = logState.offset === 0;
  const range = first ? "bytes=-65536" : `bytes=${logState.offset}-`;
  const r = await call("GET", `/jobs/${enc(JOB)}/files/LOG`, { Range: range });
  if (r.status === 404) {
    if (first) $("log").textContent = "(no LOG yet)";
    return;
  }
  const total = Number((r.headers.get("Content-Range") || "").split("/")[1]);
  if (r.status === 416) {
    if (total < logState.offset) logState.offset = 0; // replaced by a shorter file
    if (first) $("log").textContent = "";
    return;
  }
  if (!r.ok) throw await failure(r);
  const body = new Uint8Array(await r.arrayBuffer());
  const size = r.status === 206 ? total : body.length;
  if (r.status === 200 && !first) logState.decoder = new TextDecoder();
  logState.offset = size;
  showLog(logState.decoder.decode(body, { stream: true }), first || r.status === 200);
}

async function events() {
  let doc;
  try {
    doc = await getJson(`/jobs/${enc(JOB)}/events`);
  } catch (e) {
    if (missingRoute(e)) {
      $("events-note").textContent = "Job history is not available on this service.";
      return false;
    }
    throw e;
  }
  $("events-note").textContent = "";
  const rows = (doc.DATA || []).map((ev) => el("tr", { class: ev.is_error ? "error" : "" },
    el("td", { class: "muted", text: ev.time || "" }),
    el("td", { text: ev.code || "" }),
    el("td", {}, ev.description || "", detailsText(ev.details) ? el("div", { class: "small muted", text: detailsText(ev.details) }) : "")));
  $("events").replaceChildren(...rows);
  return true;
}

let cancelAvailable = true;

function actions(info) {
  const s = info.Status;
  $("act-queue").hidden = !["ready", "error", "success"].includes(s);
  $("act-cancel").hidden = !["queue", "processing"].includes(s);
  $("act-cancel").disabled = !cancelAvailable;
  $("act-cancel").title = cancelAvailable ? "" : "cancel is not available on this service";
  $("act-delete").hidden = s === "processing";
}

async function act(what, method, path, question) {
  if (!(await confirmed(question, what))) return;
  const out = $("act-result");
  out.textContent = "";
  try {
    const r = await call(method, path);
    if (!r.ok) {
      const e = await failure(r);
      if (what === "Cancel" && missingRoute(e)) {
        cancelAvailable = false;
        $("act-cancel").disabled = true;
        out.textContent = "Cancel is not available on this service.";
        return;
      }
      throw e;
    }
    out.textContent = { Queue: "queued", Cancel: "cancel requested", Delete: "deleted" }[what];
    if (what === "Delete") setTimeout(() => location.assign("/ui/jobs"), 800);
  } catch (e) {
    out.textContent = `${what} failed: ${e.message}`;
  }
}

function jobPage() {
  const path = `/jobs/${enc(JOB)}`;
  let last = "";
  let haveEvents = true;
  every(1500, async () => {
    let info;
    try {
      info = await getJson(path);
    } catch (e) {
      if (e.status === 404) {
        $("job-status").replaceChildren();
        $("job-error").textContent = "There is no job of this name (any more).";
        $("job-error").hidden = false;
        return;
      }
      throw e;
    }
    $("job-error").hidden = true;
    $("job-status").replaceChildren(badge(info.Status));
    actions(info);
    timeline(info);
    const seen = info.Status + JSON.stringify(info.Finished);
    if (seen !== last) {
      last = seen;
      showFiles(filesPath);
    }
    if (haveEvents) haveEvents = await events();
  });
  every(1000, followLog);
  $("act-queue").addEventListener("click", () => act("Queue", "POST", path + "/queue", `Queue job ${JOB}?`));
  $("act-cancel").addEventListener("click", () => act("Cancel", "POST", path + "/cancel", `Cancel job ${JOB}? A running task is stopped.`));
  $("act-delete").addEventListener("click", () => act("Delete", "DELETE", path, `Delete job ${JOB} and all its files? This cannot be undone.`));
}

// -- start --------------------------------------------------------------------------------

if (page === "login") {
  loginPage();
} else if (!token()) {
  toLogin();
} else {
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    location.assign("/ui/login");
  });
  ({ overview: overviewPage, jobs: jobsPage, job: jobPage })[page]();
}

// An event's details as "key: value" pairs, one line (they are an object in the history).
function detailsText(details) {
  if (!details || typeof details !== "object") return details ? String(details) : "";
  return Object.entries(details)
    .filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`)
    .join(", ");
}
