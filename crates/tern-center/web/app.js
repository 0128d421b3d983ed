// tern web client (app.js): signs in with an API token, shows a tern center's inventory
// (clusters, hosts, VMs), tasks and events from its REST API (/api/v1), and follows its live
// stream (/api/v1/stream) so the page changes as the center does. The tasks panel filters by
// state and text, the events panel by text.
//
// Pages (the URL's hash): the overview (#/: the center's counts and a first page of hosts), a
// cluster (#/cluster/NAME: EVC, DRS settings, recommendations and the last hour of imbalance,
// "apply all", a new VM), a host (#/host/NAME: health, facts, VMs, the last hour of load,
// entering maintenance after its evacuation plan) and a VM (#/vm/NAME: start, stop, migrate
// with the pre-copy drawn live, its last migration, console). Operators and admins see the
// buttons that change things; viewers do not. In an HA group of centers the header tells this
// center's role (leader or standby, GET /control-plane, read again every 10 s and after any
// 503), and a standby shows a banner pointing to the leader: it takes no changes.
//
// Made for centers of a thousand hosts and tens of thousands of VMs: nothing is ever listed
// whole. Every /hosts and /vms request asks for a page (limit, after); the counts come from
// /summary; the tree holds each cluster's hosts a page at a time and draws their VMs from the
// names each host carries; each page reads what it shows. The stream only tells that something
// changed: what is on screen is read again, debounced, one read of each thing at a time.
//
// Charts are drawn by charts.js (window.TernCharts) when it is there; without it the page works
// all the same, without charts.
//
// Vanilla ES2020, no build step, no framework. The page's Content-Security-Policy forbids
// inline code and styles, and every piece of data (names, messages, console text) is
// untrusted: it reaches the page only through textContent and attributes, never as markup.
'use strict';

// ---- constants and state ----

const API = '/api/v1';
const TOKEN_KEY = 'tern-token';
const DONE_STATES = new Set(['succeeded', 'completed', 'failed', 'cancelled']);
const MAX_EVENTS = 200;
const MAX_TASKS_SHOWN = 50;
const MAX_TASKS_KEPT = 300;
const CONSOLE_BYTES = 8192;
const CONSOLE_PERIOD_MS = 3000;
const CONSOLE_STATES = new Set(['running', 'paused', 'crashed']); // its host has its log
const REFRESH_DEBOUNCE_MS = 300;
const FIRST_LOAD_WAIT_MS = 1000; // at sign-in, the stream's hello starts the reads (or this)
const STREAM_IDLE_MS = 45000; // the center sends a keep-alive every 15 s
const STREAM_BACKOFF_MIN_MS = 500;
const STREAM_BACKOFF_MAX_MS = 8000;
const MIGRATE_POLL_MS = 1500;
const TASK_POLL_MS = 1500;
const RECS_DEBOUNCE_MS = 1000;
const HOST_PAGE = 100; // hosts per request (tree, cluster page, migrate dialog)
const VM_PAGE = 500; // a host's VMs per request
const LOOSE_PAGE = 100; // VMs without a host shown per cluster
const OVERVIEW_HOSTS = 50;
const SEARCH_LIMIT = 50; // per kind (hosts, VMs)
const SEARCH_DEBOUNCE_MS = 250;
const SMALL_CLUSTER = 20; // a cluster showing at most this many hosts shows their VMs at once
const VM_CACHE_MAX = 5000;
const CHECKS_IN_FLIGHT = 8; // migration dry runs asked at once
const TIMELINE_POLL_MS = 1000;
const HISTORY_PERIOD_MS = 10000; // the charts of the last hour (host load, DRS imbalance)
const VM_TASKS = 20; // a VM's newest tasks, read for its last migration
const CONTROL_PLANE_PERIOD_MS = 10000; // the HA group's leader, read again while signed in

const state = {
  session: 0, // bumped at each sign-in and sign-out: late answers of an old session are dropped
  token: null,
  me: null, // {name, role}
  routed: false, // the page of the URL was opened in this session (after the first reads)
  firstLoad: null, // reads everything if the stream has not said hello by then
  reads: new Map(), // what is being read now: one read of each thing at a time (readOnce)
  summary: null, // GET /summary: the inventory's counts
  summaryError: null,
  clusters: null, // GET /clusters (a short list); null until read
  tree: new Map(), // cluster name → its group in the tree: pages of hosts, loose VMs (newGroup)
  expanded: new Map(), // host name → shown open (true) or closed by the user
  vmsRead: new Set(), // hosts whose VMs were read for the tree since sign-in
  vmCache: new Map(), // VM name → its newest copy read (state dots, links with state)
  treeFocus: null, // what gets the focus once the tree is drawn again (a CSS selector)
  search: null, // the search shown instead of the tree: {q, loading, hosts, vms, error}
  searchTimer: null,
  overview: null, // the overview's first page of hosts: {hosts, error}
  vmPage: null, // the open VM page (openVmPage)
  hostPage: null, // the open host page (openHostPage)
  tasks: new Map(), // id → Task
  events: [], // newest first
  live: false,
  hellos: 0,
  streamAbort: null,
  refreshTimer: null,
  console: null, // {vm, timer, busy}
  vmBusy: null, // name of the VM an action is being sent for
  migrate: null, // the migrate dialog (openMigrate)
  noticeTimer: null,
  cluster: null, // the open cluster page: {name, info, drs, recs, pages, …} (see openCluster)
  recsTimer: null,
  maint: null, // the maintenance plan being shown: {host, loading, plan, fallback, …}
  maintBusy: null, // name of the host a maintenance request is being sent for
  maintTasks: new Map(), // host → id of the maintenance task started from this page
  applyTasks: new Map(), // cluster → id of the DRS apply task started from this page
  taskPoll: null, // asks for those tasks while the stream is down
  create: null, // the new-VM dialog: {cluster, busy, bootTouched, session}
  controlPlane: null, // GET /control-plane: {ha, center, leader, term, takes_changes}; null until read
  controlPlaneError: null,
  controlPlaneTimer: null, // reads it again every CONTROL_PLANE_PERIOD_MS while signed in
};

// ---- small helpers ----

function $(id) {
  return document.getElementById(id);
}

/** Builds an element: attrs may hold class, text, dataset, on<event> handlers, attributes. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = String(v);
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else if (v === true) node.setAttribute(k, '');
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

const enc = encodeURIComponent;

function dash(v) {
  return v === undefined || v === null || v === '' ? '–' : String(v);
}

function yesNo(b) {
  return b ? 'yes' : 'no';
}

function fmtMiB(mib) {
  if (typeof mib !== 'number' || !isFinite(mib)) return '–';
  if (mib >= 1024 * 1024) return (mib / (1024 * 1024)).toFixed(1) + ' TiB';
  if (mib >= 1024) return (mib / 1024).toFixed(1) + ' GiB';
  return mib + ' MiB';
}

function fmtMs(ms) {
  if (typeof ms !== 'number') return '–';
  return ms >= 10000 ? (ms / 1000).toFixed(1) + ' s (' + ms + ' ms)' : ms + ' ms';
}

function fmtTime(iso) {
  const d = new Date(iso);
  if (!iso || isNaN(d)) return '–';
  const t = d.toLocaleTimeString([], {
    hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false,
  });
  if (d.toDateString() === new Date().toDateString()) return t;
  return d.toLocaleDateString([], { month: 'short', day: 'numeric' }) + ' ' + t;
}

function fmtAgo(iso) {
  const d = new Date(iso);
  if (!iso || isNaN(d)) return '–';
  const s = Math.max(0, Math.round((Date.now() - d.getTime()) / 1000));
  if (s < 90) return s + ' s ago';
  if (s < 90 * 60) return Math.round(s / 60) + ' min ago';
  if (s < 36 * 3600) return Math.round(s / 3600) + ' h ago';
  return fmtTime(iso);
}

function byName(a, b) {
  return a.localeCompare(b, undefined, { numeric: true });
}

function vmName(vm) {
  return (vm.spec && vm.spec.name) || vm.name || '';
}

function vmHref(name) {
  return '#/vm/' + enc(name);
}

function hostHref(name) {
  return '#/host/' + enc(name);
}

function clusterHref(name) {
  return '#/cluster/' + enc(name);
}

function vmLink(name) {
  return el('a', { href: vmHref(name), text: name });
}

function hostLink(name) {
  return name ? el('a', { href: hostHref(name), text: name }) : el('span', { class: 'muted', text: '(no host)' });
}

function fmtBytes(n) {
  if (typeof n !== 'number' || !isFinite(n)) return '–';
  return n >= 1024 * 1024 ? fmtMiB(Math.round(n / (1024 * 1024))) : n + ' B';
}

function fmtImbalance(x) {
  return typeof x === 'number' && isFinite(x) ? x.toFixed(3) : '–';
}

function canAct() {
  return !!state.me && (state.me.role === 'operator' || state.me.role === 'admin');
}

function isDone(task) {
  return DONE_STATES.has(task.state);
}

function isDegraded(host) {
  const h = host.health || {};
  return (h.degraded && h.degraded.length > 0) || (host.problems && host.problems.length > 0);
}

function findVm(name) {
  return state.vmCache.get(name) || null;
}

/** Keeps the newest copy of each VM read; past VM_CACHE_MAX the least recently read go. */
function cacheVms(list) {
  for (const vm of list || []) {
    const name = vm && vmName(vm);
    if (!name) continue;
    state.vmCache.delete(name);
    state.vmCache.set(name, vm);
  }
  while (state.vmCache.size > VM_CACHE_MAX) state.vmCache.delete(state.vmCache.keys().next().value);
}

/** A VM's state as last read, or null when it was not read (drawn neutral). */
function vmStateOf(name) {
  const vm = findVm(name);
  return vm && vm.actual_state ? String(vm.actual_state) : null;
}

function findCluster(name) {
  return (state.clusters || []).find((c) => c.name === name) || null;
}

/** A cluster's counts from the summary, or null. */
function clusterCounts(name) {
  const list = state.summary && Array.isArray(state.summary.clusters) ? state.summary.clusters : [];
  return list.find((c) => c.name === name) || null;
}

/**
 * A listing's path: /hosts or /vms with its query. Every listing asks for a page (limit); a
 * parameter that is undefined, null or false is left out (an empty cluster name is not).
 */
