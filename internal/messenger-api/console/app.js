// Herald operator console. Plain ES module, no build step, no dependencies: it reads the same
// public API an operator could script (stats, messages, retry, the toggle, run history) and
// follows the live event feed over the WebSocket, authenticating with its first frame so the
// key never appears in a URL. The key lives in this tab's sessionStorage only.

const KEY_STORE = "herald.apiKey";
const PAGE = 20;
const FEED_MAX = 200;

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  socket: null,
  lastEventId: null,
  retryDelay: 500,
  cursors: [null], // cursors[i] = `after` of page i
  page: 0,
  nextCursor: null,
  statsTimer: null,
  runsTimer: null,
  auditTimer: null,
  detailId: null,
};

// ---- helpers --------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function time(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function dateTime(iso) {
  if (!iso) return "–";
  return new Date(iso).toLocaleString([], { dateStyle: "short", timeStyle: "medium" });
}

function ago(seconds) {
  if (!seconds || seconds < 1) return "none";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function shortId(id) {
  return id ? `…${id.slice(-8)}` : "";
}

function pill(status, label = status) {
  return el("span", { class: `pill ${status}` }, label);
}

function toast(text, bad = false) {
  const box = $("toast");
  box.textContent = text;
  box.className = bad ? "toast bad" : "toast";
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 4000);
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const json = options.body !== undefined && typeof options.body !== "string";
  const response = await fetch(path, {
    ...options,
    body: json ? JSON.stringify(options.body) : options.body,
    headers: {
      Authorization: `Bearer ${state.key}`,
      Accept: "application/json",
      ...(json ? { "Content-Type": "application/json" } : {}),
      ...(options.headers || {}),
    },
  });
  if (response.status === 401) throw new Unauthorized("The key is not accepted.");
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.message ? body.message : `HTTP ${response.status}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ---- sign in --------------------------------------------------------------------------------

function showLogin(message = "") {
  $("app").hidden = true;
  $("signout").hidden = true;
  $("login-error").textContent = message;
  if (!$("login").open) $("login").showModal();
  $("key").focus();
}

async function signIn(key) {
  state.key = key;
  try {
    await api("/api/messenger/stats");
  } catch (error) {
    state.key = "";
    sessionStorage.removeItem(KEY_STORE);
    showLogin(error instanceof Unauthorized ? "That key is not accepted." : `Cannot reach Herald: ${error.message}`);
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  $("login").close();
  $("app").hidden = false;
  $("signout").hidden = false;
  refreshStats();
  loadMessages();
  loadRuns();
  loadAudit();
  connect();
}

function signOut() {
  sessionStorage.removeItem(KEY_STORE);
  state.key = "";
  if (state.socket) state.socket.close();
  state.socket = null;
  setLive("offline", "badge-off");
  showLogin();
}

function handleError(error) {
  if (error instanceof Unauthorized) signOut();
  else toast(error.message, true);
}

// ---- stats, chart, job ------------------------------------------------------------------------

function scheduleStats() {
  if (state.statsTimer) return;
  state.statsTimer = setTimeout(() => {
    state.statsTimer = null;
    refreshStats();
  }, 700);
}

async function refreshStats() {
  let stats;
  try {
    stats = await api("/api/messenger/stats");
  } catch (error) {
    return handleError(error);
  }
  for (const status of ["pending", "processing", "sent", "failed", "expired"]) {
    $(`count-${status}`).textContent = stats.counts[status].toLocaleString();
  }
  // Served as kept until a reconciliation checked them (after a large import, at start).
  const counts = document.querySelector(".counts");
  counts.classList.toggle("estimated", stats.countsExact === false);
  counts.title = stats.countsExact === false ? "Counts not yet checked since start: being reconciled" : "";
  $("lag").textContent = ago(stats.oldestDueAgeSeconds);
  $("sent-hour").textContent = stats.sentLastHour.toLocaleString();
  drawChart(stats.sentPerMinute);
  showJob(stats.job);
  showProviders(stats);
  showAdmission(stats.admission);
}

/** The backlog against its bound, and the creates refused (429) since this replica started. */
function showAdmission(a) {
  const backlog = a.backlog.toLocaleString();
  $("admission").textContent = a.maxDueBacklog
    ? `${backlog} of ${a.maxDueBacklog.toLocaleString()} waiting · ${a.rejectedBacklog.toLocaleString()} refused`
    : `${backlog} waiting · no bound`;
  if (a.rejectedKeyRate) $("admission").textContent += ` · ${a.rejectedKeyRate.toLocaleString()} over a key's rate`;
  $("admission").className = a.maxDueBacklog && a.backlog >= a.maxDueBacklog ? "over" : "";
}

