// tern web client (app.js): signs in with an API token, shows a tern center's inventory
// (clusters, hosts, VMs), tasks and events from its REST API (/api/v1), and follows its live
// stream (/api/v1/stream) so the page changes as the center does.
//
// Pages (the URL's hash): the overview (#/), a cluster (#/cluster/NAME: EVC, DRS settings and
// recommendations, "apply all", a new VM), a host (#/host/NAME: health, facts, VMs, entering
// maintenance after its evacuation plan) and a VM (#/vm/NAME: start, stop, migrate, console).
// Operators and admins see the buttons that change things; viewers do not.
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
const REFRESH_DEBOUNCE_MS = 300;
const STREAM_IDLE_MS = 45000; // the center sends a keep-alive every 15 s
const STREAM_BACKOFF_MIN_MS = 500;
const STREAM_BACKOFF_MAX_MS = 8000;
const MIGRATE_POLL_MS = 1500;
const TASK_POLL_MS = 1500;
const RECS_DEBOUNCE_MS = 1000;

const state = {
  session: 0, // bumped at each sign-in and sign-out: late answers of an old session are dropped
  token: null,
  me: null, // {name, role}
  loaded: false, // the inventory was read at least once
  clusters: [],
  hosts: [],
  vms: [],
  tasks: new Map(), // id → Task
  events: [], // newest first
  live: false,
  hellos: 0,
  streamAbort: null,
  refreshTimer: null,
  refreshSeq: 0,
  console: null, // {vm, timer, busy}
  vmBusy: null, // name of the VM an action is being sent for
  migrate: null, // {vm, taskId, poll}
  noticeTimer: null,
  cluster: null, // the open cluster page: {name, info, drs, recs, …} (see openCluster)
  recsTimer: null,
  maint: null, // the maintenance plan being shown: {host, loading, plan, fallback, …}
  maintBusy: null, // name of the host a maintenance request is being sent for
  maintTasks: new Map(), // host → id of the maintenance task started from this page
  applyTasks: new Map(), // cluster → id of the DRS apply task started from this page
  taskPoll: null, // asks for those tasks while the stream is down
  create: null, // the new-VM dialog: {cluster, busy, bootTouched, session}
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
  return state.vms.find((v) => vmName(v) === name) || null;
}

function findHost(name) {
  return state.hosts.find((h) => h.name === name) || null;
}

function findCluster(name) {
  return state.clusters.find((c) => c.name === name) || null;
}

function vmsOn(hostName) {
  return state.vms.filter((v) => v.host === hostName).sort((a, b) => byName(vmName(a), vmName(b)));
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
  $('token').value = '';
  $('login-view').hidden = true;
  $('app-view').hidden = false;
  renderWhoami();
  setLive(false, 'connecting…');
  renderTree();
  onRoute();
  loadAll();
  runStream(state.session);
}

function signOut(message) {
  state.session += 1;
  if (state.streamAbort) state.streamAbort.abort();
  state.streamAbort = null;
  clearTimeout(state.refreshTimer);
  stopConsole();
  closeMigrate();
  closeCreate();
  clearTimeout(state.recsTimer);
  clearInterval(state.taskPoll);
  sessionStorage.removeItem(TOKEN_KEY);
  Object.assign(state, {
    token: null, me: null, loaded: false, clusters: [], hosts: [], vms: [],
    events: [], live: false, vmBusy: null, cluster: null, maint: null, maintBusy: null,
    taskPoll: null,
  });
  state.tasks = new Map();
  state.maintTasks = new Map();
  state.applyTasks = new Map();
  $('tree').replaceChildren();
  $('main').replaceChildren();
  delete $('main').dataset.key;
  $('task-list').replaceChildren();
  $('event-list').replaceChildren();
  notice('');
  showLogin(message);
}

function renderWhoami() {
  const me = state.me;
  $('whoami').textContent = me ? `${me.name} (${me.role})` : '';
  document.body.dataset.role = me ? me.role : '';
}

// ---- loading ----

/** Everything the page shows, read again (at sign-in, on `resync`, after reconnecting). */
function loadAll() {
  refreshInventory().catch((e) => notice(e.message));
  loadTasks().catch((e) => notice(e.message));
  loadEvents().catch((e) => notice(e.message));
}

