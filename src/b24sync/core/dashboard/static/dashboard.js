// The b24sync dashboard: polls Core's API every 2 s and draws what it answers.
// With CORE_API_TOKEN set, the token typed in is kept in this tab's sessionStorage and sent as
// `Authorization: Bearer` with every request.
"use strict";

const POLL_MS = 2000;
const PAGE_SIZE = 50;
const TOKEN_KEY = "b24sync.token";
// The colour of each answer an event got, as the sync states'.
const ANSWER_STYLES = { success: "synced", error: "failed" };
const tokenRequired = document.body.dataset.tokenRequired === "true";

const view = { page: 1, state: "", search: "", historyUser: null, config: null, seen: {} };

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, seconds);
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "–";
}

function setText(id, value) {
  $(id).textContent = value === null || value === undefined ? "–" : String(value);
}

// Redraws a part only when its data changed, so that buttons under the pointer stay put.
function changed(key, data) {
  const text = JSON.stringify(data);
  if (view.seen[key] === text) return false;
  view.seen[key] = text;
  return true;
}

function stateBadge(status) {
  return el("span", { className: `state ${status}`, textContent: status });
}

function renderPipeline(p) {
  const users = p.sync.users;
  setText("p-total", users.total);
  setText("p-pending", users.pending);
  setText("p-synced", users.synced);
  setText("p-failed", users.failed);
  setText("p-retrying", p.sync.failed.retrying);
  setText("p-permanent", p.sync.failed.permanent);
  setText("p-oldest", ago(p.sync.oldest_pending_s));
  setText("p-outbox", p.sync.outbox.unpublished);
  setText("p-outbox-age", ago(p.sync.outbox.oldest_unpublished_s));
  setText("p-queue-name", p.queue_name);
  const q = p.queue || {};
  for (const name of ["waiting", "active", "delayed", "failed"]) setText(`q-${name}`, q[name]);
  $("p-redis-error").hidden = !p.redis_error;
  $("p-redis-error").textContent = p.redis_error || "";
  const b = p.bitrix;
  setText("b-rate", b ? b.requests_per_s : null);
  setText("b-ceiling", b ? (b.ceiling_per_s === null ? "no limit" : `${b.ceiling_per_s}/s`) : null);
  setText("b-window", b ? b.window_s : null);
  setText("b-limits", b ? b.limit_answers : null);
  const spark = $("b-spark");
  spark.replaceChildren();
  if (b) {
    const top = Math.max(1, b.ceiling_per_s || 0, ...b.per_second);
    for (const count of b.per_second) {
      const bar = el("span", { title: `${count} requests` });
      bar.style.height = `${Math.round((count / top) * 100)}%`;
      spark.append(bar);
    }
  }
  if (changed("failures", p.recent_failures)) {
    $("failures").replaceChildren(
      ...(p.recent_failures.length
        ? p.recent_failures.map((f) =>
            el(
              "li",
              {},
              el("b", {}, `#${f.user_id} ${f.full_name}`),
              ` — ${f.reason || "no reason"}`,
              f.code ? ` (${f.code})` : "",
              el(
                "span",
                { className: "muted" },
                ` · ${f.retryable ? "retrying" : "permanent"}, ${f.attempts} attempt(s),` +
                  ` failed ${when(f.failed_at)}`,
              ),
            ),
          )
        : [el("li", { className: "muted" }, "none")]),
    );
  }
  $("updated").textContent = `updated ${new Date(p.taken_at).toLocaleTimeString()}`;
}

function leadCell(user) {
  if (user.bitrix_lead_id === null) return el("td", { className: "muted" }, "–");
  const template = view.config && view.config.lead_url;
  if (!template) return el("td", {}, user.bitrix_lead_id);
  const link = el("a", {
    href: template.replace("{id}", encodeURIComponent(user.bitrix_lead_id)),
    target: "_blank",
    rel: "noopener noreferrer",
    textContent: user.bitrix_lead_id,
  });
  return el("td", {}, link);
}

function errorCell(sync) {
  if (!sync.error) return el("td", { className: "error-cell muted" }, "–");
  return el(
    "td",
    { className: "error-cell" },
    el("span", { className: "error reason" }, sync.error),
    sync.error_code ? el("span", { className: "muted" }, ` (${sync.error_code})`) : null,
    el("br"),
    el(
      "span",
      { className: "muted" },
      `${sync.retryable ? "retrying" : "permanent"} · ${sync.attempts} attempt(s)` +
        (sync.retries ? ` · ${sync.retries} retr${sync.retries === 1 ? "y" : "ies"} by Core` : "") +
        ` · ${when(sync.failed_at)}` +
        (sync.next_retry_at ? ` · next ${when(sync.next_retry_at)}` : ""),
    ),
  );
}

function renderUsers(list) {
  if (!changed("users", list)) return;
  const rows = list.items.map((user) => {
    const history = el("button", { type: "button", className: "history", textContent: "History" });
    history.addEventListener("click", () => openHistory(user.id));
    const resync = el("button", { type: "button", className: "resync", textContent: "Resync" });
    resync.addEventListener("click", () => act(`/users/${user.id}/resync`, undefined, `user ${user.id} sent again`));
    const row = el(
      "tr",
      { className: view.historyUser === user.id ? "selected" : "" },
      el("td", {}, user.id),
      el("td", { className: "name" }, user.full_name),
      el("td", {}, user.phone),
      el("td", {}, user.stage),
      el("td", { className: "sync" }, stateBadge(user.sync.status)),
      leadCell(user),
      errorCell(user.sync),
      el("td", {}, history, " ", resync),
    );
    row.dataset.userId = user.id;
    row.dataset.state = user.sync.status;
    return row;
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 8, className: "muted" }, "no users")));
  $("users").tBodies[0].replaceChildren(...rows);
  const pages = list.pagination.max_page;
  $("page-info").textContent = `page ${view.page} of ${pages} · ${list.pagination.total_count} user(s)`;
  $("prev").disabled = view.page <= 1;
  $("next").disabled = view.page >= pages;
}