function listPath(what, params) {
  const qs = Object.entries(params)
    .filter(([, v]) => v !== undefined && v !== null && v !== false)
    .map(([k, v]) => `${k}=${enc(v)}`);
  return `/${what}?${qs.join('&')}`;
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many || one + 's'}`;
}

/** HH:MM of a time in ms (the charts of the last hour). */
function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', hour12: false });
}

/** Runs fn once soon, however many times it is asked before then. */
const scheduled = new Set();
function schedule(fn) {
  if (scheduled.has(fn)) return;
  scheduled.add(fn);
  setTimeout(() => {
    scheduled.delete(fn);
    fn();
  }, 0);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A short message in the header (errors of background work, results of actions). */
function notice(text, isError = true) {
  const n = $('notice');
  clearTimeout(state.noticeTimer);
  n.textContent = text;
  n.classList.toggle('notice-error', isError);
  n.hidden = !text;
  if (text) state.noticeTimer = setTimeout(() => (n.hidden = true), 8000);
}

// ---- the REST API ----

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorText(res) {
  let body = '';
  try {
    body = await res.text();
  } catch (_) {
    /* the body could not be read: the status says enough */
  }
  try {
    const j = JSON.parse(body);
    if (j && typeof j.error === 'string' && j.error) return j.error;
  } catch (_) {
    /* not JSON */
  }
  body = body.trim();
  return body ? body.slice(0, 500) : `${res.status} ${res.statusText || 'error'}`;
}

/**
 * Calls the API. opts: method, body (sent as JSON), text (answer as text), token (a token to
 * try instead of the session's: sign-in; its 401 does not sign out). Throws ApiError with the
 * center's error text; a 401 with the session's token returns to the sign-in view.
 */
async function api(path, opts = {}) {
  const token = opts.token || state.token;
  const headers = { Authorization: 'Bearer ' + token };
  const init = { method: opts.method || 'GET', headers, cache: 'no-store' };
  if (opts.body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(opts.body);
  }
  let res;
  try {
    res = await fetch(API + path, init);
  } catch (e) {
    throw new ApiError(0, 'cannot reach the center (' + e.message + ')');
  }
  if (!res.ok) {
    const msg = await errorText(res);
    if (res.status === 401 && !opts.token && token === state.token && state.me) signOut(msg);
    // A standby refuses changes (503): this center's role changed, or it never led. The
    // control plane is read again to tell; the caller still gets the error.
    if (res.status === 503 && !opts.token && token === state.token && state.me && path !== '/control-plane') {
      readControlPlaneSoon();
    }
    throw new ApiError(res.status, msg);
  }
  const text = await res.text();
  if (opts.text) return text;
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch (_) {
    throw new ApiError(res.status, 'the center answered something that is not JSON');
  }
}

// ---- sign-in and sign-out ----

async function signIn(token, remembered) {
  const button = $('login');
  $('login-error').textContent = '';
  button.disabled = true;
  try {
    const me = await api('/whoami', { token });
    sessionStorage.setItem(TOKEN_KEY, token);
    startSession(token, me);
  } catch (e) {
    if (remembered && e.status === 401) sessionStorage.removeItem(TOKEN_KEY);
    showLogin(e.message);
  } finally {
    button.disabled = false;
  }
}

function showLogin(message) {
  $('app-view').hidden = true;
  $('login-view').hidden = false;
  $('login-error').textContent = message || '';
  $('token').focus();
}

function startSession(token, me) {
  state.session += 1;
  state.token = token;
  state.me = me;
  state.hellos = 0;
  state.routed = false;
  $('token').value = '';
  $('login-view').hidden = true;
  $('app-view').hidden = false;
  renderWhoami();
  renderControlPlane();
  setLive(false, 'connecting…');
  renderTree();
  // The reads start when the stream is open (its hello): then no change can fall between
  // what was read and what the stream tells. A stream slow to open does not hold them up.
  clearTimeout(state.firstLoad);
  state.firstLoad = setTimeout(loadAll, FIRST_LOAD_WAIT_MS);
  clearInterval(state.controlPlaneTimer);
  state.controlPlaneTimer = setInterval(readControlPlaneSoon, CONTROL_PLANE_PERIOD_MS);
  runStream(state.session);
}

function signOut(message) {
  state.session += 1;
  if (state.streamAbort) state.streamAbort.abort();
  state.streamAbort = null;
  clearTimeout(state.refreshTimer);
  clearTimeout(state.firstLoad);
  clearTimeout(state.searchTimer);
  stopConsole();
  closeMigrate();
  closeCreate();
  closePages();
  clearTimeout(state.recsTimer);
  clearInterval(state.taskPoll);
  clearInterval(state.controlPlaneTimer);
  sessionStorage.removeItem(TOKEN_KEY);
  Object.assign(state, {
    token: null, me: null, routed: false, firstLoad: null, summary: null, summaryError: null,
    clusters: null, search: null, treeFocus: null, events: [], live: false, vmBusy: null,
    maint: null, maintBusy: null, taskPoll: null, controlPlane: null, controlPlaneError: null,
    controlPlaneTimer: null,
  });
  state.reads = new Map();
  state.tree = new Map();
  state.expanded = new Map();
  state.vmsRead = new Set();
  state.vmCache = new Map();
  state.tasks = new Map();
  state.maintTasks = new Map();
  state.applyTasks = new Map();
  $('search').value = '';
  $('tree').replaceChildren();
  delete $('tree').dataset.key;
  $('main').replaceChildren();
  delete $('main').dataset.key;
  $('task-list').replaceChildren();
  $('event-list').replaceChildren();
  renderControlPlane();
  notice('');
  showLogin(message);
}

function renderWhoami() {
  const me = state.me;
  $('whoami').textContent = me ? `${me.name} (${me.role})` : '';
  document.body.dataset.role = me ? me.role : '';
}

// ---- the control plane: this center in its HA group (the header, the standby banner) ----

/**
 * The control plane as last read, its fields checked: whatever is missing reads as a single
 * center, which always takes changes. role: single, leader or standby.
 */
function controlPlaneView() {
  const cp = state.controlPlane || {};
  const ha = cp.ha === true;
  const l = cp.leader;
  const leader = ha && l && typeof l.name === 'string' && l.name
    ? { name: l.name, url: typeof l.url === 'string' ? l.url : '' }
    : null;
  return {
    read: state.controlPlane !== null,
    ha,
    center: typeof cp.center === 'string' && cp.center ? cp.center : null,
    leader,
    term: typeof cp.term === 'number' && isFinite(cp.term) ? cp.term : null,
    role: !ha ? 'single' : cp.takes_changes === false ? 'standby' : 'leader',
  };
}

/** The leader's web client, or null unless its URL is http(s) (it is shown as text then). */
function leaderUiHref(url) {
  if (typeof url !== 'string' || !(url.startsWith('https://') || url.startsWith('http://'))) return null;
  return url.replace(/\/+$/, '') + '/ui/';
}

/** The header's indicator and the standby banner; hidden for a single center. */
function renderControlPlane() {
  const v = controlPlaneView();
  const b = $('control-plane');
  let text = '';
  if (v.role === 'leader') {
    text = `leader ${v.center || '—'} · term ${v.term === null ? '—' : v.term}`;
  } else if (v.role === 'standby') {
    text = `standby ${v.center || '—'}` +
      (v.leader ? ` — changes go to ${v.leader.name}` : ' — no leader (election under way)');
  }
  // Only a change is written: the indicator is a live region.
  if (b.textContent !== text) b.textContent = text;
  b.hidden = !v.ha;
  if (v.ha) b.dataset.role = v.role;
  else delete b.dataset.role;
  if (v.leader && v.leader.url) b.title = v.leader.url;
  else b.removeAttribute('title');
  document.body.dataset.standby = String(v.role === 'standby');
  renderStandbyBanner(v);
}

function renderStandbyBanner(v) {
  const banner = $('standby-banner');
  const standby = v.role === 'standby';
  const href = standby && v.leader ? leaderUiHref(v.leader.url) : null;
  const key = standby ? JSON.stringify([v.leader && v.leader.name, href]) : '';
  banner.hidden = !standby;
  if (banner.dataset.key === key) return; // an alert: written again only when it changes
  banner.dataset.key = key;
  if (!standby) {
    banner.replaceChildren();
    return;
  }
  const parts = ['This center is a standby: it shows the inventory but takes no changes.'];
  if (v.leader) {
    parts.push(' Make changes at ',
      href ? el('a', { id: 'standby-leader-link', href, text: v.leader.name }) : v.leader.name);
  }
  banner.replaceChildren(...parts);
}

// ---- loading: what is on screen, and only that ----

/**
 * Runs read() unless the same read (key) is under way; then it runs once more when that one
 * ends (it may have begun before the change that asks for it), with the newest read() given.
 * So each thing shown has at most one request in flight, and the last starts after the last
 * change. Returns a promise that settles once the reads asked for so far are done.
 */
function readOnce(key, read) {
  const k = state.session + '\n' + key;
  const cur = state.reads.get(k);
  if (cur) {
    cur.next = read;
    return cur.done;
  }
  const session = state.session;
  const entry = { next: null, done: null };
  state.reads.set(k, entry);
  entry.done = (async () => {
    try {
      await read();
    } catch (e) {
      if (session === state.session) notice(e.message);
    } finally {
      if (state.reads.get(k) === entry) state.reads.delete(k);
    }
    if (entry.next && session === state.session) await readOnce(key, entry.next);
  })();
  return entry.done;
}

/**
 * Everything the page shows, read again: once the stream is open (at sign-in, after
 * reconnecting) and on `resync`.
 */
function loadAll() {
  clearTimeout(state.firstLoad);
  state.firstLoad = null;
  if (!state.me) return;
  readOnce('clusters', readClusters);
  refreshVisible(true);
  if (!state.routed) onRoute(); // opens the URL's page, which reads what it shows
  loadTasks().catch((e) => notice(e.message));
  loadEvents().catch((e) => notice(e.message));
}

/** Reads what is on screen shortly: many stream messages in a burst make one read. */
function refreshSoon() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(() => refreshVisible(false), REFRESH_DEBOUNCE_MS);
}

/**
 * Reads again what is on screen: the counts, each page of hosts the tree holds (with its own
 * `after`), its VMs without a host, the VMs of the hosts it shows open in small clusters, the
 * search shown, and the open page's objects. `all` adds what changes without telling the
 * stream (the charts' history, a cluster's settings): at sign-in and after the stream was down.
 */
function refreshVisible(all) {
  if (!state.me) return;
  readOnce('summary', readSummary);
  readControlPlaneSoon();
  const hp = state.hostPage; // its VMs are read by its page, for the tree too
  for (const g of state.tree.values()) {
    g.pages.forEach((_, i) => readTreePage(g, i));
    readLoose(g);
    for (const h of openHostsWithVms(g)) if (!(hp && hp.name === h)) readHostVms(h);
  }
  if (state.search) readSearch(state.search);
  refreshPage(all);
}

async function readSummary() {
  const session = state.session;
  let summary;
  try {
    summary = await api('/summary');
  } catch (e) {
    if (session !== state.session) return;
    state.summaryError = e.message;
    schedule(renderMain);
    throw e;
  }
  if (session !== state.session) return;
  state.summary = summary || {};
  state.summaryError = null;
  syncGroups();
  schedule(renderTree);
  schedule(renderMain);
}

/** Reads the control plane (the HA group's leader) unless a read of it is under way. */
function readControlPlaneSoon() {
  if (!state.me) return;
  readOnce('control-plane', readControlPlane);
}

/**
 * GET /control-plane. A failed read keeps what was last read (shown with the error on the
 * overview); it is tried again at the next tick, so it raises no notice.
 */
async function readControlPlane() {
  const session = state.session;
  let cp;
  try {
    cp = await api('/control-plane');
  } catch (e) {
    if (session !== state.session) return;
    state.controlPlaneError = e.message;
    schedule(renderMain);
    return;
  }
  if (session !== state.session) return;
  state.controlPlane = cp || {};
  state.controlPlaneError = null;
  schedule(renderControlPlane);
  schedule(renderMain);
}

async function readClusters() {
  const session = state.session;
  const clusters = await api('/clusters');
  if (session !== state.session) return;
  state.clusters = clusters || [];
  syncGroups();
  schedule(renderTree);
  schedule(renderMain);
}

async function loadTasks() {
  const session = state.session;
  const tasks = await api('/tasks?limit=' + MAX_TASKS_SHOWN);
  if (session !== state.session) return;
  for (const t of tasks || []) upsertTask(t);
}

async function loadEvents() {
  const session = state.session;
  const events = await api('/events?limit=100');
  if (session !== state.session) return;
  addEvents(events || []);
}

// ---- tasks ----

/** Records a task; an older copy (from a list read) never undoes a task's end. */
function upsertTask(t) {
  if (!t || !t.id) return null;
  const prev = state.tasks.get(t.id);
  if (prev && isDone(prev) && !isDone(t)) return prev;
  state.tasks.set(t.id, t);
  if (state.tasks.size > MAX_TASKS_KEPT) {
    const old = [...state.tasks.values()].sort(byCreatedDesc).slice(MAX_TASKS_KEPT);
    for (const o of old) state.tasks.delete(o.id);
  }
  schedule(renderTasks);
  if (state.migrate && state.migrate.taskId === t.id) renderMigrateTask(t);
  if (isFollowed(t.id)) schedule(renderFollowed);
  return prev || null;
}

/** A `task` message of the stream. */
function onTaskMessage(t) {
  if (!t || !t.id) return;
  const prev = state.tasks.get(t.id);
  upsertTask(t);
  // A task that begins or ends may have changed the inventory; its progress alone has not.
  if (!prev || prev.state !== t.state) refreshSoon();
  if (isDone(t) && (!prev || !isDone(prev))) {
    recsSoon();
    const p = state.vmPage;
    if (t.kind === 'vm_migrate' && p && p.name === t.vm) readLastMigration(p);
  }
}

// Tasks started from the host and cluster pages (maintenance, DRS apply): their pages show
// them live; while the stream is down they are asked for.

function isFollowed(id) {
  for (const m of [state.maintTasks, state.applyTasks]) {
    for (const v of m.values()) if (v === id) return true;
  }
  return false;
}

function followTask(map, key, t) {
  map.set(key, t.id);
  upsertTask(t);
  schedule(renderFollowed);
  if (!state.taskPoll) state.taskPoll = setInterval(pollFollowed, TASK_POLL_MS);
}

async function pollFollowed() {
  const ids = [...state.maintTasks.values(), ...state.applyTasks.values()]
    .filter((id) => !(state.tasks.get(id) && isDone(state.tasks.get(id))));
  if (!ids.length) {
    clearInterval(state.taskPoll);
    state.taskPoll = null;
    return;
  }
  if (state.live) return; // the stream tells
  const session = state.session;
  for (const id of ids) {
    try {
      const t = await api(`/tasks/${enc(id)}`);
      if (session === state.session) onTaskMessage(t);
    } catch (_) {
      /* tried again at the next tick */
    }
  }
}

/** Shows the followed tasks on whichever page is open. */
function renderFollowed() {
  const r = currentRoute();
  if (r.view === 'host') renderMaintStatus(r.name);
  if (r.view === 'cluster') renderApplyStatus(r.name);
}

function byCreatedDesc(a, b) {
  const d = (Date.parse(b.created_at) || 0) - (Date.parse(a.created_at) || 0);
  return d !== 0 ? d : String(b.id).localeCompare(String(a.id));
}

const TASK_KINDS = {
  vm_start: 'start',
  vm_stop: 'stop',
  vm_migrate: 'migrate',
  host_maintenance_enter: 'enter maintenance',
  host_maintenance_exit: 'exit maintenance',
  drs_apply: 'DRS apply',
  host_evacuate: 'evacuate',
};

function taskKindText(kind) {
  return TASK_KINDS[kind] || String(kind || 'task').replace(/_/g, ' ');
}

// The panel's filters (#tasks-state, #tasks-filter) apply to the tasks this page holds (up to
// MAX_TASKS_KEPT): the newest few read at each (re)connect and those the stream told of since.
const TASK_STATE_FILTERS = {
  active: new Set(['queued', 'running']),
  failed: new Set(['failed', 'cancelled']),
  succeeded: new Set(['succeeded', 'completed']),
};

/** Whether a task passes the state filter (a TASK_STATE_FILTERS key, or all) and the text q. */
function taskMatches(t, which, q) {
  const states = TASK_STATE_FILTERS[which];
  if (states && !states.has(t.state)) return false;
  if (!q) return true;
  return [taskKindText(t.kind), t.vm, t.host, t.phase, t.error]
    .map((s) => String(s || ''))
    .join(' ')
    .toLowerCase()
    .includes(q);
}

function renderTasks() {
  const list = $('task-list');
  const which = $('tasks-state').value;
  const q = $('tasks-filter').value.trim().toLowerCase();
  const tasks = [...state.tasks.values()]
    .filter((t) => taskMatches(t, which, q))
    .sort(byCreatedDesc)
    .slice(0, MAX_TASKS_SHOWN);
  // A filter that leaves nothing says so; without one an empty list shows its data-empty text.
  const none = tasks.length === 0 && (Boolean(TASK_STATE_FILTERS[which]) || q !== '');
  list.hidden = none;
  $('tasks-none').hidden = !none;
  const existing = new Map();
  for (const li of list.children) existing.set(li.dataset.id, li);
  const act = canAct();
  let prev = null;
  for (const t of tasks) {
    // Only a task that changed is built again (a cancel button keeps its focus otherwise).
    const sig = JSON.stringify(t) + act;
    let li = existing.get(t.id);
    existing.delete(t.id);
    if (!li || li.dataset.sig !== sig) {
      const fresh = taskItem(t, act);
      fresh.dataset.sig = sig;
      if (li) li.replaceWith(fresh);
      li = fresh;
    }
    const want = prev ? prev.nextSibling : list.firstChild;
    if (want !== li) list.insertBefore(li, want);
    prev = li;
  }
  for (const li of existing.values()) li.remove();
}

function taskItem(t, act) {
  const target = [];
  if (t.vm) target.push(el('a', { href: vmHref(t.vm), text: t.vm }));
  if (t.vm && t.host) target.push(' · ');
  if (t.host) target.push(el('a', { href: hostHref(t.host), text: t.host }));
  const progress = el('progress', {
    max: 100, 'aria-label': `${taskKindText(t.kind)} progress`,
  });
  progress.value = Number(t.progress) || 0;
  let phase = t.phase || '';
  const r = t.result;
  if (r && typeof r === 'object' && typeof r.total_ms === 'number') {
    phase += ` · total ${r.total_ms} ms`;
    if (typeof r.pause_ms === 'number') phase += `, pause ${r.pause_ms} ms`;
  }
  let cancel = null;
  if (act && (t.state === 'queued' || t.state === 'running')) {
    cancel = el('button', {
      type: 'button',
      class: 'task-cancel small',
      'aria-label': `Cancel ${taskKindText(t.kind)} ${t.vm || t.host || ''}`.trim(),
      text: 'Cancel',
      onclick: (ev) => cancelTask(t.id, ev.currentTarget),
    });
  }
  return el('li', { class: `task state-${t.state}`, dataset: { id: t.id } },
    el('div', { class: 'task-line' },
      el('span', { class: 'task-kind', text: taskKindText(t.kind) }),
      el('span', { class: 'task-target' }, target),
      el('span', { class: `badge state-${t.state}`, text: t.state }),
      el('time', { class: 'task-time muted', datetime: t.created_at, text: fmtTime(t.created_at) })),
    el('div', { class: 'task-line' },
      progress,
      el('span', { class: 'task-phase', text: phase, title: phase }),
      cancel),
    t.error ? el('div', { class: 'task-error error', text: t.error }) : null);
}

async function cancelTask(id, button) {
  if (button) button.disabled = true;
  try {
    upsertTask(await api(`/tasks/${enc(id)}/cancel`, { method: 'POST' }));
  } catch (e) {
    notice(e.message);
    if (button) button.disabled = false;
  }
}

// ---- events ----

function addEvents(list) {
  const seen = new Set(state.events.map((e) => e.id));
  let added = false;
  for (const e of list) {
    if (!e || seen.has(e.id)) continue;
    seen.add(e.id);
    state.events.push(e);
    added = true;
  }
  if (!added) return;
  state.events.sort((a, b) => b.id - a.id);
  if (state.events.length > MAX_EVENTS) state.events.length = MAX_EVENTS;
  schedule(renderEvents);
}

function eventMatches(e, q) {
  if (!q) return true;
  return `${e.message || ''} ${e.actor || ''}`.toLowerCase().includes(q);
}

function renderEvents() {
  const q = $('events-filter').value.trim().toLowerCase();
  const items = state.events.filter((e) => eventMatches(e, q)).map(eventItem);
  $('event-list').replaceChildren(...items);
}

function eventItem(e) {
  const level = ['info', 'warning', 'error'].includes(e.level) ? e.level : 'info';
  const subject = [];
  if (e.vm) subject.push(el('a', { href: vmHref(e.vm), text: e.vm }));
  if (e.host) subject.push(el('a', { href: hostHref(e.host), text: e.host }));
  return el('li', { class: `event level-${level}`, dataset: { id: e.id } },
    el('time', { class: 'event-time muted', datetime: e.time, title: e.time, text: fmtTime(e.time) }),
    el('span', { class: 'event-level', text: level }),
    el('span', { class: 'event-message', text: e.message || '' }),
    subject.length ? el('span', { class: 'event-subject' }, subject) : null,
    e.actor ? el('span', { class: 'event-actor muted', text: 'by ' + e.actor }) : null);
}

// ---- the live stream ----

function setLive(on, text) {
  state.live = on;
  const b = $('live');
  b.textContent = text || (on ? 'live' : 'reconnecting…');
  b.classList.toggle('live-on', on);
  b.classList.toggle('live-off', !on);
}

/** Keeps a stream open for as long as the session lasts, reconnecting with a backoff. */
async function runStream(session) {
  let backoff = STREAM_BACKOFF_MIN_MS;
  while (session === state.session) {
    const ctrl = new AbortController();
    state.streamAbort = ctrl;
    let heard = false;
    try {
      const res = await fetch(API + '/stream', {
        headers: { Authorization: 'Bearer ' + state.token, Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: ctrl.signal,
      });
      if (res.status === 401) {
        if (session === state.session) signOut(await errorText(res));
        return;
      }
      if (!res.ok || !res.body) throw new Error(await errorText(res));
      await readSse(res.body, ctrl, (msg) => {
        if (session !== state.session) return;
        if (msg.event === 'hello') {
          heard = true;
          backoff = STREAM_BACKOFF_MIN_MS;
        }
        onStreamMessage(msg);
      });
    } catch (_) {
      /* closed, refused or aborted: reconnect below unless the session is over */
    }
    if (session !== state.session) return;
    setLive(false);
    if (!heard) backoff = Math.min(backoff * 2, STREAM_BACKOFF_MAX_MS);
    await sleep(backoff);
  }
}

/**
 * Reads a text/event-stream body, calling onMessage({event, data}) per message. Aborts the
 * request when nothing (not even a keep-alive) arrived for STREAM_IDLE_MS.
 */
async function readSse(body, ctrl, onMessage) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let event = '';
  let data = [];
  let last = Date.now();
  const watchdog = setInterval(() => {
    if (Date.now() - last > STREAM_IDLE_MS) ctrl.abort();
  }, 5000);
  const line = (l) => {
    if (l === '') {
      if (data.length) onMessage({ event: event || 'message', data: data.join('\n') });
      event = '';
      data = [];
      return;
    }
    if (l[0] === ':') return; // a comment: keep-alive
    const i = l.indexOf(':');
    const field = i < 0 ? l : l.slice(0, i);
    let value = i < 0 ? '' : l.slice(i + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'event') event = value;
    else if (field === 'data') data.push(value);
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      last = Date.now();
      buf += decoder.decode(value, { stream: true });
      for (;;) {
        const i = buf.search(/[\r\n]/);
        if (i < 0) break;
        // A CR at the very end may be the first half of a CRLF still on its way.
        if (buf[i] === '\r' && i === buf.length - 1) break;
        const skip = buf[i] === '\r' && buf[i + 1] === '\n' ? 2 : 1;
        const l = buf.slice(0, i);
        buf = buf.slice(i + skip);
        line(l);
      }
    }
  } finally {
    clearInterval(watchdog);
    reader.cancel().catch(() => {});
  }
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (_) {
    return null;
  }
}

function onStreamMessage({ event, data }) {
  switch (event) {
    case 'hello': {
      const me = parseJson(data);
      if (me && me.name && me.role) {
        state.me = me;
        renderWhoami();
      }
      setLive(true);
      state.hellos += 1;
      // Whatever happened before this stream was open (or while it was down) is read again.
      loadAll();
      schedule(renderTasks);
      break;
    }
    case 'event': {
      const e = parseJson(data);
      if (e) {
        addEvents([e]);
        refreshSoon();
      }
      break;
    }
    case 'task': {
      const t = parseJson(data);
      if (t) onTaskMessage(t);
      break;
    }
    case 'resync':
      loadAll();
      break;
    default:
      break;
  }
}

// ---- routing ----

function currentRoute() {
  const h = location.hash.replace(/^#\/?/, '');
  const slash = h.indexOf('/');
  const kind = slash < 0 ? h : h.slice(0, slash);
  let name = slash < 0 ? '' : h.slice(slash + 1);
  try {
    name = decodeURIComponent(name);
  } catch (_) {
    /* a malformed escape: use the name as it is */
  }
  if (kind === 'vm' && name) return { view: 'vm', name };
  if (kind === 'host' && name) return { view: 'host', name };
  if (kind === 'cluster' && name) return { view: 'cluster', name };
  return { view: 'overview', name: '' };
}

function onRoute() {
  if (!state.me) return;
  state.routed = true;
  const r = currentRoute();
  if (r.view === 'vm') {
    if (!state.console || state.console.vm !== r.name) startConsole(r.name);
  } else {
    stopConsole();
  }
  // A page opened (again) reads what it shows afresh; the one left stops reading.
  closePages();
  if (r.view === 'vm') openVmPage(r.name);
  else if (r.view === 'host') openHostPage(r.name);
  else if (r.view === 'cluster') openCluster(r.name);
  else openOverview();
  if (!(r.view === 'host' && state.maint && state.maint.host === r.name)) state.maint = null;
  renderMain();
  $('main').scrollTop = 0;
}

/** Stops the open page's reading (its timers); its answers still on their way are dropped. */
function closePages() {
  if (state.hostPage) clearInterval(state.hostPage.timer);
  if (state.cluster) clearInterval(state.cluster.timer);
  state.vmPage = null;
  state.hostPage = null;
  state.cluster = null;
  state.overview = null;
}

/** Reads the open page's objects again; `all`: its charts' history and settings too. */
function refreshPage(all) {
  const r = currentRoute();
  if (r.view === 'overview' && state.overview) readOverview(state.overview);
  const v = state.vmPage;
  if (r.view === 'vm' && v && v.name === r.name) {
    readVmPage(v);
    if (all && v.vm) readLastMigration(v);
  }
  const h = state.hostPage;
  if (r.view === 'host' && h && h.name === r.name) {
    readHostPage(h);
    if (all && h.host) readHostLoad(h);
  }
  const c = state.cluster;
  if (r.view === 'cluster' && c && c.name === r.name) {
    readClusterHosts(c);
    if (all) {
      loadClusterInfo(c); // and the imbalance's history once the cluster is known
      loadRecs(c);
    }
  }
}

function renderMain() {
  if (!state.me || !state.routed) return;
  const r = currentRoute();
  if (r.view === 'vm') renderVmView(r.name);
  else if (r.view === 'host') renderHostView(r.name);
  else if (r.view === 'cluster') renderClusterView(r.name);
  else renderOverview();
  markTreeCurrent(r);
}

/** Replaces the main area's content unless the same data is already shown. */
function showMain(key, build) {
  const main = $('main');
  if (main.dataset.key === key) return false;
  main.dataset.key = key;
  main.replaceChildren(build());
  return true;
}

function placeholder(id, title, text) {
  return el('section', { id, class: 'view' },
    el('div', { class: 'view-head' }, el('h1', { text: title })),
    el('p', { class: 'muted', text }));
}

// ---- the inventory tree: clusters, their hosts a page at a time, each host's VMs by name ----

/**
 * A cluster's group in the tree: the pages of its hosts read so far (each read again with the
 * `after` it was first read with; hosts null until its first answer) and its VMs without a host.
 */
function newGroup(name) {
  return {
    name, pages: [{ after: null, hosts: null, full: false }], loose: [], looseFull: false,
    error: null, moreFocus: false,
  };
}

function groupAlive(g) {
  return state.tree.get(g.name) === g;
}

/** The tree's clusters are those /clusters and /summary name; a new one has its first page read. */
function syncGroups() {
  const names = new Set();
  for (const c of state.clusters || []) names.add(c.name);
  for (const c of (state.summary && state.summary.clusters) || []) names.add(c.name);
  // A cluster leaves once neither list names it (a list not read yet says nothing).
  if (state.clusters && state.summary) {
    for (const name of [...state.tree.keys()]) if (!names.has(name)) state.tree.delete(name);
  }
  for (const name of names) {
    if (state.tree.has(name)) continue;
    const g = newGroup(name);
    state.tree.set(name, g);
    readTreePage(g, 0);
    readLoose(g);
  }
}

/** Reads page i of a cluster's hosts (again), with the `after` it was first read with. */
function readTreePage(g, i) {
  readOnce(`tree-page\n${g.name}\n${i}`, async () => {
    const p = g.pages[i];
    if (!p || !groupAlive(g)) return;
    let hosts;
    try {
      hosts = await api(listPath('hosts', { cluster: g.name, after: p.after, limit: HOST_PAGE }));
    } catch (e) {
      if (groupAlive(g)) {
        g.error = e.message;
        schedule(renderTree);
      }
      throw e;
    }
    if (!groupAlive(g) || g.pages[i] !== p) return;
    const first = p.hosts === null;
    p.hosts = hosts || [];
    p.full = p.hosts.length >= HOST_PAGE;
    g.error = null;
    // Asked for from a focused "Show more" button that now goes: its first host takes the focus.
    if (first && i > 0 && g.moreFocus) {
      g.moreFocus = false;
      if (!p.full && p.hosts.length) state.treeFocus = `a.tree-host[data-host="${CSS.escape(p.hosts[0].name)}"]`;
    }
    // The open hosts of a small cluster have their VMs read once here; refreshes read them again.
    for (const h of openHostsWithVms(g)) if (!state.vmsRead.has(h)) readHostVms(h);
    schedule(renderTree);
  });
}

/** A cluster's VMs that no host owns (the first LOOSE_PAGE). */
function readLoose(g) {
  readOnce(`tree-loose\n${g.name}`, async () => {
    if (!groupAlive(g)) return;
    const vms = await api(listPath('vms', { cluster: g.name, unplaced: true, limit: LOOSE_PAGE }));
    if (!groupAlive(g)) return;
    cacheVms(vms);
    g.loose = (vms || []).map(vmName);
    g.looseFull = g.loose.length >= LOOSE_PAGE;
    schedule(renderTree);
    schedule(renderMain); // the cluster page lists them too
  });
}

/** A host's VMs, for the state dots of its open node in the tree. */
function readHostVms(name) {
  state.vmsRead.add(name);
  readOnce('host-vms\n' + name, async () => {
    const session = state.session;
    const vms = await api(listPath('vms', { host: name, limit: VM_PAGE }));
    if (session !== state.session) return;
    cacheVms(vms);
    schedule(renderTree);
  });
}

/** A cluster's next page of hosts, after the last one shown. */
function moreHosts(name, button) {
  const g = state.tree.get(name);
  if (!g) return;
  const last = g.pages[g.pages.length - 1];
  if (!last.full || !last.hosts || !last.hosts.length) return; // under way, or none left
  g.moreFocus = !!button && document.activeElement === button;
  g.pages.push({ after: last.hosts[last.hosts.length - 1].name, hosts: null, full: false });
  readTreePage(g, g.pages.length - 1);
  renderTree();
}

/** The hosts of a group's pages, in the center's order, each once (pages may overlap). */
function groupHosts(g) {
  const seen = new Set();
  const out = [];
  for (const p of g.pages) {
    for (const h of p.hosts || []) {
      if (seen.has(h.name)) continue;
      seen.add(h.name);
      out.push(h);
    }
  }
  return out;
}

/** A cluster showing few hosts shows their VMs at once, with their states read. */
function isSmall(g) {
  return groupHosts(g).length <= SMALL_CLUSTER;
}

/** Whether a host shows its VMs: as the user left it, else open in a small cluster. */
function isOpen(host, small) {
  const v = state.expanded.get(host);
  return v === undefined ? small : v;
}

/** The hosts whose VMs the tree reads: the open ones of a small cluster (big ones: names only). */
function openHostsWithVms(g) {
  if (!isSmall(g)) return [];
  return groupHosts(g)
    .filter((h) => Array.isArray(h.vms) && h.vms.length && isOpen(h.name, true))
    .map((h) => h.name);
}

function toggleHost(group, host) {
  const g = state.tree.get(group);
  if (!g) return;
  const small = isSmall(g);
  const open = !isOpen(host, small);
  state.expanded.set(host, open);
  if (open && small) readHostVms(host);
  renderTree();
}

/**
 * A VM read on its own (its page) may be newer than the pages of hosts: the tree follows it
 * at once rather than at their next read.
 */
function placeVm(vm) {
  const name = vmName(vm);
  for (const g of state.tree.values()) {
    for (const h of groupHosts(g)) {
      if (!Array.isArray(h.vms)) h.vms = [];
      const i = h.vms.indexOf(name);
      if (h.name === vm.host && i < 0) h.vms.push(name);
      else if (h.name !== vm.host && i >= 0) h.vms.splice(i, 1);
    }
    const i = g.loose.indexOf(name);
    if (!vm.host && g.name === vm.cluster && i < 0) g.loose.push(name);
    else if ((vm.host || g.name !== vm.cluster) && i >= 0) g.loose.splice(i, 1);
  }
}

/** What a cluster's item shows, as plain data: it is drawn again only when this changes. */
function groupModel(g) {
  const counts = clusterCounts(g.name);
  const hosts = groupHosts(g);
  const small = hosts.length <= SMALL_CLUSTER;
  const last = g.pages[g.pages.length - 1];
  const total = counts ? Number(counts.hosts) : null;
  let more = '';
  if (g.pages.length > 1 && last.hosts === null) more = 'loading';
  else if (last.full && !(total !== null && hosts.length >= total)) more = 'more';
  return {
    name: g.name,
    total,
    loading: g.pages[0].hosts === null,
    error: g.error,
    hosts: hosts.map((h) => {
      const names = Array.isArray(h.vms) ? h.vms : [];
      const open = isOpen(h.name, small) && names.length > 0;
      return {
        name: h.name, state: h.state, degraded: !!isDegraded(h), n: names.length, open,
        vms: open ? [...names].sort(byName).map((n) => [n, vmStateOf(n)]) : null,
      };
    }),
    shown: hosts.length,
    more,
    loose: [...g.loose].sort(byName).map((n) => [n, vmStateOf(n)]),
    looseFull: g.looseFull,
  };
}

function groupItem(m) {
  const items = m.hosts.map((h) => hostTreeItem(m.name, h));
  if (m.more) {
    const loading = m.more === 'loading';
    // aria-disabled, not disabled: a disabled button would drop the focus while it loads.
    items.push(el('li', { class: 'tree-more-item' },
      el('button', {
        type: 'button', class: 'tree-more small', dataset: { cluster: m.name },
        'aria-disabled': loading ? 'true' : null,
        onclick: (ev) => moreHosts(m.name, ev.currentTarget),
      }, loading ? 'Loading…' : 'Show more hosts',
      el('span', { class: 'visually-hidden', text: m.name ? ` of ${m.name}` : '' })),
      el('span', {
        class: 'muted tree-note',
        text: m.total !== null ? `${m.shown} of ${m.total}` : `${m.shown} shown`,
      })));
  }
  for (const [n, st] of m.loose) {
    const li = vmTreeItem(n, st);
    li.classList.add('tree-loose');
    items.push(li);
  }
  if (m.looseFull) {
    items.push(el('li', { class: 'muted tree-note', text: `the first ${LOOSE_PAGE} VMs without a host` }));
  }
  if (m.loading && !m.error) items.push(el('li', { class: 'muted tree-note', text: 'Loading…' }));
  if (m.error) items.push(el('li', { class: 'error tree-note', text: m.error }));
  const count = m.total !== null ? plural(m.total, 'host') : '';
  return el('li', { dataset: { group: m.name } },
    m.name
      ? el('a', {
        class: 'tree-cluster', href: clusterHref(m.name), dataset: { cluster: m.name },
        title: `cluster ${m.name}${count ? ', ' + count : ''}`,
      }, el('span', { class: 'tree-cluster-name', text: m.name }),
      count ? el('span', { class: 'tree-count', text: count }) : null)
      : el('span', { class: 'tree-cluster', text: '(no cluster)' }),
    items.length ? el('ul', null, items) : null);
}

function hostTreeLink(name, hostState, degraded) {
  const st = hostState + (degraded ? ', degraded' : '');
  return el('a', {
    class: `tree-host state-${hostState}` + (degraded ? ' degraded' : ''),
    href: hostHref(name), dataset: { host: name }, title: `${name}: ${st}`,
  }, el('span', { class: `dot state-${hostState}`, 'aria-hidden': 'true' }), name,
  el('span', { class: 'visually-hidden', text: ` (${st})` }));
}

function hostTreeItem(group, h) {
  const toggle = h.n
    ? el('button', {
      type: 'button', class: 'tree-toggle', 'aria-expanded': h.open ? 'true' : 'false',
      'aria-label': `Show VMs of ${h.name}`, title: plural(h.n, 'VM'), dataset: { host: h.name },
      onclick: () => toggleHost(group, h.name),
    })
    : el('span', { class: 'tree-toggle-gap', 'aria-hidden': 'true' });
  return el('li', null,
    el('div', { class: 'tree-row' }, toggle, hostTreeLink(h.name, h.state, h.degraded)),
    h.open ? el('ul', null, h.vms.map(([n, st]) => vmTreeItem(n, st))) : null);
}

/** A VM's link; its state only when a copy was read (a neutral dot otherwise). */
function vmTreeItem(name, st) {
  return el('li', null,
    el('a', {
      class: 'tree-vm' + (st ? ` state-${st}` : ''), href: vmHref(name), dataset: { vm: name },
      title: st ? `${name}: ${st}` : name,
    }, el('span', { class: `dot state-${st || 'none'}`, 'aria-hidden': 'true' }), name,
    st ? el('span', { class: 'visually-hidden', text: ` (${st})` }) : null));
}

/** A selector for a focused element of the tree, to find it again once drawn anew. */
function focusKey(node) {
  if (!node || !node.matches) return null;
  if (node.id) return '#' + CSS.escape(node.id);
  if (node.matches('button.tree-toggle')) return `button.tree-toggle[data-host="${CSS.escape(node.dataset.host)}"]`;
  if (node.matches('button.tree-more')) return `button.tree-more[data-cluster="${CSS.escape(node.dataset.cluster)}"]`;
  if (node.matches('a[href]')) return `a[href="${CSS.escape(node.getAttribute('href'))}"]`;
  return null;
}

function restoreFocus(container, selector) {
  if (!selector) return;
  const active = document.activeElement;
  if (active && active !== document.body && document.contains(active)) return;
  const node = container.querySelector(selector);
  if (node) node.focus();
}

function renderTree() {
  if (state.search) {
    renderSearch();
    return;
  }
  const tree = $('tree');
  delete tree.dataset.key; // the search's
  const focus = tree.contains(document.activeElement) ? focusKey(document.activeElement) : null;
  const groups = [...state.tree.values()].sort((a, b) => byName(a.name, b.name));
  let root = tree.firstElementChild;
  if (!groups.length) {
    const text = state.clusters === null && !state.summary ? 'Loading…' : 'No clusters yet.';
    if (!root || root.textContent !== text) tree.replaceChildren(el('p', { class: 'muted tree-empty', text }));
    return;
  }
  if (!root || !root.classList.contains('tree-root')) {
    root = el('ul', { class: 'tree-root' });
    tree.replaceChildren(root);
  }
  // One item per cluster, built again only when what it shows changed.
  const existing = new Map();
  for (const li of root.children) existing.set(li.dataset.group, li);
  let prev = null;
  for (const g of groups) {
    const m = groupModel(g);
    const key = JSON.stringify(m);
    let li = existing.get(g.name);
    existing.delete(g.name);
    if (!li || li.dataset.key !== key) {
      const fresh = groupItem(m);
      fresh.dataset.key = key;
      if (li) li.replaceWith(fresh);
      li = fresh;
    }
    const want = prev ? prev.nextSibling : root.firstChild;
    if (want !== li) root.insertBefore(li, want);
    prev = li;
  }
  for (const li of existing.values()) li.remove();
  // The focus stays on what had it (a toggle, "Show more") when its item was built again.
  const next = state.treeFocus || focus;
  state.treeFocus = null;
  restoreFocus(tree, next);
  markTreeCurrent(currentRoute());
}

// ---- search: a page of the hosts and one of the VMs whose names hold the text ----

function onSearchInput() {
  clearTimeout(state.searchTimer);
  const q = $('search').value.trim();
  if (!q) {
    if (state.search) {
      state.search = null;
      renderTree();
    }
    return;
  }
  state.searchTimer = setTimeout(() => {
    if (!state.me || (state.search && state.search.q === q)) return;
    // The results shown stay, marked busy, until the new ones arrive.
    const prev = state.search;
    state.search = {
      q, loading: true, error: null, hosts: prev ? prev.hosts : null, vms: prev ? prev.vms : null,
    };
    readSearch(state.search);
    renderTree();
  }, SEARCH_DEBOUNCE_MS);
}

function readSearch(s) {
  readOnce('search\n' + s.q, async () => {
    if (state.search !== s) return;
    let hosts = null;
    let vms = null;
    let error = null;
    try {
      [hosts, vms] = await Promise.all([
        api(listPath('hosts', { q: s.q, limit: SEARCH_LIMIT })),
        api(listPath('vms', { q: s.q, limit: SEARCH_LIMIT })),
      ]);
    } catch (e) {
      error = e.message;
    }
    // Another search was typed meanwhile (or the text cleared): this answer is dropped.
    if (state.search !== s) return;
    s.loading = false;
    if (error) {
      s.error = error;
    } else {
      s.hosts = hosts || [];
      s.vms = vms || [];
      s.error = null;
      cacheVms(s.vms);
    }
    schedule(renderTree);
  });
}

function renderSearch() {
  const s = state.search;
  const tree = $('tree');
  const key = JSON.stringify([s.q, s.loading, s.error,
    s.hosts && s.hosts.map((h) => [h.name, h.state, isDegraded(h)]),
    s.vms && s.vms.map((v) => [vmName(v), v.actual_state])]);
  if (tree.dataset.key === key && $('search-results')) return;
  tree.dataset.key = key;
  const focus = tree.contains(document.activeElement) ? focusKey(document.activeElement) : null;
  const body = [];
  if (s.error) body.push(el('p', { class: 'error tree-empty', text: s.error }));
  if (s.hosts && s.vms) {
    if (!s.hosts.length && !s.vms.length) {
      body.push(el('p', { class: 'muted tree-empty', text: 'Nothing matches.' }));
    }
    if (s.hosts.length) {
      body.push(searchGroup('Hosts', 'search-hosts-title',
        s.hosts.map((h) => el('li', null, hostTreeLink(h.name, h.state, !!isDegraded(h))))));
    }
    if (s.vms.length) {
      body.push(searchGroup('VMs', 'search-vms-title',
        s.vms.map((v) => vmTreeItem(vmName(v), String(v.actual_state)))));
    }
  } else if (!s.error) {
    body.push(el('p', { class: 'muted tree-empty', text: 'Searching…' }));
  }
  tree.replaceChildren(el('div', {
    id: 'search-results', class: 'search-results', 'aria-busy': s.loading ? 'true' : 'false',
  }, body));
  restoreFocus(tree, focus);
  markTreeCurrent(currentRoute());
}

function searchGroup(title, id, items) {
  return el('div', { class: 'search-group' },
    el('h2', { id, class: 'search-group-title', text: title }),
    el('ul', { class: 'search-list', 'aria-labelledby': id }, items),
    items.length >= SEARCH_LIMIT
      ? el('p', { class: 'muted search-note', text: `${SEARCH_LIMIT} shown — refine the search` })
      : null);
}

function markTreeCurrent(r) {
  for (const a of $('tree').querySelectorAll('a[aria-current]')) {
    a.removeAttribute('aria-current');
  }
  let sel = null;
  if (r.view === 'vm') sel = `a.tree-vm[data-vm="${CSS.escape(r.name)}"]`;
  else if (r.view === 'host') sel = `a.tree-host[data-host="${CSS.escape(r.name)}"]`;
  else if (r.view === 'cluster') sel = `a.tree-cluster[data-cluster="${CSS.escape(r.name)}"]`;
  const a = sel && $('tree').querySelector(sel);
  if (a) a.setAttribute('aria-current', 'page');
  const ov = document.querySelector('.tree-overview');
  if (r.view === 'overview') ov.setAttribute('aria-current', 'page');
  else ov.removeAttribute('aria-current');
}

// ---- shared view pieces ----

/** A horizontal bar for a percentage, with its label beside it. */
function bar(pct, label, aria) {
  const p = Math.max(0, Math.min(100, Number(pct) || 0));
  const fill = el('div', { class: 'bar-fill' });
  fill.style.width = p.toFixed(1) + '%';
  const level = p >= 90 ? ' bar-high' : p >= 70 ? ' bar-mid' : '';
  return el('div', { class: 'bar-wrap' },
    el('div', {
      class: 'bar' + level, role: 'progressbar', 'aria-label': aria,
      'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round(p),
    }, fill),
    el('span', { class: 'bar-label', text: label }));
}

function cpuBar(h) {
  const load = h.load;
  if (!load || typeof load.cpu_percent !== 'number') return el('span', { class: 'muted', text: '–' });
  const cores = h.facts && h.facts.cores ? ` of ${h.facts.cores} cores` : '';
  return bar(load.cpu_percent, `${Math.round(load.cpu_percent)}%${cores}`, `${h.name} CPU`);
}

function memBar(h) {
  const load = h.load;
  const total = load && load.memory_total_mib ? load.memory_total_mib : null;
  if (!load || typeof load.memory_used_mib !== 'number' || !total) {
    return el('span', { class: 'muted', text: '–' });
  }
  const pct = (100 * load.memory_used_mib) / total;
  return bar(pct, `${fmtMiB(load.memory_used_mib)} / ${fmtMiB(total)}`, `${h.name} memory`);
}

function hostStateBadges(h) {
  const out = [el('span', { class: `badge state-${h.state}`, text: h.state })];
  if (isDegraded(h)) {
    const why = [
      ...((h.health && h.health.degraded) || []).map(findingText),
      ...(h.problems || []),
    ].join('; ');
    out.push(' ', el('span', { class: 'badge degraded', text: 'degraded', title: why }));
  }
  return out;
}

function findingText(f) {
  return `${String(f.signal || '').replace(/_/g, ' ')}: ${f.detail || ''}`;
}

function vmStateText(vm) {
  return vm.desired_state && vm.desired_state !== vm.actual_state
    ? `${vm.actual_state} (desired: ${vm.desired_state})`
    : String(vm.actual_state);
}

/** A definition list from [label, value] pairs; values may be text or nodes. */
function facts(rows) {
  const dl = el('dl', { class: 'facts' });
  for (const [label, value, attrs] of rows) {
    dl.append(el('dt', { text: label }),
      value instanceof Node ? el('dd', attrs || null, value) : el('dd', Object.assign({ text: dash(value) }, attrs || {})));
  }
  return dl;
}

function card(title, ...body) {
  return el('section', { class: 'card' }, el('h2', { text: title }), body);
}

/** A card across the whole row (tables). */
function wide(node) {
  node.classList.add('card-wide');
  return node;
}

function vmLinkWithState(name, linkClass) {
  const vm = findVm(name);
  const st = vm ? vm.actual_state : 'unknown';
  return el('span', { class: 'vm-link' },
    el('span', { class: `dot state-${st}`, 'aria-hidden': 'true' }),
    el('a', { class: linkClass, href: vmHref(name), dataset: { vm: name }, text: name }),
    el('span', { class: 'muted', text: ' ' + (vm ? vmStateText(vm) : '') }));
}

/** The hosts of a cluster with their state, CPU and memory bars, and VM counts. */
function hostTable(hosts, rowClass) {
  if (!hosts.length) return el('p', { class: 'muted', text: 'No hosts.' });
  const rows = hosts.map((h) => el('tr', { class: rowClass, dataset: { host: h.name } },
    el('th', { scope: 'row' }, el('a', { href: hostHref(h.name), text: h.name })),
    el('td', null, hostStateBadges(h)),
    el('td', { class: 'cell-bar' }, cpuBar(h)),
    el('td', { class: 'cell-bar' }, memBar(h)),
    el('td', { class: 'num', text: String(Array.isArray(h.vms) ? h.vms.length : 0) })));
  return el('table', { class: 'grid' },
    el('thead', null, el('tr', null,
      el('th', { scope: 'col', text: 'Host' }),
      el('th', { scope: 'col', text: 'State' }),
      el('th', { scope: 'col', text: 'CPU' }),
      el('th', { scope: 'col', text: 'Memory' }),
      el('th', { scope: 'col', class: 'num', text: 'VMs' }))),
    el('tbody', null, rows));
}

// ---- charts: drawn by charts.js when it is there ----

const MIB = 1024 * 1024;

/**
 * Draws a line chart into box (opts as TernCharts.line takes them; it says itself when there
 * are no points yet) unless the same data is drawn there already. `opts` null: a line of text
 * instead (nothing read yet). Without charts.js a line of text says so, and a chart that
 * cannot be drawn says why: the rest of the page goes on either way.
 */
function drawLine(box, data, opts, text) {
  if (!box) return;
  const key = JSON.stringify([data, !!opts]);
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  const say = (t, cls) => box.replaceChildren(el('p', { class: cls || 'muted chart-note', text: t }));
  if (!opts) return say(text || 'Loading…');
  if (!window.TernCharts) return say('Charts are not available.');
  try {
    window.TernCharts.line(box, opts);
  } catch (e) {
    say(`The chart could not be drawn: ${e.message}`, 'error chart-note');
  }
}

/** Mbit/s (10⁶ bits) as MiB/s, to share the dirty rate's axis. */
function mbitToMiB(mbit) {
  return (Number(mbit) * 1e6) / 8 / MIB;
}

function fmtRate(v, unit) {
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${unit}`;
}