async function refreshInventory() {
  const seq = ++state.refreshSeq;
  const session = state.session;
  const [clusters, hosts, vms] = await Promise.all([
    api('/clusters'), api('/hosts'), api('/vms'),
  ]);
  // A newer read is under way (it will render), or the user signed out.
  if (seq !== state.refreshSeq || session !== state.session) return;
  state.clusters = clusters || [];
  state.hosts = hosts || [];
  state.vms = vms || [];
  state.loaded = true;
  renderTree();
  renderMain();
}

/** Re-reads hosts and VMs shortly: many stream messages in a burst make one read. */
function refreshSoon() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(() => {
    refreshInventory().catch((e) => notice(e.message));
  }, REFRESH_DEBOUNCE_MS);
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
  const prev = state.tasks.get(t && t.id);
  upsertTask(t);
  if (isDone(t) && (!prev || !isDone(prev))) {
    refreshSoon();
    recsSoon();
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

function renderTasks() {
  const list = $('task-list');
  const tasks = [...state.tasks.values()].sort(byCreatedDesc).slice(0, MAX_TASKS_SHOWN);
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
  const r = currentRoute();
  if (r.view === 'vm') {
    if (!state.console || state.console.vm !== r.name) startConsole(r.name);
  } else {
    stopConsole();
  }
  // A page opened again reads its figures again; a plan left behind is dropped.
  if (r.view === 'cluster') openCluster(r.name);
  else state.cluster = null;
  if (!(r.view === 'host' && state.maint && state.maint.host === r.name)) state.maint = null;
  renderMain();
  $('main').scrollTop = 0;
}

function renderMain() {
  if (!state.me) return;
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

// ---- the inventory tree ----

/** Clusters with their hosts and the VMs that have no (known) host, in name order. */
function clusterGroups() {
  const groups = new Map();
  const group = (name) => {
    if (!groups.has(name)) groups.set(name, { name, cluster: null, hosts: [], loose: [] });
    return groups.get(name);
  };
  for (const c of [...state.clusters].sort((a, b) => byName(a.name, b.name))) {
    group(c.name).cluster = c;
  }
  const hostNames = new Set();
  for (const h of [...state.hosts].sort((a, b) => byName(a.name, b.name))) {
    group(h.cluster || '').hosts.push(h);
    hostNames.add(h.name);
  }
  for (const v of [...state.vms].sort((a, b) => byName(vmName(a), vmName(b)))) {
    if (!v.host || !hostNames.has(v.host)) group(v.cluster || '').loose.push(v);
  }
  return [...groups.values()];
}

function vmTreeItem(v) {
  const name = vmName(v);
  return el('li', null,
    el('a', {
      class: `tree-vm state-${v.actual_state}`,
      href: vmHref(name),
      dataset: { vm: name },
      title: `${name}: ${v.actual_state}`,
    }, el('span', { class: `dot state-${v.actual_state}`, 'aria-hidden': 'true' }), name,
    el('span', { class: 'visually-hidden', text: ` (${v.actual_state})` })));
}

function renderTree() {
  const q = $('search').value.trim().toLowerCase();
  const match = (name) => !q || name.toLowerCase().includes(q);
  const key = q + '\n' + JSON.stringify([
    state.clusters.map((c) => c.name),
    state.hosts.map((h) => [h.name, h.cluster, h.state, isDegraded(h)]),
    state.vms.map((v) => [vmName(v), v.cluster, v.host, v.actual_state]),
    state.loaded,
  ]);
  const tree = $('tree');
  if (tree.dataset.key === key) return;
  tree.dataset.key = key;

  const root = el('ul', { class: 'tree-root' });
  for (const g of clusterGroups()) {
    const children = [];
    for (const h of g.hosts) {
      const vms = vmsOn(h.name).filter((v) => match(vmName(v))).map(vmTreeItem);
      if (!match(h.name) && vms.length === 0) continue;
      const cls = `tree-host state-${h.state}` + (isDegraded(h) ? ' degraded' : '');
      children.push(el('li', null,
        el('a', {
          class: cls, href: hostHref(h.name), dataset: { host: h.name },
          title: `${h.name}: ${h.state}${isDegraded(h) ? ', degraded' : ''}`,
        }, el('span', { class: `dot state-${h.state}`, 'aria-hidden': 'true' }), h.name,
        el('span', { class: 'visually-hidden', text: ` (${h.state}${isDegraded(h) ? ', degraded' : ''})` })),
        vms.length ? el('ul', null, vms) : null));
    }
    for (const v of g.loose) if (match(vmName(v))) children.push(vmTreeItem(v));
    if (!match(g.name) && children.length === 0) continue;
    root.append(el('li', null,
      g.name
        ? el('a', {
          class: 'tree-cluster', href: clusterHref(g.name), dataset: { cluster: g.name },
          title: `cluster ${g.name}`,
        }, g.name)
        : el('span', { class: 'tree-cluster', text: '(no cluster)' }),
      children.length ? el('ul', null, children) : null));
  }
  if (!root.children.length) {
    const text = !state.loaded ? 'Loading…' : q ? 'Nothing matches.' : 'No clusters yet.';
    tree.replaceChildren(el('p', { class: 'muted tree-empty', text }));
  } else {
    tree.replaceChildren(root);
  }
  markTreeCurrent(currentRoute());
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
    el('td', { class: 'num', text: String(vmsOn(h.name).length) })));
  return el('table', { class: 'grid' },
    el('thead', null, el('tr', null,
      el('th', { scope: 'col', text: 'Host' }),
      el('th', { scope: 'col', text: 'State' }),
      el('th', { scope: 'col', text: 'CPU' }),
      el('th', { scope: 'col', text: 'Memory' }),
      el('th', { scope: 'col', class: 'num', text: 'VMs' }))),
    el('tbody', null, rows));
}