/** One card per configured provider: state (kept live by provider.* events), the window's
 * sent/failed and latency, the last failure. */
function showProviders(stats) {
  const list = $("providers");
  $("providers-window").textContent = `since ${time(stats.providerWindowStart)}`;
  $("providers-waiting").textContent = stats.waitingForProvider
    ? `${stats.waitingForProvider.toLocaleString()} message(s) waiting: every provider of their route is paused`
    : "";
  list.replaceChildren(
    ...stats.providers.map((p) => {
      const item = document.createElement("li");
      item.className = "provider";
      item.dataset.provider = p.name;
      const head = document.createElement("div");
      head.className = "provider-head";
      const name = document.createElement("strong");
      name.textContent = p.name;
      const pill = document.createElement("span");
      pill.className = "pill provider-state";
      const live = document.createElement("span");
      live.className = "live-badge";
      live.title = "updated live from the event feed";
      if (liveProviders.has(p.name)) {
        live.textContent = "live";
        live.classList.add("on");
      }
      head.append(name, pill, live);
      const figures = document.createElement("p");
      figures.className = "provider-figures";
      const latency = p.p50Ms == null ? "no requests" : `p50 ≤ ${p.p50Ms} ms · p99 ≤ ${p.p99Ms} ms`;
      figures.textContent = `${p.sent.toLocaleString()} sent · ${p.failed.toLocaleString()} failed · ${latency}`;
      const detail = document.createElement("p");
      detail.className = "provider-detail muted";
      item.append(head, figures, detail);
      if (p.deliveredRate != null || p.read) {
        // What its receipts said: the delivered rate and how long a receipt takes.
        const delivery = document.createElement("p");
        delivery.className = "provider-delivery";
        const rate = p.deliveredRate == null ? "–" : `${(p.deliveredRate * 100).toFixed(1)} %`;
        const wait = p.receiptP50Ms == null ? "" : ` · receipt p50 ≤ ${seconds(p.receiptP50Ms)}`;
        delivery.textContent = `delivered ${rate} (${p.delivered.toLocaleString()} of ${(p.delivered + p.undelivered).toLocaleString()}) · ${p.read.toLocaleString()} read${wait}`;
        item.append(delivery);
      }
      setProviderState(item, p);
      if (p.lastFailure) {
        const failure = document.createElement("p");
        failure.className = "muted";
        const status = p.lastFailure.status ? ` ${p.lastFailure.status}` : "";
        failure.textContent = `last failure ${time(p.lastFailure.at)}: ${p.lastFailure.kind}${status}`;
        item.append(failure);
      }
      return item;
    }),
  );
}

/** A duration in milliseconds, said in the largest whole unit. */
function seconds(ms) {
  if (ms >= 3600000) return `${Math.round(ms / 3600000)} h`;
  if (ms >= 60000) return `${Math.round(ms / 60000)} min`;
  return `${Math.round(ms / 1000)} s`;
}

/** Shows a provider's state on its card. */
function setProviderState(item, provider) {
  const pill = item.querySelector(".provider-state");
  const detail = item.querySelector(".provider-detail");
  const paused = provider.pausedUntil && new Date(provider.pausedUntil) > new Date();
  const shown =
    provider.state === "open" || !provider.pausedUntil
      ? "open"
      : provider.state === "misconfigured" && paused
        ? "misconfigured"
        : paused
          ? "paused"
          : "probing";
  const words = { open: "Open", paused: "Paused", misconfigured: "Misconfigured", probing: "Probing" };
  pill.textContent = words[shown];
  pill.className = `pill provider-state ${shown === "misconfigured" ? "paused" : shown}`;
  detail.textContent =
    shown === "paused" || shown === "misconfigured"
      ? `until ${time(provider.pausedUntil)}${provider.reason ? ` · ${provider.reason}` : ""}`
      : shown === "probing"
        ? "one send decides"
        : provider.failureStreak
          ? `${provider.failureStreak} failure(s) in a row`
          : "";
}