/** A migration's timeline as a chart: what is left to copy, and the rates, per second. */
function migrationChart(tl, title, id) {
  if (!tl) return null;
  const samples = Array.isArray(tl.samples) ? tl.samples : [];
  const x = (s) => s.at_ms / 1000;
  const bands = [];
  let xMax = samples.length ? x(samples[samples.length - 1]) : 0;
  if (typeof tl.pause_at_ms === 'number' && typeof tl.pause_ms === 'number') {
    const x1 = (tl.pause_at_ms + tl.pause_ms) / 1000;
    bands.push({ x0: tl.pause_at_ms / 1000, x1, label: `pause ${tl.pause_ms} ms` });
    xMax = Math.max(xMax, x1);
  }
  if (typeof tl.total_ms === 'number') xMax = Math.max(xMax, tl.total_ms / 1000);
  return {
    title,
    id,
    series: [
      {
        name: 'Remaining', unit: 'MiB', axis: 'left', area: true,
        points: samples.map((s) => ({ x: x(s), y: s.remaining_bytes / MIB })),
      },
      {
        name: 'Dirty rate', unit: 'MiB/s', axis: 'right',
        points: samples.map((s) => ({ x: x(s), y: Number(s.dirty_rate_mib_s) })),
      },
      {
        name: 'Link rate', unit: 'MiB/s', axis: 'right',
        points: samples.map((s) => ({ x: x(s), y: mbitToMiB(s.mbit_s) })),
      },
    ],
    bands,
    xMin: 0,
    xMax: xMax > 0 ? xMax : undefined,
    leftMin: 0,
    rightMin: 0,
    xFormat: (v) => `${v < 10 ? v.toFixed(1) : Math.round(v)} s`,
    leftFormat: (v) => fmtRate(v, 'MiB'),
    rightFormat: (v) => fmtRate(v, 'MiB/s'),
  };
}