// ---- overview ----

function renderOverview() {
  const key = 'overview\n' + JSON.stringify([state.loaded, state.clusters, state.hosts,
    state.vms.map((v) => [vmName(v), v.cluster, v.host, v.actual_state])]);
  showMain(key, buildOverview);
}

function buildOverview() {
  if (!state.loaded) return placeholder('overview', 'Overview', 'Loading…');
  const running = state.vms.filter((v) => v.actual_state === 'running').length;
  const view = el('section', { id: 'overview', class: 'view' },
    el('div', { class: 'view-head' },
      el('h1', { text: 'Overview' }),
      el('span', {
        class: 'muted',
        text: `${state.clusters.length} clusters · ${state.hosts.length} hosts · ` +
          `${state.vms.length} VMs (${running} running)`,
      })));
  const groups = clusterGroups();
  if (!groups.length) view.append(el('p', { class: 'muted', text: 'No clusters yet.' }));
  for (const g of groups) {
    const c = g.cluster;
    const meta = [];
    if (c) {
      meta.push(`EVC ${c.evc_mode || 'none'}`);
      if (c.migration_encryption) meta.push(`migration encryption ${c.migration_encryption}`);
    }
    view.append(el('section', { class: 'card cluster-card', dataset: { cluster: g.name } },
      el('h2', null,
        g.name ? el('a', { href: clusterHref(g.name), text: g.name }) : '(no cluster)',
        el('span', { class: 'muted h-meta', text: meta.join(' · ') })),
      hostTable(g.hosts, 'overview-host'),
      g.loose.length
        ? el('p', { class: 'loose' }, 'Without a host: ',
          g.loose.map((v, i) => [i ? ', ' : '', el('a', { href: vmHref(vmName(v)), text: vmName(v) })]))
        : null));
  }
  return view;
}

// ---- host page ----

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
  const h = findHost(name);

  const st = $('host-state');
  const stKey = JSON.stringify(h ? [h.state, h.health, h.problems] : null);
  if (st.dataset.key !== stKey) {
    st.dataset.key = stKey;
    st.replaceChildren(...(h ? hostStateBadges(h) : [el('span', { class: 'muted', text: '–' })]));
  }

  const details = $('host-details');
  const key = JSON.stringify([state.loaded, h,
    state.vms.filter((v) => v.host === name).map((v) => [vmName(v), v.actual_state, v.desired_state])]);
  if (details.dataset.key !== key) {
    details.dataset.key = key;
    details.replaceChildren(h
      ? buildHostDetails(name, h)
      : el('p', { class: 'muted', text: state.loaded ? `No host is named ${name}.` : 'Loading…' }));
  }
  renderMaintenance(name, h);
}