/** Providers whose state an event has changed since the page opened. */
const liveProviders = new Set();

/** A provider.* event: the card of that provider changes at once, marked live. */
function showProviderEvent(type, provider) {
  liveProviders.add(provider.name);
  const item = document.querySelector(`#providers li[data-provider="${CSS.escape(provider.name)}"]`);
  if (!item) return;
  const state = type === "provider.misconfigured" ? "misconfigured" : provider.pausedUntil ? "paused" : "open";
  setProviderState(item, { ...provider, state });
  const badge = item.querySelector(".live-badge");
  badge.textContent = "live";
  badge.classList.add("on");
}

function drawChart(minutes) {
  const svg = $("chart");
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const max = Math.max(1, ...minutes.map((m) => m.sent));
  const width = 600 / 60;
  minutes.forEach((m, i) => {
    const height = m.sent ? Math.max(3, (m.sent / max) * 130) : 2;
    const bar = document.createElementNS(ns, "rect");
    bar.setAttribute("x", String(i * width + 1));
    bar.setAttribute("y", String(140 - height));
    bar.setAttribute("width", String(width - 2));
    bar.setAttribute("height", String(height));
    if (!m.sent) bar.setAttribute("class", "empty");
    const title = document.createElementNS(ns, "title");
    title.textContent = `${time(m.minute)}: ${m.sent} sent`;
    bar.append(title);
    svg.append(bar);
  });
  $("chart-max").textContent = minutes.length ? `peak ${max}/min` : "no data (Redis unreachable?)";
}

function showJob(job) {
  const badge = $("job-state");
  if (!job) {
    badge.textContent = "no scheduler yet";
    badge.className = "pill";
    $("job-start").disabled = false;
    $("job-stop").disabled = true;
    return;
  }
  badge.textContent = job.working ? "Working" : "Stopped";
  badge.className = `pill ${job.working ? "working" : "stopped"}`;
  $("job-changed").textContent = `${dateTime(job.changedAt)} by ${job.changedBy || "?"}`;
  $("job-last-run").textContent = dateTime(job.lastRunAt);
  $("job-start").disabled = job.working;
  $("job-stop").disabled = !job.working;
}

async function requeueFailed() {
  const filter = { status: "failed" };
  const phone = $("search").value.trim();
  if (phone.startsWith("+")) filter.to = phone;
  try {
    const dry = await api("/api/messenger/messages/retry", { method: "POST", body: { filter, dryRun: true } });
    if (!dry.matched) return toast("No failed messages to re-queue");
    const scope = filter.to ? ` to ${filter.to}` : "";
    if (!window.confirm(`Re-queue ${dry.matched.toLocaleString()} failed message(s)${scope}? Up to 1,000 go per click.`)) return;
    const done = await api("/api/messenger/messages/retry", { method: "POST", body: { filter } });
    toast(`Re-queued ${done.requeued.toLocaleString()}${done.remaining ? `; ${done.remaining.toLocaleString()} still failed: click again` : ""}`);
    refreshStats();
    loadMessages();
  } catch (error) {
    handleError(error);
  }
}

async function toggle(command) {
  const button = $(command === "start" ? "job-start" : "job-stop");
  button.disabled = true;
  button.textContent = command === "start" ? "Starting…" : "Stopping…";
  try {
    const job = await api(`/api/messenger/messenger-job-toggle?command=${command}`, { method: "POST" });
    showJob(job);
    toast(job.working ? "Sending started" : "Sending stopped: no run is in flight");
  } catch (error) {
    handleError(error);
  } finally {
    $("job-start").textContent = "Start";
    $("job-stop").textContent = "Stop";
    refreshStats();
    loadRuns();
  }
}

// ---- messages -------------------------------------------------------------------------------

function messageQuery() {
  const params = new URLSearchParams({ limit: String(PAGE) });
  const status = $("status-filter").value;
  if (status) params.set("status", status);
  const search = $("search").value.trim();
  if (search.startsWith("+")) params.set("to", search);
  const after = state.cursors[state.page];
  if (after) params.set("after", after);
  return params;
}