/** A pre-copy reading in words: pass, what is left, the rates, the pause it would take now. */
function sampleText(s) {
  const parts = [
    `pass ${s.pass}`,
    `${(s.remaining_bytes / MIB).toFixed(1)} MiB remaining`,
    `${Math.round(Number(s.mbit_s))} Mbit/s`,
    `dirty ${Number(s.dirty_rate_mib_s).toFixed(1)} MiB/s`,
    `expected downtime ${s.expected_downtime_ms} ms`,
  ];
  if (s.throttle_percent) parts.push(`throttled ${s.throttle_percent}%`);
  return parts.join(' · ');
}

// ---- overview: the counts of the whole center, and its first hosts ----

function openOverview() {
  state.overview = { hosts: null, error: null };
  readOverview(state.overview);
}

function readOverview(o) {
  readOnce('overview-hosts', async () => {
    if (state.overview !== o) return;
    try {
      const hosts = await api(listPath('hosts', { limit: OVERVIEW_HOSTS }));
      if (state.overview !== o) return;
      o.hosts = hosts || [];
      o.error = null;
    } catch (e) {
      if (state.overview !== o) return;
      o.error = e.message;
    }
    schedule(renderMain);
  });
}

function renderOverview() {
  const o = state.overview;
  const key = 'overview\n' + JSON.stringify([state.summary, state.summaryError, state.clusters,
    o && o.error, o && o.hosts && o.hosts.map(hostRowData), state.controlPlane,
    state.controlPlaneError]);
  showMain(key, buildOverview);
}

/** What a row of a host table shows (to tell whether it changed). */
function hostRowData(h) {
  return [h.name, h.state, isDegraded(h), h.load, h.facts && h.facts.cores,
    Array.isArray(h.vms) ? h.vms.length : 0];
}

/** Counts by state, largest first, each with its state's dot. */
function stateCounts(map, label) {
  const entries = Object.entries(map || {}).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
  if (!entries.length) return null;
  return el('ul', { class: 'plain state-counts', 'aria-label': label },
    entries.map(([st, n]) => el('li', null,
      el('span', { class: `dot state-${st}`, 'aria-hidden': 'true' }), `${n} ${st}`)));
}

function buildOverview() {
  const s = state.summary;
  if (!s) {
    return placeholder('overview', 'Overview',
      state.summaryError ? `The center's counts are not available: ${state.summaryError}` : 'Loading…');
  }
  const running = Number((s.vms_by_state || {}).running) || 0;
  const clusters = (Array.isArray(s.clusters) ? [...s.clusters] : []).sort((a, b) => byName(a.name, b.name));
  const o = state.overview;
  const hosts = o && o.hosts;
  let hostsBody;
  if (hosts) {
    hostsBody = [hostTable(hosts, 'overview-host'),
      s.hosts > hosts.length
        ? el('p', { id: 'overview-hosts-note', class: 'muted', text: `showing ${hosts.length} of ${s.hosts} hosts` })
        : null];
  } else {
    hostsBody = [el('p', { class: o && o.error ? 'error' : 'muted', text: (o && o.error) || 'Loading…' })];
  }
  return el('section', { id: 'overview', class: 'view' },
    el('div', { class: 'view-head' },
      el('h1', { text: 'Overview' }),
      el('span', {
        class: 'muted',
        text: `${plural(clusters.length, 'cluster')} · ${plural(Number(s.active_tasks) || 0, 'active task')}`,
      })),
    el('div', { class: 'cards' },
      el('section', { class: 'card stat-card', 'aria-labelledby': 'overview-hosts-title' },
        el('h2', { id: 'overview-hosts-title', text: 'Hosts' }),
        el('p', { class: 'stat' }, el('span', { id: 'overview-hosts', class: 'stat-num', text: String(Number(s.hosts) || 0) })),
        stateCounts(s.hosts_by_state, 'Hosts by state'),
        s.degraded_hosts
          ? el('p', { class: 'stat-line' }, el('span', { class: 'badge degraded', text: `${s.degraded_hosts} degraded` }))
          : null),
      el('section', { class: 'card stat-card', 'aria-labelledby': 'overview-vms-title' },
        el('h2', { id: 'overview-vms-title', text: 'VMs' }),
        el('p', { class: 'stat' },
          el('span', { id: 'overview-vms', class: 'stat-num', text: String(Number(s.vms) || 0) }),
          el('span', { class: 'stat-sub' },
            el('span', { id: 'overview-running', text: String(running) }), ' running')),
        stateCounts(s.vms_by_state, 'VMs by state')),
      controlPlaneCard(),
      wide(el('section', { class: 'card', 'aria-labelledby': 'overview-clusters-title' },
        el('h2', { id: 'overview-clusters-title', text: 'Clusters' }),
        clusters.length ? clusterTable(clusters) : el('p', { class: 'muted', text: 'No clusters yet.' }))),
      wide(el('section', { class: 'card', 'aria-labelledby': 'overview-hostlist-title' },
        el('h2', { id: 'overview-hostlist-title', text: 'Hosts by name' }),
        hostsBody))));
}

/** The overview's card of the control plane: this center, its role, the group's leader. */
function controlPlaneCard() {
  const v = controlPlaneView();
  const err = state.controlPlaneError;
  let dl = null;
  if (v.read) {
    dl = facts([
      ['Mode', v.ha ? 'HA group (etcd)' : 'single center'],
      ['This center', v.center || '—'],
      ['Role', v.role],
      ['Leader', v.leader ? v.leader.name : '—'],
      ['Term', v.role === 'leader' && v.term !== null ? String(v.term) : '—'],
    ]);
    dl.id = 'overview-control-plane';
  }
  return el('section', { class: 'card', 'aria-labelledby': 'overview-cp-title' },
    el('h2', { id: 'overview-cp-title', text: 'Control plane' }),
    dl,
    err ? el('p', { id: 'overview-control-plane-error', class: 'error', text: `The control plane is not available: ${err}` }) : null,
    !dl && !err ? el('p', { class: 'muted', text: 'Loading…' }) : null);
}

function clusterTable(clusters) {
  return el('table', { id: 'overview-clusters', class: 'grid' },
    el('thead', null, el('tr', null,
      el('th', { scope: 'col', text: 'Cluster' }),
      el('th', { scope: 'col', text: 'EVC' }),
      el('th', { scope: 'col', class: 'num', text: 'Hosts' }),
      el('th', { scope: 'col', class: 'num', text: 'VMs' }),
      el('th', { scope: 'col', class: 'num', text: 'Running' }))),
    el('tbody', null, clusters.map((c) => {
      const info = findCluster(c.name);
      const meta = info
        ? [info.evc_mode || 'none', info.migration_encryption ? `encryption ${info.migration_encryption}` : '']
          .filter(Boolean).join(' · ')
        : '–';
      return el('tr', { class: 'overview-cluster', dataset: { cluster: c.name } },
        el('th', { scope: 'row' }, c.name ? el('a', { href: clusterHref(c.name), text: c.name }) : '(no cluster)'),
        el('td', { class: 'muted', text: meta }),
        el('td', { class: 'num', text: String(c.hosts) }),
        el('td', { class: 'num', text: String(c.vms) }),
        el('td', { class: 'num', text: String(c.running_vms) }));
    })));
}

// ---- host page ----

/** Opens a host's page: it reads the host and its VMs, then the last hour of its load. */
function openHostPage(name) {
  const p = {
    name, session: state.session, host: null, notFound: false, error: null, vms: null,
    load: null, loadError: null, timer: null, loadCard: null,
  };
  state.hostPage = p;
  readHostPage(p);
}

function hostPageOpen(p) {
  return state.hostPage === p && p.session === state.session;
}

/** The host and the VMs it owns (their states), read together; the promise ends once read. */
function readHostPage(p) {
  return readOnce('host-page\n' + p.name, async () => {
    if (!hostPageOpen(p)) return;
    const [host, vms] = await Promise.all([
      api(`/hosts/${enc(p.name)}`).then((v) => ({ v }), (e) => ({ e })),
      api(listPath('vms', { host: p.name, limit: VM_PAGE })).then((v) => ({ v }), (e) => ({ e })),
    ]);
    if (!hostPageOpen(p)) return;
    if (host.e) {
      // No such host is said on the page, quietly; other failures as errors.
      p.notFound = host.e.status === 404;
      p.error = p.notFound ? null : host.e.message;
      if (p.notFound) p.host = null;
    } else {
      p.host = host.v;
      p.notFound = false;
      p.error = null;
      // Its load's history is read once the host is known, then every HISTORY_PERIOD_MS
      // (with the host itself: its bars and heartbeat age change without any event).
      if (!p.timer) {
        readHostLoad(p);
        p.timer = setInterval(() => {
          readHostLoad(p);
          readHostPage(p);
        }, HISTORY_PERIOD_MS);
      }
    }
    if (vms.v) {
      p.vms = vms.v;
      cacheVms(vms.v);
      schedule(renderTree);
    }
    schedule(renderMain);
  });
}

function readHostLoad(p) {
  readOnce('host-load\n' + p.name, async () => {
    if (!hostPageOpen(p)) return;
    try {
      const history = await api(`/hosts/${enc(p.name)}/load-history`);
      if (!hostPageOpen(p)) return;
      p.load = history || {};
      p.loadError = null;
    } catch (e) {
      if (!hostPageOpen(p)) return;
      p.loadError = e.message;
    }
    schedule(renderMain);
  });
}

function renderHostView(name) {
  const main = $('main');
  let view = $('host-view');
  if (!view || view.dataset.host !== name) {
    // The skeleton stays while the page is open: the maintenance controls keep their focus.
    main.dataset.key = 'host\n' + name;
    view = el('section', { id: 'host-view', class: 'view', dataset: { host: name } },
      el('div', { class: 'view-head' },
        el('h1', null, el('span', { class: 'muted kind', text: 'Host ' }), name),
        el('span', { id: 'host-state', class: 'host-state' })),
      el('div', { id: 'host-maintenance-box' }),
      el('div', { id: 'host-details' }));
    main.replaceChildren(view);
  }
  const p = state.hostPage && state.hostPage.name === name ? state.hostPage : null;
  const h = p ? p.host : null;

  const st = $('host-state');
  const stKey = JSON.stringify(h ? [h.state, h.health, h.problems] : null);
  if (st.dataset.key !== stKey) {
    st.dataset.key = stKey;
    st.replaceChildren(...(h ? hostStateBadges(h) : [el('span', { class: 'muted', text: '–' })]));
  }

  const details = $('host-details');
  const key = JSON.stringify([p && [p.notFound, p.error], h,
    p && p.vms && p.vms.map((v) => [vmName(v), v.actual_state, v.desired_state])]);
  if (details.dataset.key !== key) {
    details.dataset.key = key;
    let body;
    if (h) body = buildHostDetails(p, h);
    else if (p && p.notFound) body = el('p', { id: 'host-missing', class: 'muted', text: `No host is named ${name}.` });
    else if (p && p.error) body = el('p', { class: 'error', text: p.error });
    else body = el('p', { class: 'muted', text: 'Loading…' });
    details.replaceChildren(body);
  }
  if (p && h) renderHostLoad(p);
  renderMaintenance(name, h);
}