function renderHistory(history) {
  if (!changed("history", history)) return;
  $("history-user").textContent = history.user_id;
  const rows = history.events.map((event) =>
    el(
      "tr",
      {},
      el("td", {}, new Date(event.created_at).toLocaleString()),
      el("td", {}, event.pattern + (event.force ? " (force)" : "")),
      el("td", {}, event.version),
      el(
        "td",
        {},
        Object.entries(event.sent)
          .filter(([field]) => !event.changed || event.changed.includes(field))
          .map(([field, value]) => `${field}: ${value}`)
          .join(", "),
      ),
      el("td", {}, event.published_at ? when(event.published_at) : "not yet", event.resends ? ` (sent again ${event.resends}×)` : ""),
      el(
        "td",
        {},
        event.answer_status
          ? el("span", { className: `state ${ANSWER_STYLES[event.answer_status] || "pending"}`, textContent: event.answer_status })
          : el("span", { className: "muted" }, "waiting"),
        event.answer_reason ? el("div", { className: "muted" }, event.answer_reason) : null,
      ),
    ),
  );
  $("history-table").tBodies[0].replaceChildren(...rows);
}

function renderBoard(board) {
  $("board-error").hidden = !board.error;
  $("board-error").textContent = board.error ? `Cannot read ${board.error}` : "";
  if (!changed("board", board.columns)) return;
  $("board").replaceChildren(
    ...board.columns.map((column) =>
      el(
        "div",
        { className: "column" },
        el("h3", {}, el("span", {}, column.stage), el("span", {}, column.count)),
        ...column.leads.map((lead) => {
          const card = el(
            "div",
            { className: "lead" },
            el("div", {}, `#${lead.id} ${lead.title}`),
            el("div", { className: "muted" }, `${lead.phone || ""}${lead.user_id ? ` · user ${lead.user_id}` : ""}`),
          );
          card.dataset.leadId = lead.id;
          return card;
        }),
      ),
    ),
  );
  $("board").dataset.stages = board.columns.map((c) => c.status_id).join(",");
}

function usersQuery() {
  const query = new URLSearchParams({ page: view.page, limit: PAGE_SIZE });
  if (view.state) query.set("sync_status", view.state);
  if (view.search) query.set("search", view.search);
  return `/users?${query}`;
}

async function refresh() {
  const jobs = [api("/sync/pipeline").then(renderPipeline), api(usersQuery()).then(renderUsers)];
  if (view.config.emulator) jobs.push(api("/ui/leads").then(renderBoard));
  if (view.historyUser !== null) jobs.push(api(`/users/${view.historyUser}/history?limit=50`).then(renderHistory));
  await Promise.all(jobs);
}

let timer = null;
let running = false;
let again = false;

// One refresh at a time; asked for meanwhile (a filter changed), the next follows at once.
async function tick() {
  clearTimeout(timer);
  if (running) {
    again = true;
    return;
  }
  running = true;
  again = false;
  try {
    await refresh();
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin("The token was refused.");
    $("updated").textContent = `cannot reach Core (${error.message}); trying again`;
  } finally {
    running = false;
  }
  timer = setTimeout(tick, again ? 0 : POLL_MS);
}

async function act(path, body, done) {
  try {
    const result = await api(path, { method: "POST", body: body === undefined ? undefined : JSON.stringify(body) });
    $("action-message").textContent = typeof done === "function" ? done(result) : done;
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin("The token was refused.");
    $("action-message").textContent = `failed: ${error.message}`;
  }
  tick();
}

function openHistory(userId) {
  view.historyUser = userId;
  delete view.seen.history;
  delete view.seen.users;
  $("history").hidden = false;
  tick();
}

function showLogin(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(TOKEN_KEY);
  $("app").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").hidden = !message;
  $("login-error").textContent = message || "";
  $("updated").textContent = "";
}

async function start() {
  try {
    view.config = await api("/ui/config");
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin(sessionStorage.getItem(TOKEN_KEY) ? "The token was refused." : "");
    $("updated").textContent = `cannot reach Core (${error.message})`;
    setTimeout(start, POLL_MS);
    return;
  }
  view.seen = {};
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = !tokenRequired;
  $("board-section").hidden = !view.config.emulator;
  tick();
}

function wire() {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    start();
  });
  $("logout").addEventListener("click", () => showLogin(""));
  $("filter-state").addEventListener("change", (event) => {
    view.state = event.target.value;
    view.page = 1;
    tick();
  });
  let debounce = null;
  $("search").addEventListener("input", (event) => {
    clearTimeout(debounce);
    debounce = setTimeout(() => {
      view.search = event.target.value.trim();
      view.page = 1;
      tick();
    }, 300);
  });
  $("prev").addEventListener("click", () => {
    view.page = Math.max(1, view.page - 1);
    tick();
  });
  $("next").addEventListener("click", () => {
    view.page += 1;
    tick();
  });
  $("resync-failed").addEventListener("click", () =>
    act("/sync/resync", { status: "failed" }, (result) => `${result.resent} failed user(s) sent again`),
  );
  $("history-close").addEventListener("click", () => {
    view.historyUser = null;
    delete view.seen.users;
    $("history").hidden = true;
    tick();
  });
}

wire();
if (tokenRequired && !sessionStorage.getItem(TOKEN_KEY)) showLogin("");
else start();