async function loadMessages() {
  let page;
  try {
    page = await api(`/api/messenger/messages?${messageQuery()}`);
  } catch (error) {
    return handleError(error);
  }
  state.nextCursor = page.nextCursor || null;
  const body = $("messages").tBodies[0];
  body.replaceChildren(...page.items.map(messageRow));
  $("messages-empty").hidden = page.items.length > 0;
  $("page-newer").disabled = state.page === 0;
  $("page-older").disabled = !state.nextCursor;
}

function messageRow(m) {
  const retry =
    m.status === "failed"
      ? el("button", { class: "small primary", type: "button", "data-retry": m.id, onclick: (e) => (e.stopPropagation(), retry(m.id)) }, "Retry")
      : null;
  return el(
    "tr",
    { "data-id": m.id, onclick: () => openDetail(m.id) },
    el("td", {}, el("code", { title: m.id }, shortId(m.id))),
    el("td", {}, m.to),
    el("td", { class: "status" }, pill(m.status)),
    el("td", { class: "wide attempts" }, String(m.attempts)),
    el("td", { class: "wide" }, time(m.updatedAt)),
    el("td", {}, retry),
  );
}

function search(event) {
  event.preventDefault();
  const text = $("search").value.trim();
  if (/^[0-9a-fA-F]{24}$/.test(text)) {
    openDetail(text.toLowerCase());
    return;
  }
  if (text && !text.startsWith("+")) {
    toast("Search takes a message id (24 hex characters) or a phone number starting with +", true);
    return;
  }
  state.cursors = [null];
  state.page = 0;
  loadMessages();
}

async function retry(id) {
  try {
    await api(`/api/messenger/messages/${id}/retry`, { method: "POST" });
    toast("Re-queued: it will be sent on the next run");
  } catch (error) {
    handleError(error);
  }
  loadMessages();
  scheduleStats();
  if (state.detailId === id) refreshDetail(id);
}

// Re-reads the message shown in the detail dialog, unless the operator closed it or opened
// another while the read was in flight: a refresh never reopens a dialog.
function refreshDetail(id) {
  return openDetail(id, true);
}