/** The "Load, last hour" card: one node for as long as the page is open (its chart stays). */
function hostLoadCard(p) {
  if (!p.loadCard) {
    p.loadCard = el('section', { id: 'host-load-card', class: 'card card-wide', 'aria-labelledby': 'host-load-title' },
      el('div', { class: 'card-head' },
        el('h2', { id: 'host-load-title', text: 'Load, last hour' }),
        el('span', { id: 'host-load-note', class: 'muted' })),
      el('div', { id: 'host-load-chart', class: 'chart-box' }));
  }
  return p.loadCard;
}

function renderHostLoad(p) {
  const card = p.loadCard;
  if (!card || !document.contains(card)) return;
  const box = card.querySelector('#host-load-chart');
  const note = card.querySelector('#host-load-note');
  const h = p.load;
  const samples = h && Array.isArray(h.samples) ? h.samples : [];
  const noteText = p.loadError
    ? `not available: ${p.loadError}`
    : h && typeof h.period_ms === 'number' ? `a sample every ${Math.round(h.period_ms / 1000)} s` : '';
  if (note.textContent !== noteText) note.textContent = noteText;
  note.classList.toggle('error', !!p.loadError);
  note.classList.toggle('muted', !p.loadError);
  if (!h) {
    drawLine(box, p.loadError, null, p.loadError ? 'No samples.' : 'Loading…');
    return;
  }
  const now = Date.now();
  const pts = (f) => samples.map((s) => ({ x: Date.parse(s.at), y: Number(s[f]) }));
  drawLine(box, samples, {
    title: `Load of ${p.name}, last hour`,
    id: 'host-load-svg',
    series: [
      { name: 'CPU', unit: '%', axis: 'left', points: pts('cpu_percent') },
      { name: 'Memory', unit: '%', axis: 'left', points: pts('memory_used_percent') },
    ],
    xFormat: clock,
    leftFormat: (y) => `${Math.round(y)}%`,
    leftMin: 0,
    leftMax: 100,
    ...lastHour(samples, now),
  });
}

/** The x range of a chart of the last hour: the hour to now, widened to its samples. */
function lastHour(samples, now) {
  const first = samples.length ? Date.parse(samples[0].at) : now;
  const last = samples.length ? Date.parse(samples[samples.length - 1].at) : now;
  return { xMin: Math.min(now - 3600 * 1000, first || now), xMax: Math.max(now, last || now) };
}

function buildHostDetails(p, h) {
  const f = h.facts || {};
  const health = h.health || {};
  const cpu = f.cpu || {};
  const status = [
    ['State', el('span', null, hostStateBadges(h))],
    ['Cluster', h.cluster ? el('a', { href: clusterHref(h.cluster), text: h.cluster }) : null],
    ['Last heartbeat', h.last_heartbeat ? `${fmtAgo(h.last_heartbeat)} (${fmtTime(h.last_heartbeat)})` : null],
    ['Agent', h.agent_url],
  ];
  if (h.certificate) {
    status.push(['Certificate', `serial ${h.certificate.serial}, expires ${fmtTime(h.certificate.expires_at)}`]);
  }
  const healthBody = [];
  if (h.problems && h.problems.length) {
    healthBody.push(el('h3', { text: 'Problems' }), el('ul', { class: 'plain' }, h.problems.map((p) => el('li', { text: p }))));
  }
  if (health.degraded && health.degraded.length) {
    healthBody.push(el('h3', { text: 'Degraded by' }),
      el('ul', { class: 'plain' }, health.degraded.map((x) => el('li', { class: 'error', text: findingText(x) }))));
  }
  if (health.ignored && health.ignored.length) {
    healthBody.push(el('h3', { text: 'Seen (proactive mode off)' }),
      el('ul', { class: 'plain' }, health.ignored.map((x) => el('li', { text: findingText(x) }))));
  }
  if (!healthBody.length) healthBody.push(el('p', { class: 'muted', text: 'Healthy.' }));
  const rep = health.report;
  if (rep) {
    healthBody.push(facts([
      ['Memory errors (corrected)', rep.memory_corrected],
      ['Memory errors (uncorrected)', rep.memory_uncorrected],
      ['Machine checks', rep.machine_checks],
      ['Disk errors', rep.disk_errors],
      ['NIC errors', rep.nic_errors],
      ['CPU steal', typeof rep.cpu_steal_percent === 'number' ? rep.cpu_steal_percent.toFixed(1) + '%' : null],
      ['Run queue per core', typeof rep.run_queue_per_core === 'number' ? rep.run_queue_per_core.toFixed(2) : null],
    ]));
  }
  // The host names its VMs; their states come from the page's read of them.
  const vmNames = new Set([...(Array.isArray(h.vms) ? h.vms : []), ...(p.vms || []).map(vmName)]);
  const vms = [...vmNames].sort(byName);
  const shown = vms.slice(0, VM_PAGE);
  return el('div', { class: 'cards' },
    card('Status', facts(status)),
    card('Load',
      facts([
        ['CPU', cpuBar(h)],
        ['Memory', memBar(h)],
        ['QEMU processes', h.load && h.load.vms ? h.load.vms.length : null],
      ])),
    card('Health', healthBody),
    card('Facts', facts([
      ['Hostname', f.hostname],
      ['Cores', f.cores],
      ['Memory', fmtMiB(f.memory_mib)],
      ['CPU model', f.cpu_model_name],
      ['CPU MHz', f.cpu_mhz || null],
      ['CPU vendor', cpu.vendor],
      ['Best CPU baseline', cpu.best_baseline],
      ['CPU ceiling', f.cpu_ceiling],
      ['Accelerator', f.accelerator],
      ['QEMU', f.qemu_version],
      ['UEFI firmware', yesNo(f.uefi)],
      ['Migration TLS', yesNo(f.migration_tls)],
      ['Migration address', f.migration_address],
      ['Shared storage', f.shared_storage],
      ['Resource control', f.resource_control || 'none'],
      ['Agent version', f.agent_version],
    ])),
    card(`VMs (${vms.length})`,
      el('ul', { id: 'host-vms', class: 'plain host-vms' }, shown.map((n) => el('li', null, vmLinkWithState(n, 'host-vm')))),
      vms.length > shown.length ? el('p', { class: 'muted', text: `the first ${shown.length} shown` }) : null,
      vms.length ? null : el('p', { class: 'muted', text: 'No VMs.' })),
    hostLoadCard(p));
}

// ---- host maintenance: the evacuation plan, then the task live ----

function renderMaintenance(name, h) {
  const box = $('host-maintenance-box');
  if (!box) return;
  if (!h || !canAct()) {
    if (box.firstChild) box.replaceChildren();
    return;
  }
  let sec = $('host-maintenance');
  if (!sec) {
    sec = el('section', { id: 'host-maintenance', class: 'card maint-card', 'aria-labelledby': 'host-maintenance-title' },
      el('div', { class: 'card-head' },
        el('h2', { id: 'host-maintenance-title', text: 'Maintenance' }),
        el('span', { id: 'maintenance-note', class: 'muted' }),
        el('div', { id: 'maintenance-actions', class: 'actions' })),
      el('p', { id: 'maintenance-error', class: 'error', role: 'alert' }),
      el('div', { id: 'maintenance-plan-box' }),
      el('div', { id: 'maintenance-status', class: 'task-status', role: 'status' }));
    box.replaceChildren(sec);
  }
  const m = state.maint && state.maint.host === name ? state.maint : null;
  const busy = state.maintBusy === name;
  const task = maintTaskFor(name);
  const running = !!task && !isDone(task);
  const key = JSON.stringify([h.state, busy, running, m && [m.loading, m.plan, m.fallback, m.planError]]);
  if (sec.dataset.key !== key) {
    sec.dataset.key = key;
    $('maintenance-note').textContent = h.state === 'maintenance'
      ? 'In maintenance: nothing new lands or starts here.'
      : h.state === 'disconnected'
        ? 'Disconnected: it cannot enter maintenance now.'
        : 'In service.';
    const actions = $('maintenance-actions');
    actions.replaceChildren();
    if (h.state === 'maintenance') {
      actions.append(el('button', {
        id: 'host-maintenance-exit', type: 'button', class: 'primary', disabled: busy,
        text: 'Exit maintenance', onclick: () => exitMaintenance(name),
      }));
    } else {
      actions.append(el('button', {
        id: 'host-maintenance-enter', type: 'button', 'aria-expanded': m ? 'true' : 'false',
        'aria-controls': 'maintenance-plan-box',
        disabled: busy || running || !!m || h.state === 'disconnected',
        text: 'Enter maintenance…', onclick: () => showMaintenancePlan(name),
      }));
    }
    const planBox = $('maintenance-plan-box');
    const hadFocus = planBox.contains(document.activeElement) ? document.activeElement.id : null;
    planBox.replaceChildren(...(m ? [buildMaintenancePlan(name, m, busy)] : []));
    if (hadFocus && $(hadFocus)) $(hadFocus).focus();
  }
  renderMaintStatus(name);
}

async function showMaintenancePlan(name) {
  const m = { host: name, loading: true, plan: null, fallback: null, planError: null, session: state.session };
  state.maint = m;
  $('maintenance-error').textContent = '';
  renderMain();
  try {
    const plan = await api(`/hosts/${enc(name)}/maintenance-plan`);
    if (state.maint !== m) return;
    m.plan = plan || {};
  } catch (e) {
    if (state.maint !== m) return;
    // No plan from the center (an older one, or it failed): what is known here.
    m.planError = e.message;
    const p = state.hostPage && state.hostPage.name === name ? state.hostPage : null;
    const vms = (p && p.vms) || [];
    m.fallback = {
      moves: vms.filter((v) => v.actual_state === 'running' || v.actual_state === 'paused').map(vmName),
      stopped: vms.filter((v) => v.actual_state !== 'running' && v.actual_state !== 'paused').map(vmName),
    };
  }
  m.loading = false;
  renderMain();
  const sec = $('maintenance-plan');
  if (sec) sec.focus();
}

function cancelMaintenancePlan() {
  state.maint = null;
  renderMain();
  const b = $('host-maintenance-enter');
  if (b) b.focus();
}

/** A list item per VM name or {vm, …} record. */
function planName(x) {
  return typeof x === 'string' ? x : (x && (x.vm || x.name)) || '';
}

function buildMaintenancePlan(name, m, busy) {
  const body = [];
  if (m.loading) {
    body.push(el('p', { class: 'muted', text: 'Working out where its VMs go…' }));
  } else if (m.plan) {
    const p = m.plan;
    const moves = Array.isArray(p.moves) ? p.moves : [];
    const blockers = Array.isArray(p.blockers) ? p.blockers : [];
    const stopped = Array.isArray(p.stopped) ? p.stopped : [];
    if (typeof p.imbalance_before === 'number' || typeof p.imbalance_after === 'number') {
      body.push(el('p', { id: 'maintenance-plan-imbalance', class: 'muted', text: `Cluster imbalance ${fmtImbalance(p.imbalance_before)} → ${fmtImbalance(p.imbalance_after)} once the host is empty.` }));
    }
    body.push(planSection(`Moved live (${moves.length})`, moves.map((mv) => el('li', { class: 'plan-move', dataset: { vm: planName(mv) } },
      vmLink(planName(mv)), ' → ',
      mv.to ? hostLink(mv.to) : el('em', { text: 'destination chosen by the scheduler' }),
      mv.reason ? el('span', { class: 'plan-reason muted', text: ` — ${mv.reason}` }) : null))));
    if (blockers.length) {
      body.push(planSection(`Cannot leave (${blockers.length})`, blockers.map((b) => el('li', { class: 'plan-blocker', dataset: { vm: planName(b) } },
        el('span', { class: 'badge state-failed', text: 'blocked' }), ' ', vmLink(planName(b)),
        el('span', { class: 'error', text: `: ${b.why || b.reason || 'no host takes it'}` })))));
      body.push(el('p', { class: 'error', text: 'A running VM that cannot leave makes the task fail; the host stays in maintenance (flagged) until you exit it.' }));
    }
    if (stopped.length) {
      body.push(planSection(`Stopped, re-homed to another host (${stopped.length})`,
        stopped.map((x) => el('li', { class: 'plan-stopped', dataset: { vm: planName(x) } }, vmLink(planName(x)),
          x && x.to ? [' → ', hostLink(x.to)] : null))));
    }
    if (!moves.length && !blockers.length && !stopped.length) {
      body.push(el('p', { class: 'muted', text: `No VM is on ${name}: it enters maintenance at once.` }));
    }
  } else if (m.fallback) {
    const f = m.fallback;
    body.push(el('p', { id: 'maintenance-plan-error', class: 'error', text: `No plan from the center: ${m.planError}` }));
    body.push(planSection(`Moved live (${f.moves.length})`, f.moves.map((n) => el('li', { class: 'plan-move', dataset: { vm: n } },
      vmLink(n), ' → ', el('em', { text: 'destination chosen by the scheduler' })))));
    if (f.stopped.length) {
      body.push(planSection(`Not running, re-homed to another host (${f.stopped.length})`,
        f.stopped.map((n) => el('li', { class: 'plan-stopped', dataset: { vm: n } }, vmLink(n)))));
    }
  }
  return el('section', {
    id: 'maintenance-plan', class: 'maint-plan', tabindex: '-1', 'aria-labelledby': 'maintenance-plan-title',
    'aria-busy': m.loading ? 'true' : 'false',
  },
  el('h3', { id: 'maintenance-plan-title', text: `Evacuation plan for ${name}` }),
  body,
  el('div', { class: 'plan-actions' },
    el('button', {
      id: 'maintenance-confirm', type: 'button', class: 'primary', disabled: m.loading || busy,
      text: 'Enter maintenance', onclick: () => enterMaintenance(name),
    }),
    el('button', {
      id: 'maintenance-cancel', type: 'button', disabled: busy, text: 'Cancel',
      onclick: () => cancelMaintenancePlan(),
    })));
}

function planSection(title, items) {
  return [
    el('p', { class: 'plan-head', text: title }),
    items.length ? el('ul', { class: 'plain plan-list' }, items) : el('p', { class: 'muted plan-none', text: 'None.' }),
  ];
}

async function enterMaintenance(name) {
  const m = state.maint;
  state.maintBusy = name;
  $('maintenance-error').textContent = '';
  renderMain();
  try {
    const t = await api(`/hosts/${enc(name)}/maintenance`, { method: 'POST', body: { action: 'enter' } });
    if (state.maint === m) state.maint = null;
    followTask(state.maintTasks, name, t);
    notice(`${name}: entering maintenance`, false);
    refreshSoon();
  } catch (e) {
    const line = $('maintenance-error');
    if (line && currentRoute().name === name) line.textContent = e.message;
    else notice(e.message);
  } finally {
    if (state.maintBusy === name) state.maintBusy = null;
    renderMain();
  }
}

async function exitMaintenance(name) {
  state.maintBusy = name;
  $('maintenance-error').textContent = '';
  renderMain();
  try {
    const t = await api(`/hosts/${enc(name)}/maintenance`, { method: 'POST', body: { action: 'exit' } });
    upsertTask(t);
    state.maintTasks.delete(name); // the entry's report is over
    notice(`${name} is back in service`, false);
    refreshVisible(false);
    if (state.hostPage && state.hostPage.name === name) await readHostPage(state.hostPage);
  } catch (e) {
    const line = $('maintenance-error');
    if (line && currentRoute().name === name) line.textContent = e.message;
    else notice(e.message);
  } finally {
    if (state.maintBusy === name) state.maintBusy = null;
    renderMain();
    const b = $('host-maintenance-enter') || $('host-maintenance-exit');
    if (b && currentRoute().name === name && document.activeElement === document.body) b.focus();
  }
}

/** The maintenance task started from this page, or one running on the host. */
function maintTaskFor(name) {
  const id = state.maintTasks.get(name);
  if (id && state.tasks.has(id)) return state.tasks.get(id);
  let best = null;
  for (const t of state.tasks.values()) {
    if (t.host === name && (t.kind === 'host_maintenance_enter' || t.kind === 'host_evacuate') && !isDone(t)) {
      if (!best || byCreatedDesc(t, best) < 0) best = t;
    }
  }
  return best;
}

function renderMaintStatus(name) {
  const box = $('maintenance-status');
  if (!box || currentRoute().name !== name) return;
  const t = maintTaskFor(name);
  const key = JSON.stringify(t);
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.replaceChildren(...(t ? [taskStatus(t, maintenanceResultNodes)] : []));
}

function maintenanceResultNodes(r) {
  const out = [];
  const migrated = Array.isArray(r.migrated) ? r.migrated : [];
  const rehomed = Array.isArray(r.rehomed) ? r.rehomed : [];
  const left = Array.isArray(r.left) ? r.left : [];
  const moveItem = (mv) => el('li', { class: 'moved-vm', dataset: { vm: mv.vm } },
    vmLink(mv.vm), ' → ', hostLink(mv.to),
    mv.reason ? el('span', { class: 'muted', text: ` — ${mv.reason}` }) : null);
  if (migrated.length) out.push(planSection(`Moved live (${migrated.length})`, migrated.map(moveItem)));
  if (rehomed.length) out.push(planSection(`Re-homed, stopped (${rehomed.length})`, rehomed.map(moveItem)));
  if (left.length) {
    out.push(planSection(`Left on the host (${left.length})`, left.map((x) => el('li', { class: 'left-vm', dataset: { vm: x.vm } },
      vmLink(x.vm), el('span', { class: 'error', text: `: ${x.why}` })))));
  }
  if (!out.length) out.push(el('p', { class: 'muted', text: 'No VM had to move.' }));
  return out;
}