function buildHostDetails(name, h) {
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
  const vmNames = new Set([...(h.vms || []), ...vmsOn(name).map(vmName)]);
  const vms = [...vmNames].sort(byName);
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
      el('ul', { id: 'host-vms', class: 'plain host-vms' }, vms.map((n) => el('li', null, vmLinkWithState(n, 'host-vm')))),
      vms.length ? null : el('p', { class: 'muted', text: 'No VMs.' })));
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
    const vms = vmsOn(name);
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
    await refreshInventory().catch((e) => notice(e.message));
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
  };
  state.cluster = c;
  loadClusterInfo(c);
  loadRecs(c);
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
  renderMain();
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
          el('div', { id: 'drs-apply-status', class: 'task-status', role: 'status' }))));
    main.replaceChildren(view);
  }
  const c = state.cluster && state.cluster.name === name ? state.cluster : null;
  if (!c) return;
  const listed = findCluster(name);
  const info = c.info || listed;
  const hosts = state.hosts.filter((h) => h.cluster === name).sort((a, b) => byName(a.name, b.name));
  const vms = state.vms.filter((v) => v.cluster === name);

  keyed($('cluster-actions'), [canAct(), !!info], () => canAct() && info
    ? [el('button', {
      id: 'vm-create-open', type: 'button', class: 'primary', 'aria-haspopup': 'dialog',
      text: 'New VM…', onclick: () => openCreate(name),
    })]
    : []);

  const err = $('cluster-error');
  const errText = c.infoError && !info ? c.infoError : '';
  if (err.textContent !== errText) err.textContent = errText;

  keyed($('cluster-summary'), [info, c.infoError, state.loaded, hosts.length,
    vms.map((v) => v.actual_state)], () => {
    if (!info) return [el('p', { class: 'muted', text: c.infoError ? 'Not available.' : 'Loading…' })];
    const running = vms.filter((v) => v.actual_state === 'running').length;
    return [facts([
      ['EVC mode', info.evc_mode || 'none', { id: 'cluster-evc' }],
      ['Migration encryption', info.migration_encryption || 'required'],
      ['Hosts', String(hosts.length)],
      ['VMs', `${vms.length} (${running} running)`],
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

  keyed($('cluster-hosts'), [state.loaded, hosts, vms.map((v) => [vmName(v), v.host, v.actual_state])], () => {
    if (!state.loaded) return [el('p', { class: 'muted', text: 'Loading…' })];
    const loose = vms.filter((v) => !v.host || !findHost(v.host)).map(vmName).sort(byName);
    return [hostTable(hosts, 'cluster-host'),
      loose.length
        ? el('p', { class: 'loose' }, 'Without a host: ', loose.map((n, i) => [i ? ', ' : '', vmLink(n)]))
        : null];
  });

  renderDrs(c);
  renderApplyStatus(name);
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
      el('section', { class: 'card console-card' },
        el('div', { class: 'card-head' },
          el('h2', { text: 'Console' }),
          el('span', { id: 'vm-console-note', class: 'muted', text: 'serial console, refreshed every 3 s' })),
        el('pre', { id: 'vm-console', class: 'console', tabindex: '0', 'aria-label': `Serial console of ${name}` })));
    main.replaceChildren(view);
    if (state.console && state.console.text !== undefined && state.console.vm === name) {
      setConsoleText(state.console.text);
    }
  }
  const vm = findVm(name);
  const key = JSON.stringify([state.loaded, vm, canAct(), state.vmBusy === name]);
  const details = $('vm-details');
  if (details.dataset.key === key) return;
  details.dataset.key = key;
  renderVmActions(name, vm);
  if (!vm) {
    details.replaceChildren(el('p', { class: 'muted', text: state.loaded ? `No VM is named ${name}.` : 'Loading…' }));
    return;
  }
  details.replaceChildren(buildVmDetails(vm));
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

async function openMigrate(name) {
  const vm = findVm(name);
  if (!vm) return;
  closeMigrate();
  const m = { vm: name, taskId: null, poll: null, session: state.session };
  state.migrate = m;
  $('migrate-title').textContent = `Migrate ${name}`;
  const body = $('migrate-body');
  body.replaceChildren(el('p', { id: 'migrate-checking', class: 'muted', text: 'checking…' }));
  const dlg = $('migrate-dialog');
  if (!dlg.open) dlg.showModal();

  const targets = state.hosts
    .filter((h) => h.name !== vm.host)
    .sort((a, b) => (a.cluster === vm.cluster ? 0 : 1) - (b.cluster === vm.cluster ? 0 : 1) || byName(a.name, b.name));
  const verdicts = await Promise.all(targets.map((h) =>
    api(`/vms/${enc(name)}/can-migrate?to=${enc(h.name)}`).then(
      (report) => ({ host: h, report }),
      (e) => ({ host: h, error: e.message }))));
  if (state.migrate !== m) return;

  body.replaceChildren(
    el('p', { class: 'muted', text: `From ${vm.host || '(no host)'}: the pre-checks of each destination.` }),
    targets.length
      ? el('ul', { id: 'migrate-targets', class: 'migrate-targets' }, verdicts.map((v) => migrateTargetRow(m, v)))
      : el('p', { class: 'muted', text: 'There is no other host.' }),
    el('p', { id: 'migrate-error', class: 'error', role: 'alert' }),
    el('div', { id: 'migrate-task' }));
}

function migrateTargetRow(m, { host, report, error }) {
  const ok = !!(report && report.ok);
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
  return el('li', { class: 'migrate-target' + (ok ? ' ok' : ' not-ok'), dataset: { host: host.name } },
    el('div', { class: 'migrate-target-head' },
      el('strong', { text: host.name }),
      el('span', { class: 'muted', text: host.cluster }),
      el('span', null, hostStateBadges(host)),
      el('button', {
        type: 'button', class: 'migrate-to primary small', dataset: { host: host.name },
        disabled: !ok, 'aria-label': `Migrate here: ${m.vm} to ${host.name}`, text: 'Migrate here',
        onclick: () => startMigration(m, host.name),
      })),
    verdict);
}

async function startMigration(m, to) {
  if (state.migrate !== m || m.taskId) return;
  const buttons = [...document.querySelectorAll('#migrate-targets button.migrate-to')];
  const wasEnabled = buttons.filter((b) => !b.disabled);
  for (const b of buttons) b.disabled = true;
  $('migrate-error').textContent = '';
  try {
    const t = await api(`/vms/${enc(m.vm)}/migrate`, { method: 'POST', body: { to } });
    if (state.migrate !== m) return;
    m.taskId = t.id;
    const row = document.querySelector(`#migrate-targets .migrate-target[data-host="${CSS.escape(to)}"]`);
    if (row) row.classList.add('chosen');
    upsertTask(t);
    // The stream may have told of this task before its id was known here.
    renderMigrateTask(state.tasks.get(t.id) || t);
    m.poll = setInterval(() => pollMigrateTask(m), MIGRATE_POLL_MS);
  } catch (e) {
    if (state.migrate !== m) return;
    $('migrate-error').textContent = e.message;
    for (const b of wasEnabled) b.disabled = false;
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
    box.append(prog);
  }
  const done = isDone(t);
  const pct = t.state === 'succeeded' || t.state === 'completed' ? 100 : Number(t.progress) || 0;
  prog.querySelector('progress').value = pct;
  prog.querySelector('.migrate-percent').textContent = `${pct}%`;
  prog.querySelector('.migrate-phase').textContent = t.phase || t.state;
  prog.classList.toggle('done', done);
  if (!done) return;
  if (m.poll) clearInterval(m.poll);
  m.poll = null;

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
  if (m && m.poll) clearInterval(m.poll);
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

  const hostSel = $('vm-create-host');
  hostSel.replaceChildren(el('option', { value: '', text: 'let the center place it' }),
    ...state.hosts.filter((h) => h.cluster === cluster).sort((a, b) => byName(a.name, b.name))
      .map((h) => el('option', {
        value: h.name,
        text: h.state === 'connected' && !isDegraded(h) ? h.name : `${h.name} (${h.state}${isDegraded(h) ? ', degraded' : ''})`,
      })));
  hostSel.value = '';
  $('vm-create-image').replaceChildren(el('option', { value: '', text: 'loading…' }));
  setImageNote('The boot disk is made from it (a linked clone unless “full copy”).', false);
  syncBoot();

  const dlg = $('vm-create-dialog');
  if (!dlg.open) dlg.showModal();
  $('vm-create-name').focus();
  loadImages(cr);
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
  if (vm && vm.spec && !findVm(created)) state.vms.push(vm); // shown at once, read again below
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
  $('search').addEventListener('input', () => renderTree());
  $('events-filter').addEventListener('input', () => schedule(renderEvents));
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