async function openDetail(id, refresh = false) {
  let m;
  try {
    m = await api(`/api/messenger/messages/${id}`);
  } catch (error) {
    return handleError(error);
  }
  // Its status callbacks, when it asked for them (a failed read shows as such, not as none).
  let callbacks = [];
  let callbacksNote = "–";
  if (m.callbackUrl) {
    try {
      callbacks = await api(`/api/messenger/messages/${id}/callbacks`);
      callbacksNote = callbacks.length ? "" : "none yet";
    } catch (error) {
      callbacksNote = `unavailable: ${error.message}`;
    }
  }
  if (refresh && !($("detail").open && state.detailId === id)) return;
  state.detailId = id;
  $("detail-id").textContent = m.id;
  const facts = [
    ["Status", pill(m.status)],
    ["To", m.to],
    ["Content", m.content],
    ["Attempts", String(m.attempts)],
    ["Next attempt", dateTime(m.nextAttemptAt)],
    ["Claimed by", m.claimedBy || "–"],
    ["Provider id", m.webhookMessageId || "–"],
    ["Sent at", dateTime(m.sentAt)],
    ["Delivery", m.delivery ? `${m.delivery.state} (${m.delivery.providerStatus}${m.delivery.errorCode ? `, error ${m.delivery.errorCode}` : ""}) at ${dateTime(m.delivery.at)}` : "–"],
    ["Receipts", m.receipts && m.receipts.length ? m.receipts.map((r) => `${time(r.at)} ${r.state}`).join(" → ") : "–"],
    ["Callback URL", m.callbackUrl || "–"],
    [
      "Callbacks",
      callbacks.length
        ? el(
            "ul",
            { class: "callbacks" },
            ...callbacks.map((c) =>
              el(
                "li",
                { "data-callback": c.id },
                pill(c.status === "delivered" ? "sent" : c.status === "dead" ? "failed" : "pending", c.status),
                ` ${c.event} · ${c.attempts} attempt${c.attempts === 1 ? "" : "s"}`,
                c.status === "delivered" ? ` · ${time(c.deliveredAt)}` : "",
                c.lastError && c.status !== "delivered" ? el("span", { class: "muted" }, ` · ${c.lastError}`) : "",
              ),
            ),
          )
        : callbacksNote,
    ],
    ["Send at", m.sendAt ? dateTime(m.sendAt) : "–"],
    ["Expires at", m.expiresAt ? dateTime(m.expiresAt) : "–"],
    ["Last error", m.lastError ? `${m.lastError.kind}${m.lastError.status ? ` ${m.lastError.status}` : ""}: ${m.lastError.detail}` : "–"],
    ["Created", dateTime(m.createdAt)],
    ["Updated", dateTime(m.updatedAt)],
  ];
  $("detail-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  $("detail-retry").hidden = m.status !== "failed";
  if (!$("detail").open) $("detail").showModal();
}

// ---- runs -----------------------------------------------------------------------------------

async function loadRuns() {
  clearTimeout(state.runsTimer);
  state.runsTimer = setTimeout(loadRuns, 15000);
  let page;
  try {
    page = await api("/api/messenger/job/runs?limit=10");
  } catch (error) {
    if (error instanceof Unauthorized) return signOut();
    $("runs").tBodies[0].replaceChildren();
    $("runs-note").textContent = `Run history unavailable: ${error.message}`;
    $("runs-note").hidden = false;
    return;
  }
  $("runs-note").hidden = page.items.length > 0;
  $("runs-note").textContent = "No runs yet.";
  $("runs").tBodies[0].replaceChildren(
    ...page.items.map((r) =>
      el(
        "tr",
        {},
        el("td", {}, time(r.startedAt)),
        el("td", { class: "wide" }, r.worker),
        el("td", {}, String(r.claimed)),
        el("td", {}, String(r.sent)),
        el("td", { class: "wide" }, String(r.retried)),
        el("td", {}, String(r.failed)),
        el("td", { class: "muted" }, r.error || r.skippedReason || (r.finishedAt ? "" : "running")),
      ),
    ),
  );
}

// ---- audit ----------------------------------------------------------------------------------

function auditRow(a) {
  return el(
    "tr",
    { "data-id": a.id },
    el("td", {}, time(a.at)),
    el("td", {}, a.key),
    el("td", {}, a.action),
    el("td", { class: "wide mono", title: a.target || "" }, a.target || ""),
    el("td", {}, a.count == null ? "" : String(a.count)),
    el("td", {}, el("span", { class: `pill ${a.result === "ok" ? "sent" : "failed"}` }, a.code ? `${a.result} ${a.code}` : a.result)),
    el("td", { class: "wide muted" }, [a.from, a.forwardedFor].filter(Boolean).join(" via ")),
  );
}

async function loadAudit() {
  clearTimeout(state.auditTimer);
  state.auditTimer = setTimeout(loadAudit, 30000);
  let page;
  try {
    page = await api("/api/messenger/audit?limit=10");
  } catch (error) {
    if (error instanceof Unauthorized) return signOut();
    $("audit").tBodies[0].replaceChildren();
    $("audit-note").textContent = `Audit unavailable: ${error.message}`;
    $("audit-note").hidden = false;
    return;
  }
  $("audit-note").hidden = page.items.length > 0;
  $("audit-note").textContent = "No operator action yet.";
  $("audit").tBodies[0].replaceChildren(...page.items.map(auditRow));
}

function showAuditEvent(a) {
  const body = $("audit").tBodies[0];
  if (body.querySelector(`tr[data-id="${a.id}"]`)) return;
  body.prepend(auditRow(a));
  while (body.children.length > 10) body.lastChild.remove();
  $("audit-note").hidden = true;
}

// ---- live feed ------------------------------------------------------------------------------

function setLive(text, cls) {
  const badge = $("live");
  badge.textContent = text;
  badge.className = `badge ${cls}`;
}

function connect() {
  if (!state.key) return;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/api/messenger/ws`);
  state.socket = socket;
  setLive("connecting", "badge-wait");
  socket.addEventListener("open", () => {
    const hello = { auth: state.key };
    if (state.lastEventId) hello.lastEventId = state.lastEventId;
    socket.send(JSON.stringify(hello));
  });
  socket.addEventListener("message", (message) => onFrame(JSON.parse(message.data)));
  socket.addEventListener("close", (event) => {
    if (state.socket !== socket) return;
    state.socket = null;
    if (event.code === 1008 && event.reason.includes("auth")) return signOut();
    setLive("reconnecting", "badge-wait");
    setTimeout(connect, state.retryDelay);
    state.retryDelay = Math.min(state.retryDelay * 2, 10000);
  });
}

function onFrame(event) {
  switch (event.type) {
    case "ready":
      state.retryDelay = 500;
      setLive("live", "badge-on");
      return;
    case "reset":
      state.lastEventId = null;
      refreshStats();
      loadMessages();
      return;
    case "dropped":
      return; // the socket closes next; we reconnect from lastEventId
    case "subscribed":
    case "error":
      return;
  }
  if (event.id) state.lastEventId = event.id;
  addToFeed(event);
  scheduleStats();
  if (event.message) updateRow(event.message);
  if (event.job) showJobEvent(event.job);
  if (event.provider) showProviderEvent(event.type, event.provider);
  if (event.audit) showAuditEvent(event.audit);
}

function addToFeed(event) {
  const feed = $("feed");
  const m = event.message;
  const p = event.provider;
  const what = m
    ? `${shortId(m.id)} ${m.to}`
    : event.job
      ? event.job.changedBy
        ? `by ${event.job.changedBy}`
        : ""
      : p
        ? `${p.name}${p.reason ? `: ${p.reason}` : ""}`
        : event.audit
          ? `${event.audit.key}: ${event.audit.action} ${event.audit.result}`
          : "";
  const kind = event.type.replace(/^message\./, "");
  const status = m
    ? m.status
    : event.job
      ? event.job.working
        ? "sent"
        : "failed"
      : p
        ? p.pausedUntil
          ? "paused"
          : "open"
        : event.audit
          ? event.audit.result === "ok"
            ? "sent"
            : "failed"
          : "";
  const item = el(
    "li",
    { class: "new", "data-type": event.type, "data-id": m ? m.id : "" },
    el("span", { class: "time" }, time(event.at)),
    el("span", { class: `pill ${status}` }, kind),
    el("span", { class: "what", title: m ? m.id : "" }, what),
  );
  if (m) item.addEventListener("click", () => openDetail(m.id));
  feed.prepend(item);
  while (feed.children.length > FEED_MAX) feed.lastChild.remove();
}

function updateRow(m) {
  const row = $("messages").querySelector(`tr[data-id="${m.id}"]`);
  if (row) {
    row.replaceWith(messageRow({ ...m, updatedAt: new Date().toISOString() }));
    const fresh = $("messages").querySelector(`tr[data-id="${m.id}"]`);
    if (fresh) fresh.classList.add("flash");
  } else if (state.page === 0 && !$("status-filter").value && !$("search").value.trim()) {
    clearTimeout(updateRow.timer);
    updateRow.timer = setTimeout(loadMessages, 500);
  }
  if (state.detailId === m.id && $("detail").open) refreshDetail(m.id);
}

function showJobEvent(job) {
  const badge = $("job-state");
  badge.textContent = job.working ? "Working" : "Stopped";
  badge.className = `pill ${job.working ? "working" : "stopped"}`;
  $("job-start").disabled = job.working;
  $("job-stop").disabled = !job.working;
}

// ---- wiring ---------------------------------------------------------------------------------

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  signIn($("key").value.trim());
});
$("signout").addEventListener("click", signOut);
$("job-start").addEventListener("click", () => toggle("start"));
$("job-stop").addEventListener("click", () => toggle("stop"));
$("search-form").addEventListener("submit", search);
$("requeue-failed").addEventListener("click", requeueFailed);
$("status-filter").addEventListener("change", () => {
  state.cursors = [null];
  state.page = 0;
  loadMessages();
});
$("page-older").addEventListener("click", () => {
  if (!state.nextCursor) return;
  state.cursors[state.page + 1] = state.nextCursor;
  state.page += 1;
  loadMessages();
});
$("page-newer").addEventListener("click", () => {
  if (state.page === 0) return;
  state.page -= 1;
  loadMessages();
});
$("detail-retry").addEventListener("click", () => state.detailId && retry(state.detailId));
$("detail").addEventListener("close", () => (state.detailId = null));

if (state.key) signIn(state.key);
else showLogin();