/** A task's phase and progress while it runs, its outcome once done. */
function taskStatus(t, resultNodes) {
  const done = isDone(t);
  const ok = t.state === 'succeeded' || t.state === 'completed';
  const pct = ok ? 100 : Math.max(0, Math.min(100, Number(t.progress) || 0));
  const progress = el('progress', { max: 100, 'aria-label': `${taskKindText(t.kind)} progress` });
  progress.value = pct;
  const r = t.result && typeof t.result === 'object' ? t.result : null;
  const errors = [t.error, r && r.error].filter((x, i, a) => x && a.indexOf(x) === i);
  return el('div', { class: `task-status-body state-${t.state}`, dataset: { task: t.id, state: t.state } },
    el('div', { class: 'status-line' },
      el('strong', { class: 'status-kind', text: taskKindText(t.kind) }),
      el('span', { class: `badge state-${t.state}`, text: t.state }),
      progress,
      el('span', { class: 'status-percent', text: `${pct}%` }),
      el('span', { class: 'status-phase', text: t.phase || '' }),
      done && t.finished_at ? el('span', { class: 'muted status-time', text: `at ${fmtTime(t.finished_at)}` }) : null),
    done && r ? resultNodes(r) : null,
    errors.map((x) => el('p', { class: 'error', text: x })));
}

// ---- cluster page: EVC, DRS settings, hosts, DRS recommendations ----

/** Opens (or opens again) a cluster page: its figures are read afresh. */
function openCluster(name) {
  const c = {
    name, session: state.session,
    info: null, infoError: null, drs: null, drsError: null,
    recs: null, recsError: null, recsLoading: false, recsSeq: 0,
    applyBusy: false, applyError: null,
    pages: [{ after: null, hosts: null, full: false }], hostsError: null, moreFocus: false,
    history: null, historyError: null, timer: null,
  };
  state.cluster = c;
  loadClusterInfo(c);
  loadRecs(c);
  readClusterHosts(c);
}

function clusterOpen(c) {
  return state.cluster === c && c.session === state.session;
}

async function loadClusterInfo(c) {
  const [info, drs] = await Promise.all([
    api(`/clusters/${enc(c.name)}`).then((v) => ({ v }), (e) => ({ e })),
    api(`/clusters/${enc(c.name)}/drs`).then((v) => ({ v }), (e) => ({ e })),
  ]);
  if (!clusterOpen(c)) return;
  c.info = info.v || null;
  c.infoError = info.e ? info.e.message : null;
  c.drs = drs.v || null;
  c.drsError = drs.e ? drs.e.message : null;
  // The imbalance's last hour, once the cluster is known to be there; then every period.
  if (c.info) {
    readDrsHistory(c);
    if (!c.timer) c.timer = setInterval(() => readDrsHistory(c), HISTORY_PERIOD_MS);
  }
  renderMain();
}

/** The cluster's pages of hosts (each again with its own `after`), for its host table. */
function readClusterHosts(c) {
  c.pages.forEach((p, i) => {
    readOnce(`cluster-hosts\n${c.name}\n${i}`, async () => {
      if (!clusterOpen(c) || c.pages[i] !== p) return;
      let hosts;
      try {
        hosts = await api(listPath('hosts', { cluster: c.name, after: p.after, limit: HOST_PAGE }));
      } catch (e) {
        if (!clusterOpen(c)) return;
        c.hostsError = e.message;
        schedule(renderMain);
        return;
      }
      if (!clusterOpen(c) || c.pages[i] !== p) return;
      const first = p.hosts === null;
      p.hosts = hosts || [];
      p.full = p.hosts.length >= HOST_PAGE;
      c.hostsError = null;
      if (first && i > 0 && c.moreFocus) {
        c.moreFocus = false;
        c.focusHost = !p.full && p.hosts.length ? p.hosts[0].name : null;
      }
      schedule(renderMain);
    });
  });
}

function moreClusterHosts(c, button) {
  const last = c.pages[c.pages.length - 1];
  if (!last.full || !last.hosts || !last.hosts.length) return; // under way, or none left
  c.moreFocus = !!button && document.activeElement === button;
  c.pages.push({ after: last.hosts[last.hosts.length - 1].name, hosts: null, full: false });
  readClusterHosts(c);
  renderMain();
}

/** The hosts of the cluster page's pages, each once. */
function clusterHosts(c) {
  const seen = new Set();
  const out = [];
  for (const p of c.pages) {
    for (const h of p.hosts || []) {
      if (!seen.has(h.name)) {
        seen.add(h.name);
        out.push(h);
      }
    }
  }
  return out;
}

function readDrsHistory(c) {
  readOnce('drs-history\n' + c.name, async () => {
    if (!clusterOpen(c)) return;
    try {
      const history = await api(`/clusters/${enc(c.name)}/drs/history`);
      if (!clusterOpen(c)) return;
      c.history = history || {};
      c.historyError = null;
    } catch (e) {
      if (!clusterOpen(c)) return;
      c.historyError = e.message;
    }
    schedule(renderMain);
  });
}

async function loadRecs(c) {
  const seq = ++c.recsSeq;
  c.recsLoading = true;
  if (clusterOpen(c)) schedule(renderMain);
  let recs = null;
  let error = null;
  try {
    recs = await api(`/clusters/${enc(c.name)}/drs/recommendations`);
  } catch (e) {
    error = e.message;
  }
  if (!clusterOpen(c) || seq !== c.recsSeq) return;
  c.recsLoading = false;
  if (error) {
    c.recsError = error;
  } else {
    c.recs = recs || {};
    c.recsError = null;
  }
  renderMain();
}

/** Reads the open cluster's recommendations again shortly (after tasks end). */
function recsSoon() {
  if (!state.cluster) return;
  clearTimeout(state.recsTimer);
  state.recsTimer = setTimeout(() => {
    if (state.cluster) loadRecs(state.cluster);
  }, RECS_DEBOUNCE_MS);
}

function refreshCluster() {
  const c = state.cluster;
  if (!c) return;
  loadClusterInfo(c);
  loadRecs(c);
  refreshSoon();
}

function renderClusterView(name) {
  const main = $('main');
  let view = $('cluster-view');
  if (!view || view.dataset.cluster !== name) {
    main.dataset.key = 'cluster\n' + name;
    view = el('section', { id: 'cluster-view', class: 'view', dataset: { cluster: name } },
      el('div', { class: 'view-head' },
        el('h1', null, el('span', { class: 'muted kind', text: 'Cluster ' }), name),
        el('div', { id: 'cluster-actions', class: 'actions' })),
      el('p', { id: 'cluster-error', class: 'error', role: 'alert' }),
      el('div', { class: 'cards' },
        el('section', { class: 'card', 'aria-labelledby': 'cluster-summary-title' },
          el('h2', { id: 'cluster-summary-title', text: 'Summary' }),
          el('div', { id: 'cluster-summary' })),
        el('section', { class: 'card', 'aria-labelledby': 'cluster-drs-title' },
          el('h2', { id: 'cluster-drs-title', text: 'DRS settings' }),
          el('div', { id: 'cluster-drs' })),
        el('section', { class: 'card card-wide', 'aria-labelledby': 'cluster-hosts-title' },
          el('h2', { id: 'cluster-hosts-title', text: 'Hosts' }),
          el('div', { id: 'cluster-hosts' })),
        el('section', { id: 'drs-card', class: 'card card-wide', 'aria-labelledby': 'drs-title' },
          el('div', { class: 'card-head' },
            el('h2', { id: 'drs-title', text: 'DRS recommendations' }),
            el('span', { id: 'drs-imbalance', class: 'muted', text: '–' }),
            el('div', { id: 'drs-actions', class: 'actions' })),
          el('div', { id: 'drs-recs' }),
          el('div', { id: 'drs-apply-status', class: 'task-status', role: 'status' })),
        el('section', { id: 'drs-history-card', class: 'card card-wide', 'aria-labelledby': 'drs-history-title' },
          el('div', { class: 'card-head' },
            el('h2', { id: 'drs-history-title', text: 'DRS imbalance, last hour' }),
            el('span', { id: 'drs-history-note', class: 'muted' })),
          el('div', { id: 'drs-history-chart', class: 'chart-box' }))));
    main.replaceChildren(view);
  }
  const c = state.cluster && state.cluster.name === name ? state.cluster : null;
  if (!c) return;
  const listed = findCluster(name);
  const info = c.info || listed;
  const counts = clusterCounts(name);
  const hosts = clusterHosts(c);
  const first = c.pages[0];
  const last = c.pages[c.pages.length - 1];
  const total = counts ? Number(counts.hosts) : null;
  const g = state.tree.get(name);
  const loose = g ? [...g.loose].sort(byName) : [];

  keyed($('cluster-actions'), [canAct(), !!info], () => canAct() && info
    ? [el('button', {
      id: 'vm-create-open', type: 'button', class: 'primary', 'aria-haspopup': 'dialog',
      text: 'New VM…', onclick: () => openCreate(name),
    })]
    : []);

  const err = $('cluster-error');
  const errText = c.infoError && !info ? c.infoError : '';
  if (err.textContent !== errText) err.textContent = errText;

  keyed($('cluster-summary'), [info, c.infoError, counts], () => {
    if (!info) return [el('p', { class: 'muted', text: c.infoError ? 'Not available.' : 'Loading…' })];
    return [facts([
      ['EVC mode', info.evc_mode || 'none', { id: 'cluster-evc' }],
      ['Migration encryption', info.migration_encryption || 'required'],
      ['Hosts', counts ? String(counts.hosts) : null, { id: 'cluster-host-count' }],
      ['VMs', counts ? `${counts.vms} (${counts.running_vms} running)` : null, { id: 'cluster-vm-count' }],
      ['Created', info.created_at ? fmtTime(info.created_at) : null],
    ])];
  });

  const drs = c.drs || (c.recs && c.recs.settings) || null;
  keyed($('cluster-drs'), [drs, c.drsError], () => {
    if (!drs) return [el('p', { class: c.drsError ? 'error' : 'muted', text: c.drsError || 'Loading…' })];
    return [facts([
      ['Automation', drs.automation, { id: 'drs-automation' }],
      ['Threshold', typeof drs.threshold === 'number' ? `${drs.threshold} of 5` : drs.threshold, { id: 'drs-threshold' }],
      ['Proactive', drs.proactive || 'off', { id: 'drs-proactive' }],
    ])];
  });

  const loadingMore = c.pages.length > 1 && last.hosts === null;
  const more = loadingMore || (last.full && !(total !== null && hosts.length >= total));
  keyed($('cluster-hosts'), [first.hosts === null, c.hostsError, hosts.map(hostRowData), total,
    more, loadingMore, loose], () => {
    if (first.hosts === null) {
      return [el('p', { class: c.hostsError ? 'error' : 'muted', text: c.hostsError || 'Loading…' })];
    }
    return [
      c.hostsError ? el('p', { class: 'error', text: c.hostsError }) : null,
      hostTable(hosts, 'cluster-host'),
      more || (total !== null && total > hosts.length)
        ? el('div', { class: 'more-row' },
          more
            ? el('button', {
              id: 'cluster-hosts-more', type: 'button', class: 'small',
              'aria-disabled': loadingMore ? 'true' : null, text: loadingMore ? 'Loading…' : 'Show more hosts',
              onclick: (ev) => moreClusterHosts(c, ev.currentTarget),
            })
            : null,
          el('span', { id: 'cluster-hosts-note', class: 'muted', text: `showing ${hosts.length}${total !== null ? ` of ${total}` : ''} hosts` }))
        : null,
      loose.length
        ? el('p', { class: 'loose' }, 'Without a host: ', loose.map((n, i) => [i ? ', ' : '', vmLink(n)]),
          g && g.looseFull ? el('span', { class: 'muted', text: ` (the first ${LOOSE_PAGE})` }) : null)
        : null,
    ];
  });
  if (c.focusHost) {
    const a = $('cluster-hosts').querySelector(`a[href="${CSS.escape(hostHref(c.focusHost))}"]`);
    c.focusHost = null;
    if (a && (document.activeElement === document.body || !document.activeElement)) a.focus();
  }

  renderDrsHistory(c);
  renderDrs(c);
  renderApplyStatus(name);
}

/** The "DRS imbalance, last hour" card: the imbalance, the target it works towards. */
function renderDrsHistory(c) {
  const box = $('drs-history-chart');
  const note = $('drs-history-note');
  if (!box || !note) return;
  const h = c.history;
  const samples = h && Array.isArray(h.samples) ? h.samples : [];
  let noteText = '';
  if (c.historyError) noteText = `not available: ${c.historyError}`;
  else if (h && h.threshold !== undefined) noteText = `threshold ${h.threshold} of 5`;
  if (h && samples.length && !c.historyError) {
    const lastSample = samples[samples.length - 1];
    noteText += ` · now ${fmtImbalance(lastSample.imbalance)}, ${plural(Number(lastSample.moves) || 0, 'move')} recommended`;
  }
  if (note.textContent !== noteText) note.textContent = noteText;
  note.classList.toggle('error', !!c.historyError);
  note.classList.toggle('muted', !c.historyError);
  if (!h) {
    drawLine(box, c.historyError, null, c.historyError ? 'No samples.' : 'Loading…');
    return;
  }
  const now = Date.now();
  const pts = (f) => samples.map((s) => ({ x: Date.parse(s.at), y: Number(s[f]) }));
  drawLine(box, samples, {
    title: `DRS imbalance of ${c.name}, last hour`,
    id: 'drs-history-svg',
    series: [
      { name: 'Imbalance', unit: '', axis: 'left', points: pts('imbalance') },
      { name: 'Target', unit: '', axis: 'left', dashed: true, points: pts('target') },
    ],
    xFormat: clock,
    leftFormat: (y) => y.toFixed(3),
    leftMin: 0,
    ...lastHour(samples, now),
  });
}

/** Replaces a container's content when what it shows changed (keeps focus otherwise). */
function keyed(node, data, build) {
  const key = JSON.stringify(data);
  if (!node || node.dataset.key === key) return;
  node.dataset.key = key;
  const focused = node.contains(document.activeElement) ? document.activeElement.id : '';
  node.replaceChildren(...build().filter((x) => x !== null && x !== undefined));
  if (focused && $(focused) && node.contains($(focused))) $(focused).focus();
}

function applyTaskFor(name) {
  const id = state.applyTasks.get(name);
  return (id && state.tasks.get(id)) || null;
}

function renderDrs(c) {
  const recs = c.recs;
  const list = recs && Array.isArray(recs.recommendations) ? recs.recommendations : [];
  const imb = $('drs-imbalance');
  const imbText = recs ? `imbalance ${fmtImbalance(recs.imbalance_before)} → ${fmtImbalance(recs.imbalance_after)}` : '–';
  if (imb.textContent !== imbText) imb.textContent = imbText;

  const t = applyTaskFor(c.name);
  const applying = c.applyBusy || (!!t && !isDone(t));
  keyed($('drs-actions'), [canAct(), list.length, applying], () => {
    const out = [el('button', {
      id: 'drs-refresh', type: 'button', 'aria-label': 'Refresh the DRS recommendations',
      text: 'Refresh', onclick: () => refreshCluster(),
    })];
    if (canAct()) {
      out.push(el('button', {
        id: 'drs-apply', type: 'button', class: 'primary', disabled: !list.length || applying,
        'aria-label': 'Apply all DRS recommendations', text: 'Apply all',
        onclick: () => applyDrs(c),
      }));
    }
    return out;
  });

  keyed($('drs-recs'), [recs, c.recsError], () => {
    const details = $('drs-pass'); // the one shown until now: it stays open if it was
    const passOpen = !!(details && details.open);
    const out = [];
    if (c.recsError) out.push(el('p', { class: 'error', text: c.recsError }));
    if (!recs) {
      if (!c.recsError) out.push(el('p', { class: 'muted', text: 'Loading…' }));
      return out;
    }
    out.push(list.length
      ? el('ol', { id: 'drs-rec-list', class: 'drs-recs' }, list.map(drsRecItem))
      : el('p', { id: 'drs-none', class: 'muted', text: 'No moves recommended: the cluster is as balanced as its threshold asks.' }));
    if (recs.text) {
      out.push(el('details', { id: 'drs-pass', class: 'drs-pass', open: passOpen },
        el('summary', { text: 'The whole pass, in words' }),
        el('pre', { class: 'drs-pass-text', tabindex: '0', 'aria-label': 'DRS pass', text: recs.text })));
    }
    return out;
  });
}

function drsRecItem(r) {
  return el('li', { class: 'drs-rec', dataset: { vm: r.vm, from: r.from_host, to: r.to_host } },
    el('div', { class: 'drs-rec-head' },
      vmLink(r.vm),
      el('span', { class: 'drs-rec-move' }, ' from ', hostLink(r.from_host), ' → ', hostLink(r.to_host)),
      typeof r.priority === 'number' ? el('span', { class: 'badge', text: `priority ${r.priority}` }) : null,
      typeof r.imbalance_before === 'number'
        ? el('span', { class: 'muted drs-rec-imbalance', text: `imbalance ${fmtImbalance(r.imbalance_before)} → ${fmtImbalance(r.imbalance_after)}` })
        : null),
    r.reason ? el('div', { class: 'drs-rec-reason', text: r.reason }) : null,
    r.detail ? el('div', { class: 'drs-rec-detail mono muted', text: r.detail }) : null);
}

async function applyDrs(c) {
  if (c.applyBusy) return;
  c.applyBusy = true;
  c.applyError = null;
  renderMain();
  try {
    const t = await api(`/clusters/${enc(c.name)}/drs/apply`, { method: 'POST', body: {} });
    followTask(state.applyTasks, c.name, t);
    notice(`DRS apply on ${c.name} queued`, false);
  } catch (e) {
    if (clusterOpen(c)) c.applyError = e.message;
    else notice(e.message);
  } finally {
    c.applyBusy = false;
    if (clusterOpen(c)) renderMain();
  }
}

function renderApplyStatus(name) {
  const box = $('drs-apply-status');
  const c = state.cluster;
  if (!box || !c || c.name !== name) return;
  const t = applyTaskFor(name);
  const key = JSON.stringify([t, c.applyError]);
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.replaceChildren(...[
    c.applyError ? el('p', { class: 'error', text: c.applyError }) : null,
    t ? taskStatus(t, drsResultNodes) : null,
  ].filter(Boolean));
  // The apply button follows the task (enabled again once it ended).
  renderDrs(c);
}

function drsResultNodes(r) {
  const applied = Array.isArray(r.applied) ? r.applied : [];
  if (!applied.length) return [el('p', { class: 'muted', text: 'Nothing was moved.' })];
  return planSection(`Moves (${applied.length})`, applied.map((a) => el('li', {
    class: 'applied-move' + (a.error ? ' failed' : ''), dataset: { vm: a.vm },
  },
  vmLink(a.vm), ' ', hostLink(a.from_host), ' → ', hostLink(a.to_host), ': ',
  a.error
    ? el('span', { class: 'error', text: a.error })
    : el('span', { class: 'badge state-succeeded', text: 'moved' }),
  a.reason ? el('span', { class: 'muted', text: ` — ${a.reason}` }) : null)));
}

// ---- VM page ----

/** Opens a VM's page: it reads the VM, then its last migration. */
function openVmPage(name) {
  const p = {
    name, session: state.session, vm: null, notFound: false, error: null,
    mig: null, migAsked: false, migLoaded: false, migError: null,
  };
  state.vmPage = p;
  readVmPage(p);
}

function vmPageOpen(p) {
  return state.vmPage === p && p.session === state.session;
}

function readVmPage(p) {
  return readOnce('vm-page\n' + p.name, async () => {
    if (!vmPageOpen(p)) return;
    let vm = null;
    let error = null;
    try {
      vm = await api(`/vms/${enc(p.name)}`);
    } catch (e) {
      error = e;
    }
    if (!vmPageOpen(p)) return;
    if (error) {
      // No such VM (a name typed, a VM deleted) is said on the page, quietly; other failures
      // as errors.
      p.notFound = error.status === 404;
      p.error = p.notFound ? null : error.message;
      if (p.notFound) p.vm = null;
    } else if (vm) {
      const was = p.vm && p.vm.actual_state;
      p.vm = vm;
      p.notFound = false;
      p.error = null;
      cacheVms([vm]);
      placeVm(vm);
      schedule(renderTree);
      if (!p.migAsked) {
        p.migAsked = true;
        readLastMigration(p);
      }
      // Its console is asked for once the VM is known to be there, and as it starts.
      if (was !== vm.actual_state && state.console && state.console.vm === p.name) fetchConsole(state.console);
    }
    schedule(renderMain);
  });
}

/** The VM's newest finished migration and its timeline (a finished one's does not change). */
function readLastMigration(p) {
  readOnce('vm-migration\n' + p.name, async () => {
    if (!vmPageOpen(p)) return;
    try {
      const tasks = await api(`/tasks?vm=${enc(p.name)}&limit=${VM_TASKS}`);
      if (!vmPageOpen(p)) return;
      const t = (tasks || [])
        .filter((x) => x.kind === 'vm_migrate' && isDone(x))
        .sort(byCreatedDesc)[0] || null;
      let timeline = null;
      if (t) {
        timeline = p.mig && p.mig.task.id === t.id && p.mig.timeline
          ? p.mig.timeline
          : await api(`/tasks/${enc(t.id)}/timeline`);
      }
      if (!vmPageOpen(p)) return;
      p.mig = t ? { task: t, timeline } : null;
      p.migError = null;
    } catch (e) {
      if (!vmPageOpen(p)) return;
      p.migError = e.message;
    }
    p.migLoaded = true;
    schedule(renderMain);
  });
}

function renderVmView(name) {
  const main = $('main');
  let view = $('vm-view');
  if (!view || view.dataset.vm !== name) {
    // The skeleton stays while the page is open: the console and any message keep their place.
    main.dataset.key = 'vm\n' + name;
    view = el('section', { id: 'vm-view', class: 'view', dataset: { vm: name } },
      el('div', { class: 'view-head' },
        el('h1', null, el('span', { class: 'muted kind', text: 'VM ' }), name),
        el('div', { id: 'vm-actions', class: 'actions' })),
      el('p', { id: 'vm-action-error', class: 'error', role: 'alert' }),
      el('div', { id: 'vm-details' }),
      el('div', { id: 'vm-migration-box' }),
      el('section', { id: 'vm-console-card', class: 'card console-card' },
        el('div', { class: 'card-head' },
          el('h2', { text: 'Console' }),
          el('span', { id: 'vm-console-note', class: 'muted', text: 'serial console, refreshed every 3 s' })),
        // A log (not announced as it grows): named even while it is empty.
        el('pre', {
          id: 'vm-console', class: 'console', role: 'log', 'aria-live': 'off', tabindex: '0',
          'aria-label': `Serial console of ${name}`,
        })));
    main.replaceChildren(view);
    if (state.console && state.console.text !== undefined && state.console.vm === name) {
      setConsoleText(state.console.text);
    }
  }
  const p = state.vmPage && state.vmPage.name === name ? state.vmPage : null;
  const vm = p ? p.vm : null;
  const key = JSON.stringify([p && [p.notFound, p.error], vm, canAct(), state.vmBusy === name]);
  const details = $('vm-details');
  if (details.dataset.key !== key) {
    details.dataset.key = key;
    renderVmActions(name, vm);
    if (vm) details.replaceChildren(buildVmDetails(vm));
    else if (p && p.notFound) details.replaceChildren(el('p', { id: 'vm-missing', class: 'muted', text: `No VM is named ${name}.` }));
    else if (p && p.error) details.replaceChildren(el('p', { class: 'error', text: p.error }));
    else details.replaceChildren(el('p', { class: 'muted', text: 'Loading…' }));
  }
  // No console for a VM that is not there.
  const consoleCard = $('vm-console-card');
  if (consoleCard.hidden !== !!(p && p.notFound)) consoleCard.hidden = !!(p && p.notFound);
  renderLastMigration(p);
}

/** The "Last migration" card: its outcome, figures and pre-copy chart. */
function renderLastMigration(p) {
  const box = $('vm-migration-box');
  if (!box) return;
  const m = p && p.mig;
  keyed(box, [!!(p && p.vm), p && p.migLoaded, p && p.migError, m && m.task, m && m.timeline], () => {
    if (!p || !p.vm) return [];
    const body = [];
    if (!p.migLoaded) {
      body.push(el('p', { class: 'muted', text: 'Loading…' }));
    } else if (!m) {
      body.push(p.migError
        ? el('p', { class: 'error', text: p.migError })
        : el('p', { id: 'vm-migration-none', class: 'muted', text: 'Not migrated yet.' }));
    } else {
      const t = m.task;
      const tl = m.timeline || {};
      const r = t.result && typeof t.result === 'object' ? t.result : {};
      const ms = (a, b) => (typeof a === 'number' ? `${a} ms` : typeof b === 'number' ? `${b} ms` : null);
      const samples = Array.isArray(tl.samples) ? tl.samples : [];
      body.push(facts([
        ['Outcome', el('span', { class: `badge state-${t.state}`, text: t.state }), { id: 'vm-migration-state' }],
        ['When', fmtTime(t.finished_at || t.created_at)],
        ['Moved', r.from || r.to ? `${r.from || '?'} → ${r.to || '?'}` : null],
        ['Total', ms(tl.total_ms, r.total_ms), { dataset: { field: 'total_ms' } }],
        ['Pause', ms(tl.pause_ms, r.pause_ms), { dataset: { field: 'pause_ms' } }],
        ['Downtime', ms(tl.downtime_ms, r.downtime_ms), { dataset: { field: 'downtime_ms' } }],
        ['Pre-copy passes', samples.length ? samples[samples.length - 1].pass : null],
      ]));
      if (t.error) body.push(el('p', { class: 'error', text: t.error }));
      body.push(el('div', { id: 'vm-migration-chart', class: 'chart-box' }));
    }
    return [el('section', { id: 'vm-last-migration', class: 'card migration-card', 'aria-labelledby': 'vm-last-migration-title' },
      el('h2', { id: 'vm-last-migration-title', text: 'Last migration' }),
      body)];
  });
  const chart = $('vm-migration-chart');
  if (chart && m) {
    drawLine(chart, m.timeline, migrationChart(m.timeline, `Migration of ${p.name}`, 'vm-migration-svg'));
  }
}

function renderVmActions(name, vm) {
  const box = $('vm-actions');
  box.replaceChildren();
  if (!vm || !canAct()) return;
  const busy = state.vmBusy === name;
  const s = vm.actual_state;
  if (s === 'stopped' || s === 'crashed') {
    box.append(el('button', {
      id: 'vm-start', type: 'button', class: 'primary', disabled: busy,
      'aria-label': `Start ${name}`, text: 'Start', onclick: () => vmAction(name, 'start'),
    }));
  }
  if (s === 'running') {
    box.append(
      el('button', {
        id: 'vm-stop', type: 'button', disabled: busy,
        'aria-label': `Stop ${name}`, text: 'Stop', onclick: () => vmAction(name, 'stop'),
      }),
      el('button', {
        id: 'vm-migrate', type: 'button', class: 'primary', disabled: busy,
        'aria-label': `Migrate ${name}`, text: 'Migrate…', onclick: () => openMigrate(name),
      }));
  }
}

function buildVmDetails(vm) {
  const spec = vm.spec || {};
  const name = vmName(vm);
  const boot = spec.boot || {};
  const bootText = boot.kind === 'kernel'
    ? `kernel ${boot.kernel || ''}${boot.initrd ? `, initrd ${boot.initrd}` : ''}${boot.cmdline ? `, cmdline "${boot.cmdline}"` : ''}`
    : boot.kind || null;
  const cpu = vm.cpu;
  const res = spec.resources && typeof spec.resources === 'object' ? Object.entries(spec.resources) : [];
  const disks = spec.disks || [];
  const nics = spec.nics || [];
  return el('div', { class: 'cards' },
    card('Summary', facts([
      ['State', vmStateText(vm), { id: 'vm-state', class: `state-${vm.actual_state}` }],
      ['Host', vm.host ? el('a', { href: hostHref(vm.host), text: vm.host }) : '–', { id: 'vm-host' }],
      ['Cluster', vm.cluster ? el('a', { href: clusterHref(vm.cluster), text: vm.cluster }) : null],
      ['Generation', vm.generation, { id: 'vm-generation' }],
      ['Pool', vm.pool || 'root'],
      ['Created', fmtTime(vm.created_at)],
    ])),
    card('Spec', facts([
      ['vCPUs', spec.vcpus],
      ['Memory', fmtMiB(spec.memory_mib)],
      ['Firmware', spec.firmware || 'bios'],
      ['CPU model', cpu ? `${cpu.model} (${String(cpu.source || '').replace(/_/g, ' ')})` : spec.cpu_model || 'cluster default'],
      ['Boot', bootText],
      ['Resources', res.length ? res.map(([k, v]) => `${k.replace(/_/g, ' ')} ${typeof v === 'object' ? JSON.stringify(v) : v}`).join(', ') : 'defaults'],
      ['Cloud-init', spec.cloud_init ? 'yes' : 'no'],
    ])),
    wide(card(`Disks (${disks.length})`,
      disks.length
        ? el('table', { class: 'grid disks' },
          el('thead', null, el('tr', null,
            ['Path', 'Datastore', 'Volume', 'Bus', 'Format', 'Mode'].map((t) => el('th', { scope: 'col', text: t })))),
          el('tbody', null, disks.map((d) => el('tr', null,
            el('td', { class: 'mono wrap', text: dash(d.path) }),
            el('td', { text: dash(d.datastore) }),
            el('td', { class: 'mono', text: dash(d.volume) }),
            el('td', { text: d.bus || 'virtio_blk' }),
            el('td', { text: d.format || 'raw' }),
            el('td', { text: d.readonly ? 'read-only' : 'read-write' })))))
        : el('p', { class: 'muted', text: 'No disks.' }))),
    card(`NICs (${nics.length})`,
      nics.length
        ? el('ul', { class: 'plain mono' }, nics.map((n) => el('li', { text: n.mac })))
        : el('p', { class: 'muted', text: `${name} has no network interface.` })));
}

async function vmAction(name, action) {
  const err = $('vm-action-error');
  if (err) err.textContent = '';
  state.vmBusy = name;
  renderMain();
  try {
    const t = await api(`/vms/${enc(name)}/${action}`, { method: 'POST', body: {} });
    upsertTask(t);
    notice(`${action} of ${name} queued`, false);
  } catch (e) {
    const line = $('vm-action-error');
    if (line && currentRoute().name === name) line.textContent = e.message;
    else notice(e.message);
  } finally {
    if (state.vmBusy === name) state.vmBusy = null;
    renderMain();
  }
}

// ---- console ----

function startConsole(name) {
  stopConsole();
  const c = { vm: name, timer: null, busy: false, text: undefined, session: state.session };
  state.console = c;
  c.timer = setInterval(() => fetchConsole(c), CONSOLE_PERIOD_MS);
  fetchConsole(c);
}

function stopConsole() {
  if (state.console) clearInterval(state.console.timer);
  state.console = null;
}

async function fetchConsole(c) {
  if (c.busy || state.console !== c || document.hidden) return;
  // Not before the VM is known to be there (its read starts it), and only while its host
  // has its log: a VM never started, or on a host out of reach, has none to give.
  const p = state.vmPage;
  if (!p || p.name !== c.vm || !p.vm) return;
  if (!p.vm.host || !CONSOLE_STATES.has(p.vm.actual_state)) {
    setConsoleNote(`serial console, read while the VM runs (it is ${p.vm.actual_state})`, false);
    return;
  }
  c.busy = true;
  try {
    const text = await api(`/vms/${enc(c.vm)}/console?bytes=${CONSOLE_BYTES}`, { text: true });
    if (state.console !== c) return;
    c.text = cleanConsole(text);
    setConsoleText(c.text);
    setConsoleNote('serial console, refreshed every 3 s', false);
  } catch (e) {
    if (state.console === c) setConsoleNote(e.message, true);
  } finally {
    c.busy = false;
  }
}

/** Drops terminal escape sequences and control characters (the text stays text). */
function cleanConsole(text) {
  return String(text || '')
    .replace(/\x1b\[[0-9;?]*[ -/]*[@-~]/g, '')
    .replace(/\x1b[()][0-9A-Za-z]/g, '')
    .replace(/\x1b[@-_]/g, '')
    .replace(/\r\n/g, '\n')
    .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '');
}

function setConsoleText(text) {
  const pre = $('vm-console');
  if (!pre || pre.textContent === text) return;
  const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
  pre.textContent = text;
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

function setConsoleNote(text, isError) {
  const note = $('vm-console-note');
  if (!note) return;
  note.textContent = text;
  note.classList.toggle('error', isError);
  note.classList.toggle('muted', !isError);
}

// ---- migrate dialog ----

/**
 * Opens the migrate dialog of the VM shown: the other hosts of its cluster, a page at a time,
 * each usable one (connected, not degraded) with the center's dry run of the move.
 */
function openMigrate(name) {
  const p = state.vmPage;
  const vm = p && p.name === name ? p.vm : findVm(name);
  if (!vm) return;
  closeMigrate();
  const m = {
    vm: name, cluster: vm.cluster || '', from: vm.host || null, session: state.session,
    taskId: null, poll: null, starting: false,
    after: null, more: false, loading: false, listed: 0, // the hosts' pages
    queue: [], checking: 0, verdicts: new Map(), // the dry runs: to ask, under way, ok or not
    tl: null, tlTimer: null, tlBusy: false, tlAgain: false, tlAt: 0, // the task's timeline
  };
  state.migrate = m;
  $('migrate-title').textContent = `Migrate ${name}`;
  $('migrate-body').replaceChildren(
    el('p', { class: 'muted', text: `From ${vm.host || '(no host)'} to another host of ${m.cluster ? `cluster ${m.cluster}` : 'its cluster'}: the pre-checks of each.` }),
    el('p', { id: 'migrate-checking', class: 'muted', text: 'checking…' }),
    el('ul', { id: 'migrate-targets', class: 'migrate-targets', 'aria-label': 'Destinations', hidden: true }),
    el('div', { id: 'migrate-more-box' }),
    el('p', { id: 'migrate-error', class: 'error', role: 'alert' }),
    el('div', { id: 'migrate-task' }));
  const dlg = $('migrate-dialog');
  if (!dlg.open) dlg.showModal();
  loadMigrateHosts(m);
}

/** The next page of the cluster's hosts: listed at once, the usable ones checked. */
async function loadMigrateHosts(m) {
  if (state.migrate !== m || m.loading) return;
  m.loading = true;
  renderMigrateMore(m);
  let hosts;
  try {
    hosts = (await api(listPath('hosts', { cluster: m.cluster, after: m.after, limit: HOST_PAGE }))) || [];
  } catch (e) {
    if (state.migrate !== m) return;
    m.loading = false;
    $('migrate-error').textContent = e.message;
    renderMigrateMore(m);
    updateChecking(m);
    return;
  }
  if (state.migrate !== m) return;
  m.loading = false;
  m.more = hosts.length >= HOST_PAGE;
  if (hosts.length) m.after = hosts[hosts.length - 1].name;
  const list = $('migrate-targets');
  for (const h of hosts) {
    if (h.name === m.from) continue; // the source is no destination
    const usable = h.state === 'connected' && !isDegraded(h);
    list.append(migrateTargetRow(m, h, usable));
    m.listed += 1;
    if (usable) m.queue.push(h.name);
  }
  list.hidden = m.listed === 0;
  renderMigrateMore(m);
  pumpChecks(m);
}

/** Asks the dry runs waiting, at most CHECKS_IN_FLIGHT at a time. */
function pumpChecks(m) {
  while (state.migrate === m && m.checking < CHECKS_IN_FLIGHT && m.queue.length) {
    const host = m.queue.shift();
    m.checking += 1;
    api(`/vms/${enc(m.vm)}/can-migrate?to=${enc(host)}`)
      .then((report) => ({ report }), (e) => ({ error: e.message }))
      .then((v) => {
        m.checking -= 1;
        if (state.migrate !== m) return;
        setVerdict(m, host, v);
        pumpChecks(m);
      });
  }
  updateChecking(m);
}

function updateChecking(m) {
  const line = $('migrate-checking');
  if (!line || state.migrate !== m) return;
  const pending = m.queue.length + m.checking;
  let text = '';
  if (m.loading) text = 'listing the hosts…';
  else if (pending) text = `checking ${plural(pending, 'host')}…`;
  else if (!m.listed && !m.more) text = `There is no other host in ${m.cluster ? `cluster ${m.cluster}` : 'the cluster'}.`;
  line.textContent = text;
  line.hidden = !text;
}

function renderMigrateMore(m) {
  const box = $('migrate-more-box');
  if (!box || state.migrate !== m) return;
  const had = document.activeElement && document.activeElement.id === 'migrate-more';
  box.replaceChildren(...(m.more || (m.loading && m.after)
    ? [el('button', {
      id: 'migrate-more', type: 'button', class: 'small', 'aria-disabled': m.loading ? 'true' : null,
      text: m.loading ? 'Loading…' : 'Show more hosts', onclick: () => loadMigrateHosts(m),
    })]
    : []));
  if (had && $('migrate-more')) $('migrate-more').focus();
  updateChecking(m);
}

function migrateTargetRow(m, host, usable) {
  let verdict;
  if (usable) {
    verdict = el('div', { class: 'verdict verdict-pending muted', text: 'checking…' });
  } else {
    const why = host.state === 'maintenance' ? 'in maintenance: nothing new lands there'
      : host.state !== 'connected' ? `${host.state}: it cannot take the VM`
        : `degraded (${(host.problems || []).join('; ') || 'health'}): nothing new lands there`;
    verdict = el('div', { class: 'verdict verdict-skip muted', text: `not checked, ${why}` });
  }
  return el('li', { class: 'migrate-target not-ok', dataset: { host: host.name } },
    el('div', { class: 'migrate-target-head' },
      el('strong', { text: host.name }),
      el('span', null, hostStateBadges(host)),
      el('button', {
        type: 'button', class: 'migrate-to primary small', dataset: { host: host.name },
        disabled: true, 'aria-label': `Migrate here: ${m.vm} to ${host.name}`, text: 'Migrate here',
        onclick: () => startMigration(m, host.name),
      })),
    verdict);
}

function setVerdict(m, host, { report, error }) {
  const row = document.querySelector(`#migrate-targets .migrate-target[data-host="${CSS.escape(host)}"]`);
  if (!row) return;
  const ok = !error && !!(report && report.ok);
  m.verdicts.set(host, ok);
  let verdict;
  if (error) {
    verdict = el('div', { class: 'verdict verdict-bad error', text: error });
  } else if (ok) {
    verdict = el('div', { class: 'verdict verdict-ok', text: 'ok' });
  } else {
    const failed = (report && report.checks ? report.checks : []).filter((c) => !c.ok);
    verdict = failed.length
      ? el('ul', { class: 'verdict verdict-bad' }, failed.map((c) => el('li', { text: `${c.check}: ${c.detail}` })))
      : el('div', { class: 'verdict verdict-bad', text: 'not ok' });
  }
  row.querySelector('.verdict').replaceWith(verdict);
  row.classList.toggle('ok', ok);
  row.classList.toggle('not-ok', !ok);
  row.querySelector('button.migrate-to').disabled = !ok || m.starting || !!m.taskId;
}

async function startMigration(m, to) {
  if (state.migrate !== m || m.taskId || m.starting) return;
  m.starting = true;
  for (const b of document.querySelectorAll('#migrate-targets button.migrate-to')) b.disabled = true;
  $('migrate-error').textContent = '';
  try {
    const t = await api(`/vms/${enc(m.vm)}/migrate`, { method: 'POST', body: { to } });
    if (state.migrate !== m) return;
    m.taskId = t.id;
    const row = document.querySelector(`#migrate-targets .migrate-target[data-host="${CSS.escape(to)}"]`);
    if (row) row.classList.add('chosen');
    // Its pre-copy is read about every second while it runs (the task's own messages may
    // ask sooner), once more when it ends.
    m.tlTimer = setInterval(() => readTimeline(m), TIMELINE_POLL_MS);
    m.poll = setInterval(() => pollMigrateTask(m), MIGRATE_POLL_MS);
    upsertTask(t);
    // The stream may have told of this task before its id was known here.
    renderMigrateTask(state.tasks.get(t.id) || t);
  } catch (e) {
    if (state.migrate !== m) return;
    $('migrate-error').textContent = e.message;
    for (const [host, ok] of m.verdicts) {
      const b = document.querySelector(`#migrate-targets button.migrate-to[data-host="${CSS.escape(host)}"]`);
      if (b && ok) b.disabled = false;
    }
  } finally {
    m.starting = false;
  }
}

/** Follows the task by asking while the stream is down (the stream tells otherwise). */
async function pollMigrateTask(m) {
  if (state.migrate !== m || !m.taskId || state.live) return;
  const t = state.tasks.get(m.taskId);
  if (t && isDone(t)) return;
  try {
    onTaskMessage(await api(`/tasks/${enc(m.taskId)}`));
  } catch (_) {
    /* tried again at the next tick */
  }
}

/**
 * Reads the running migration's timeline: one request at a time; `last`, once the task ended,
 * is made after any under way (so the chart ends with the pause).
 */
async function readTimeline(m, last) {
  if (state.migrate !== m || !m.taskId || (m.tl && isDone(m.tl))) return;
  if (m.tlBusy) {
    if (last) m.tlAgain = true;
    return;
  }
  m.tlBusy = true;
  m.tlAt = Date.now();
  try {
    const tl = await api(`/tasks/${enc(m.taskId)}/timeline`);
    if (state.migrate !== m) return;
    m.tl = tl || {};
    renderMigrateTimeline(m);
  } catch (e) {
    if (state.migrate !== m) return;
    // Not asked again every second: once more at the end, at most.
    clearInterval(m.tlTimer);
    m.tlTimer = null;
    const stats = $('migrate-stats');
    if (stats) stats.textContent = `No pre-copy readings: ${e.message}`;
  } finally {
    m.tlBusy = false;
    if (m.tlAgain && state.migrate === m) {
      m.tlAgain = false;
      readTimeline(m, true);
    }
  }
}

function renderMigrateTimeline(m) {
  const tl = m.tl;
  const stats = $('migrate-stats');
  if (!tl || !stats) return;
  const samples = Array.isArray(tl.samples) ? tl.samples : [];
  const newest = samples[samples.length - 1];
  let text = newest ? sampleText(newest) : isDone(tl) ? 'No pre-copy readings.' : 'waiting for the first pre-copy reading…';
  if (typeof tl.pause_ms === 'number') text += ` · paused ${tl.pause_ms} ms`;
  stats.textContent = text;
  drawLine($('migrate-chart'), tl, migrationChart(tl, `Pre-copy of ${m.vm}`, 'migrate-chart-svg'));
}

function renderMigrateTask(t) {
  const m = state.migrate;
  const box = $('migrate-task');
  if (!m || !box || t.id !== m.taskId) return;
  let prog = $('migrate-progress');
  if (!prog) {
    prog = el('div', { id: 'migrate-progress', class: 'migrate-progress' },
      el('progress', { max: 100, 'aria-label': 'Migration progress' }),
      el('span', { class: 'migrate-percent' }),
      el('span', { class: 'migrate-phase' }));
    box.append(prog,
      el('p', { id: 'migrate-stats', class: 'migrate-stats muted', text: 'waiting for the first pre-copy reading…' }),
      el('div', { id: 'migrate-chart', class: 'chart-box migrate-chart' }));
    readTimeline(m);
  }
  const done = isDone(t);
  const pct = t.state === 'succeeded' || t.state === 'completed' ? 100 : Number(t.progress) || 0;
  prog.querySelector('progress').value = pct;
  prog.querySelector('.migrate-percent').textContent = `${pct}%`;
  prog.querySelector('.migrate-phase').textContent = t.phase || t.state;
  prog.classList.toggle('done', done);
  if (!done) {
    // A message of the task itself: its timeline too, unless it was read just now.
    if (Date.now() - m.tlAt >= TIMELINE_POLL_MS / 2 && m.tlTimer) readTimeline(m);
    return;
  }
  if (m.poll) clearInterval(m.poll);
  m.poll = null;
  if (m.tlTimer) clearInterval(m.tlTimer);
  m.tlTimer = null;
  readTimeline(m, true);

  const r = t.result && typeof t.result === 'object' ? t.result : null;
  const rows = [];
  if (r) {
    if (r.status) rows.push(['outcome', String(r.status).replace(/_/g, ' ')]);
    if (r.from || r.to) rows.push(['moved', `${r.from || '?'} → ${r.to || '?'}`]);
    if (typeof r.total_ms === 'number') rows.push(['total', `${r.total_ms} ms`, { dataset: { field: 'total_ms' } }]);
    if (typeof r.pause_ms === 'number') rows.push(['pause', `${r.pause_ms} ms`, { dataset: { field: 'pause_ms' } }]);
    if (typeof r.downtime_ms === 'number') rows.push(['downtime', `${r.downtime_ms} ms`, { dataset: { field: 'downtime_ms' } }]);
  }
  const errors = [t.error, r && r.error].filter((x, i, a) => x && a.indexOf(x) === i);
  const result = el('div', { id: 'migrate-result', class: `migrate-result state-${t.state}`, role: 'status' },
    el('p', null, 'Migration ', el('strong', { class: `badge state-${t.state}`, text: t.state }),
      t.finished_at ? el('span', { class: 'muted', text: ` at ${fmtTime(t.finished_at)}` }) : null),
    rows.length ? facts(rows) : null,
    errors.map((x) => el('p', { class: 'error', text: x })));
  const old = $('migrate-result');
  if (old) old.replaceWith(result);
  else box.append(result);
}

function closeMigrate() {
  const m = state.migrate;
  if (m) {
    clearInterval(m.poll);
    clearInterval(m.tlTimer);
  }
  state.migrate = null;
  const dlg = $('migrate-dialog');
  if (dlg.open) dlg.close();
}

// ---- new-VM dialog ----

function randomMac() {
  const b = new Uint8Array(3);
  crypto.getRandomValues(b);
  return '52:54:00:' + [...b].map((x) => x.toString(16).padStart(2, '0')).join(':');
}

function openCreate(cluster) {
  const cr = { cluster, busy: false, bootTouched: false, session: state.session };
  state.create = cr;
  const form = $('vm-create-form');
  form.reset();
  for (const i of form.querySelectorAll('[aria-invalid]')) i.removeAttribute('aria-invalid');
  $('vm-create-error').textContent = '';
  $('vm-create-cluster').textContent = cluster;
  $('vm-create-title').textContent = `New VM in ${cluster}`;
  $('vm-create-submit').disabled = false;

  // The hosts the cluster page holds, at once; read here when it holds none yet.
  const c = state.cluster && state.cluster.name === cluster ? state.cluster : null;
  const hosts = c ? clusterHosts(c) : [];
  fillCreateHosts(hosts, c ? c.pages[c.pages.length - 1].full : false);
  $('vm-create-host').value = '';
  $('vm-create-image').replaceChildren(el('option', { value: '', text: 'loading…' }));
  setImageNote('The boot disk is made from it (a linked clone unless “full copy”).', false);
  syncBoot();

  const dlg = $('vm-create-dialog');
  if (!dlg.open) dlg.showModal();
  $('vm-create-name').focus();
  loadImages(cr);
  if (!hosts.length) loadCreateHosts(cr);
}

/** The host choices: the cluster's hosts (a page of them), the one chosen kept. */
function fillCreateHosts(hosts, more) {
  const sel = $('vm-create-host');
  const chosen = sel.value;
  sel.replaceChildren(el('option', { value: '', text: 'let the center place it' }),
    ...hosts.map((h) => el('option', {
      value: h.name,
      text: h.state === 'connected' && !isDegraded(h) ? h.name : `${h.name} (${h.state}${isDegraded(h) ? ', degraded' : ''})`,
    })),
    more ? el('option', { value: '', disabled: true, text: `(the first ${hosts.length} hosts)` }) : null);
  if (chosen && hosts.some((h) => h.name === chosen)) sel.value = chosen;
}

async function loadCreateHosts(cr) {
  let hosts;
  try {
    hosts = (await api(listPath('hosts', { cluster: cr.cluster, limit: HOST_PAGE }))) || [];
  } catch (e) {
    if (state.create === cr) notice(e.message);
    return;
  }
  if (state.create !== cr) return;
  fillCreateHosts(hosts, hosts.length >= HOST_PAGE);
}

function setImageNote(text, isError) {
  const note = $('vm-create-image-note');
  note.textContent = text;
  note.classList.toggle('error', isError);
  note.classList.toggle('muted', !isError);
}

async function loadImages(cr) {
  let images;
  try {
    images = (await api('/images')) || [];
  } catch (e) {
    if (state.create !== cr) return;
    $('vm-create-image').replaceChildren(el('option', { value: '', text: '(could not list the images)' }));
    setImageNote(e.message, true);
    return;
  }
  if (state.create !== cr) return;
  const sel = $('vm-create-image');
  const chosen = sel.value;
  images.sort((a, b) => byName(a.name, b.name));
  if (!images.length) {
    sel.replaceChildren(el('option', { value: '', text: '(no images)' }));
    setImageNote('The center has no image yet (tern image import): boot a kernel instead.', false);
    if (!cr.bootTouched) {
      $('vm-create-boot').value = 'kernel';
      syncBoot();
    }
    return;
  }
  sel.replaceChildren(...images.map((i) => el('option', {
    value: i.name,
    text: `${i.name} (${fmtBytes(i.virtual_size_bytes)})`,
  })));
  if (chosen && images.some((i) => i.name === chosen)) sel.value = chosen;
}

/** Shows the fields of the chosen boot source. */
function syncBoot() {
  const kernel = $('vm-create-boot').value === 'kernel';
  $('vm-create-image-fields').hidden = kernel;
  $('vm-create-kernel-fields').hidden = !kernel;
}

function closeCreate() {
  state.create = null;
  const dlg = $('vm-create-dialog');
  if (dlg && dlg.open) dlg.close();
}

/** A whole number from a field, or NaN. */
function intField(id) {
  const v = $(id).value.trim();
  return /^\d+$/.test(v) ? Number(v) : NaN;
}

function createProblem(id, text) {
  const field = $(id);
  field.setAttribute('aria-invalid', 'true');
  $('vm-create-error').textContent = text;
  if (field.closest('[hidden]') === null) field.focus();
}

/** The CreateVm body from the form, or null after saying what is missing. */
function createBody(cr) {
  const form = $('vm-create-form');
  for (const i of form.querySelectorAll('[aria-invalid]')) i.removeAttribute('aria-invalid');
  const name = $('vm-create-name').value.trim();
  const vcpus = intField('vm-create-vcpus');
  const memory = intField('vm-create-memory');
  if (!name) { createProblem('vm-create-name', 'Give the VM a name.'); return null; }
  if (!(vcpus >= 1)) { createProblem('vm-create-vcpus', 'vCPUs: give a whole number, 1 or more.'); return null; }
  if (!(memory >= 1)) { createProblem('vm-create-memory', 'Memory: give a whole number of MiB.'); return null; }
  const spec = { name, vcpus, memory_mib: memory };
  const body = { spec, cluster: cr.cluster };
  if ($('vm-create-boot').value === 'kernel') {
    const kernel = $('vm-create-kernel').value.trim();
    if (!kernel) { createProblem('vm-create-kernel', 'Give the kernel’s path on the shared storage (or boot from an image).'); return null; }
    const initrd = $('vm-create-initrd').value.trim();
    spec.boot = { kind: 'kernel', kernel, initrd: initrd || null, cmdline: $('vm-create-cmdline').value.trim() };
  } else {
    const image = $('vm-create-image').value;
    if (!image) { createProblem('vm-create-image', 'Choose an image (or boot a kernel).'); return null; }
    spec.boot = { kind: 'disk' };
    body.image = { image, full_copy: $('vm-create-full-copy').checked };
  }
  const mac = $('vm-create-mac').value.trim();
  if (mac) spec.nics = [{ mac }];
  const host = $('vm-create-host').value;
  if (host) body.host = host;
  return body;
}

async function submitCreate() {
  const cr = state.create;
  if (!cr || cr.busy) return;
  $('vm-create-error').textContent = '';
  const body = createBody(cr);
  if (!body) return;
  const name = body.spec.name;
  const start = $('vm-create-start').checked;
  cr.busy = true;
  const submit = $('vm-create-submit');
  submit.disabled = true;
  submit.textContent = 'Creating…';
  let vm;
  try {
    vm = await api('/vms', { method: 'POST', body });
  } catch (e) {
    if (state.create === cr) {
      $('vm-create-error').textContent = e.message;
      cr.busy = false;
      submit.disabled = false;
      submit.textContent = 'Create';
    }
    return;
  }
  if (cr.session !== state.session) return;
  if (state.create !== cr) {
    refreshSoon(); // closed meanwhile: the VM shows in the tree all the same
    return;
  }
  const created = (vm && vmName(vm)) || name;
  if (vm && vm.spec) {
    // Shown at once (in the tree under its host), read again below.
    cacheVms([vm]);
    placeVm(vm);
  }
  let startError = null;
  if (start) {
    submit.textContent = 'Starting…';
    try {
      upsertTask(await api(`/vms/${enc(created)}/start`, { method: 'POST', body: {} }));
    } catch (e) {
      startError = e.message;
    }
  }
  submit.textContent = 'Create';
  closeCreate();
  renderTree();
  location.hash = vmHref(created);
  refreshSoon();
  if (startError) notice(`${created} was created but not started: ${startError}`);
  else notice(start ? `${created} created, starting` : `${created} created`, false);
}

// ---- wiring ----

function init() {
  $('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = $('token').value.trim();
    if (!token) {
      $('login-error').textContent = 'Give a token.';
      return;
    }
    signIn(token, false);
  });
  $('logout').addEventListener('click', () => signOut(''));
  $('search').addEventListener('input', () => onSearchInput());
  $('events-filter').addEventListener('input', () => schedule(renderEvents));
  for (const id of ['tasks-state', 'tasks-filter']) {
    for (const type of ['input', 'change']) {
      $(id).addEventListener(type, () => schedule(renderTasks));
    }
  }
  $('migrate-close').addEventListener('click', () => closeMigrate());
  // Esc or the close button: the task goes on, the tasks panel follows it.
  // (The event comes after the fact: a dialog opened again meanwhile is left alone.)
  $('migrate-dialog').addEventListener('close', () => {
    if (state.migrate && !$('migrate-dialog').open) closeMigrate();
  });
  $('vm-create-close').addEventListener('click', () => closeCreate());
  $('vm-create-cancel').addEventListener('click', () => closeCreate());
  $('vm-create-dialog').addEventListener('close', () => {
    if (state.create && !$('vm-create-dialog').open) state.create = null;
  });
  $('vm-create-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    submitCreate();
  });
  for (const type of ['change', 'input']) {
    $('vm-create-boot').addEventListener(type, () => {
      if (state.create) state.create.bootTouched = true;
      syncBoot();
    });
  }
  $('vm-create-mac-random').addEventListener('click', () => {
    $('vm-create-mac').value = randomMac();
  });
  window.addEventListener('hashchange', onRoute);
  // A page shown again after a while: its figures (ages, console) are read again.
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && state.me) {
      if (state.console) fetchConsole(state.console);
      refreshSoon();
    }
  });

  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) {
    $('login-view').hidden = true;
    signIn(saved, true);
  } else {
    showLogin('');
  }
}

init();
