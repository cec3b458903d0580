// chime web console: plain ES2020, no framework, no build step, no network access
// beyond the coordinator's own /api (see docs/http-api.md).
'use strict';

(() => {
  const TOKEN_KEY = 'chime.adminToken';
  const REFRESH_MS = 2000;
  const FINAL_STATES = new Set(['succeeded', 'failed', 'cancelled', 'timed_out', 'skipped']);
  const ROUTINGS = [
    ['round_robin', 'round robin'],
    ['sharding_broadcast', 'sharding broadcast'],
    ['random', 'random'],
    ['consistent_hash', 'consistent hash'],
    ['least_recently_used', 'least recently used'],
    ['least_loaded', 'least loaded'],
    ['failover', 'failover'],
    ['busy_over', 'busy over'],
    ['first', 'first'],
    ['last', 'last'],
  ];
  const OVERLAPS = [
    ['allow', 'allow (run both)'],
    ['skip', 'skip the new fire'],
    ['buffer_one', 'buffer one (serial)'],
    ['cancel_running', 'cancel the running one'],
  ];
  const MISFIRES = [
    ['fire_once', 'fire once'],
    ['skip', 'skip (report as skipped)'],
    ['fire_all', 'fire all within the catch-up window'],
  ];
  const SCHEDULE_KINDS = [
    ['cron', 'cron'],
    ['fixed_rate', 'fixed rate'],
    ['fixed_delay', 'fixed delay'],
    ['once', 'once'],
    ['manual', 'manual only'],
  ];
  // Field paths the server may name that live under another input here.
  const FIELD_ALIASES = {
    schedule: 'schedule.kind',
    'schedule.cron': 'schedule.expr',
    'schedule.tz': 'schedule.time_zone',
    'schedule.zone': 'schedule.time_zone',
  };

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || '',
    session: null,
    ready: false, // logged in (or no auth) and the app is shown
    gen: 0, // bumps on every navigation; stale async work checks it
    view: null,
    overview: null,
    flash: null,
  };

  // ---------------------------------------------------------------- DOM helpers

  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const PROPS = new Set(['value', 'checked', 'disabled', 'selected', 'hidden', 'open', 'indeterminate']);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === undefined || v === null) continue;
        if (k === 'class') el.className = v;
        else if (k === 'text') el.textContent = v;
        else if (k === 'dataset') Object.assign(el.dataset, v);
        // Through the CSSOM: the coordinator's Content-Security-Policy refuses
        // inline style attributes.
        else if (k === 'style') Object.assign(el.style, v);
        else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
        else if (PROPS.has(k)) el[k] = v;
        else if (v === false) continue;
        else el.setAttribute(k, v === true ? '' : String(v));
      }
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      if (Array.isArray(c)) append(el, c);
      else if (c instanceof Node) el.appendChild(c);
      else el.appendChild(document.createTextNode(String(c)));
    }
    return el;
  }

  function fill(el, ...children) {
    el.replaceChildren();
    return append(el, children);
  }

  const enc = encodeURIComponent;

  // ---------------------------------------------------------------- formatting

  const pad2 = (n) => String(n).padStart(2, '0');

  function isSet(ms) {
    return ms !== null && ms !== undefined && ms !== 0 && Number.isFinite(Number(ms));
  }

  function clock(ms) {
    const d = new Date(Number(ms));
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }

  function fullDate(ms) {
    const d = new Date(Number(ms));
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${clock(ms)}.${String(d.getMilliseconds()).padStart(3, '0')}`;
  }

  // "3 s", "1.5 s", "4 min 2 s", "2 h 5 min", "3 d 4 h"
  function span(ms) {
    ms = Math.abs(Number(ms));
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 10) return `${s.toFixed(1).replace(/\.0$/, '')} s`;
    if (s < 60) return `${Math.round(s)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min${s % 60 >= 1 ? ` ${Math.floor(s % 60)} s` : ''}`;
    const hrs = Math.floor(m / 60);
    if (hrs < 48) return `${hrs} h${m % 60 ? ` ${m % 60} min` : ''}`;
    const days = Math.floor(hrs / 24);
    return `${days} d${hrs % 24 ? ` ${hrs % 24} h` : ''}`;
  }

  function relative(ms, now = Date.now()) {
    const d = Number(ms) - now;
    if (Math.abs(d) < 500) return 'now';
    return d > 0 ? `in ${span(d)}` : `${span(d)} ago`;
  }

  // A time cell: local HH:MM:SS plus relative, "—" when unset.
  function timeEl(ms, opts = {}) {
    if (!isSet(ms)) return h('span', { class: 'muted', title: 'not set' }, '—');
    return h('span', { class: 'time', title: fullDate(ms), 'data-ms': ms },
      h('span', { class: 'clock' }, clock(ms)),
      opts.noRelative ? null : h('span', { class: 'rel' }, relative(ms)));
  }

  function duration(startMs, endMs) {
    if (!isSet(startMs)) return h('span', { class: 'muted' }, '—');
    if (!isSet(endMs)) return h('span', { class: 'muted', title: 'still going' }, `${span(Date.now() - startMs)}…`);
    return h('span', null, span(endMs - startMs));
  }

  function msText(ms) {
    if (ms === null || ms === undefined) return '—';
    return span(ms);
  }

  function stateBadge(st, testid) {
    return h('span', { class: `badge state state-${st || 'unknown'}`, 'data-state': st || '', 'data-testid': testid || 'state' }, (st || '?').replace('_', ' '));
  }

  function scheduleSummary(s) {
    if (!s) return '—';
    switch (s.kind) {
      case 'cron':
        return h('span', null, h('code', null, s.expr), s.time_zone ? h('span', { class: 'muted' }, ` ${s.time_zone}`) : null);
      case 'fixed_rate':
        return `every ${span(s.every_ms)}`;
      case 'fixed_delay':
        return `${span(s.delay_ms)} after each run`;
      case 'once':
        return h('span', null, 'once at ', isSet(s.at_ms) ? h('span', { title: fullDate(s.at_ms) }, fullDate(s.at_ms).slice(0, 19)) : '—');
      case 'manual':
        return h('span', { class: 'muted' }, 'manual only');
      default:
        return s.kind || '—';
    }
  }

  const routingLabel = (r) => (ROUTINGS.find(([v]) => v === r) || [r, r || '—'])[1];

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message, field) {
      super(message);
      this.status = status;
      this.code = code;
      this.field = field;
    }
  }

  async function api(method, path, body, opts = {}) {
    const headers = { Accept: 'application/json' };
    const token = opts.token !== undefined ? opts.token : state.token;
    if (token) headers.Authorization = `Bearer ${token}`;
    const init = { method, headers, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, 'network', `cannot reach the coordinator (${e.message})`);
    }
    const text = await resp.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = null;
      }
    }
    if (resp.ok) return data === null ? {} : data;
    const err = (data && data.error) || {};
    const e = new ApiError(resp.status, err.code || `http_${resp.status}`, err.message || text.trim() || resp.statusText || `HTTP ${resp.status}`, err.field);
    if (resp.status === 401 && !opts.noAuthRedirect) onUnauthenticated(e);
    throw e;
  }

  // What the session's token may do (`/api/session`'s role; without auth, an
  // admin). The console hides what the role may not do; the API refuses it
  // either way (403), so this is a courtesy, not the guard.
  const RANK = { viewer: 0, operator: 1, admin: 2 };
  function may(need) {
    const role = (state.session && state.session.role) || 'admin';
    return (RANK[role] ?? -1) >= RANK[need];
  }
  // `el` when the role may, nothing otherwise.
  const ifMay = (need, el) => (may(need) ? el : null);
  // A token limited to namespaces sees their jobs, runs, workers, dead letters
  // and handlers' settings (the server filters), and no page of what is
  // cluster-wide (overview, alert rules, the audit log).
  const limited = () => !!(state.session && state.session.namespaces);
  const CLUSTER_VIEWS = ['overview', 'alerts', 'audit'];

  function errText(e) {
    if (!(e instanceof ApiError)) return String(e && e.message ? e.message : e);
    if (e.code === 'unavailable') return `Unavailable, retrying: ${e.message}`;
    return e.message;
  }

  // ---------------------------------------------------------------- login

  async function boot() {
    $('#boot').hidden = true;
    $('#login-form').addEventListener('submit', onLogin);
    $('#logout').addEventListener('click', () => logout('Logged out.'));
    window.addEventListener('hashchange', () => navigate());
    setInterval(tick, REFRESH_MS);
    await checkSession();
  }

  async function checkSession(message) {
    let s;
    try {
      s = await api('GET', '/api/session', undefined, { noAuthRedirect: true });
    } catch (e) {
      const boot = $('#boot');
      boot.hidden = false;
      boot.textContent = `Cannot reach the coordinator (${errText(e)}); retrying…`;
      setTimeout(() => checkSession(message), REFRESH_MS);
      return;
    }
    $('#boot').hidden = true;
    state.session = s;
    if (s.auth_required && !s.authenticated) {
      if (state.token) {
        state.token = '';
        sessionStorage.removeItem(TOKEN_KEY);
        message = message || 'The stored token is no longer valid. Log in again.';
      }
      showLogin(message);
      return;
    }
    showApp();
  }

  function showLogin(message, isError = true) {
    state.ready = false;
    state.gen++;
    state.view = null;
    $('#app').hidden = true;
    $('#topbar').hidden = true;
    $('#login').hidden = false;
    const m = $('#login-message');
    m.hidden = !message;
    m.textContent = message || '';
    m.classList.toggle('is-error', !!isError);
    const input = $('#login-token');
    input.value = '';
    input.focus();
  }

  async function onLogin(ev) {
    ev.preventDefault();
    const token = $('#login-token').value.trim();
    const btn = $('#login-submit');
    if (!token) return;
    btn.disabled = true;
    try {
      const s = await api('GET', '/api/session', undefined, { token, noAuthRedirect: true });
      state.session = s;
      if (s.auth_required && !s.authenticated) {
        showLogin('That token was refused.');
        return;
      }
      state.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      showApp();
    } catch (e) {
      showLogin(`Login failed: ${errText(e)}`);
    } finally {
      btn.disabled = false;
    }
  }

  function logout(message) {
    state.token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    if (state.session && state.session.auth_required) showLogin(message, false);
  }

  function onUnauthenticated(e) {
    state.token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(`The coordinator refused the token (${e.message}). Log in again.`);
  }

  function showApp() {
    state.ready = true;
    $('#login').hidden = true;
    $('#topbar').hidden = false;
    $('#app').hidden = false;
    $('#logout').hidden = !(state.session && state.session.auth_required);
    const who = $('#whoami');
    const s = state.session || {};
    who.hidden = !s.auth_required;
    who.textContent = s.auth_required
      ? `${s.name || 'token'} · ${s.role || ''}${s.namespaces ? ` · ${s.namespaces.join(', ')}` : ''}`
      : '';
    who.dataset.role = s.role || '';
    for (const v of CLUSTER_VIEWS) $(`#nav-${v}`).hidden = limited();
    const brand = $('.brand');
    brand.setAttribute('href', limited() ? '#/jobs' : '#/overview');
    if (state.session && state.session.version) brand.title = `chime ${state.session.version}`;
    if (!location.hash || location.hash === '#' || location.hash === '#/') {
      history.replaceState(null, '', limited() ? '#/jobs' : '#/overview');
    }
    if (limited() && CLUSTER_VIEWS.some((v) => location.hash.startsWith(`#/${v}`))) {
      history.replaceState(null, '', '#/jobs');
    }
    navigate();
  }

  // ---------------------------------------------------------------- routing

  function parseRoute() {
    const raw = location.hash.replace(/^#\/?/, '');
    const q = raw.indexOf('?');
    const path = q >= 0 ? raw.slice(0, q) : raw;
    const query = new URLSearchParams(q >= 0 ? raw.slice(q + 1) : '');
    const parts = path.split('/').filter(Boolean).map((p) => {
      try { return decodeURIComponent(p); } catch (_) { return p; }
    });
    const [section = 'overview', arg] = parts;
    switch (section) {
      case 'overview': return { section, make: overviewView };
      case 'jobs':
        if (arg === undefined) return { section, make: jobsView };
        if (arg === 'new' && !query.has('edit')) return { section, make: (root, gen) => jobFormView(root, gen, null) };
        return { section, make: (root, gen) => jobFormView(root, gen, arg) };
      case 'runs':
        if (arg === undefined) return { section, make: (root, gen) => runsView(root, gen, query.get('job') || '') };
        return { section, make: (root, gen) => runView(root, gen, arg) };
      case 'queues': return { section, make: queuesView };
      case 'config': return { section, make: configView };
      case 'audit': return { section, make: auditView };
      case 'alerts': return { section, make: alertsView };
      default: return { section: 'overview', make: overviewView };
    }
  }

  const jobHref = (name) => (name === 'new' ? '#/jobs/new?edit' : `#/jobs/${enc(name)}`);
  const runHref = (id) => `#/runs/${enc(id)}`;

  function navigate() {
    if (!state.ready) return;
    closeDialogs();
    const route = parseRoute();
    const gen = ++state.gen;
    for (const a of $$('[data-nav]')) a.classList.toggle('active', a.dataset.nav === route.section);
    showStatus(null);
    renderFlash();
    $('#refresh-state').textContent = '';
    const root = $('#view');
    root.replaceChildren();
    root.dataset.view = route.section;
    delete root.dataset.loaded;
    const view = route.make(root, gen) || {};
    view.gen = gen;
    state.view = view;
    refreshView(view);
    refreshBadge();
    window.scrollTo(0, 0);
  }

  const current = (gen) => state.ready && gen === state.gen;

  async function refreshView(view) {
    if (!view.refresh || view.busy) return;
    view.busy = true;
    try {
      await view.refresh();
      if (current(view.gen)) {
        showStatus(null);
        view.loaded = true;
        $('#view').dataset.loaded = 'true';
      }
    } catch (e) {
      if (e.status === 401) return;
      if (current(view.gen)) showStatus(errText(e), true);
    } finally {
      view.busy = false;
    }
  }

  function tick() {
    if (!state.ready || document.hidden) return;
    const now = Date.now();
    for (const el of $$('.time[data-ms] .rel')) el.textContent = relative(Number(el.parentNode.dataset.ms), now);
    const view = state.view;
    const editing = anyDialogOpen() || (view && view.editing && view.editing());
    const rs = $('#refresh-state');
    rs.textContent = editing ? 'auto-refresh paused while editing' : '';
    if (editing) return;
    if (view) refreshView(view);
    if (!view || !view.providesOverview) refreshBadge();
  }

  async function refreshBadge() {
    if (state.view && state.view.providesOverview) return;
    // The overview is cluster-wide: a token limited to namespaces is refused it.
    if (limited()) return;
    try {
      const o = await api('GET', '/api/overview');
      updateBadge(o);
    } catch (_) {
      // the view shows errors; the badge keeps its last value
    }
  }

  function updateBadge(o) {
    state.overview = o;
    const b = $('#leader-badge');
    if (!o.leader) {
      b.textContent = 'no leader known';
      b.className = 'badge badge-warn';
    } else if (o.is_leader) {
      b.textContent = 'leader: this replica';
      b.className = 'badge badge-ok';
    } else {
      b.textContent = `follower · leader ${o.leader}`;
      b.className = 'badge badge-info';
    }
    b.dataset.leader = o.leader || '';
    b.dataset.isLeader = o.is_leader ? 'true' : 'false';
    $('#replica').textContent = o.this ? `this: ${o.this}` : '';
  }

  function showStatus(text, isError) {
    const s = $('#status');
    s.hidden = !text;
    s.textContent = text || '';
    s.classList.toggle('is-error', !!isError);
  }

  // A message shown above the view now (flash) or after the next navigation
  // (flashNext); it stays until the view changes.
  function flash(kind, ...content) {
    state.flash = { kind, content };
    renderFlash();
  }

  function flashNext(kind, ...content) {
    state.flash = { kind, content };
  }

  function renderFlash() {
    const f = $('#flash');
    const msg = state.flash;
    state.flash = null;
    if (!msg) {
      f.hidden = true;
      f.replaceChildren();
      return;
    }
    f.hidden = false;
    f.className = `flash flash-${msg.kind}`;
    fill(f, h('span', { class: 'flash-text' }, msg.content),
      h('button', { type: 'button', class: 'btn-link flash-close', 'aria-label': 'Dismiss', onclick: () => { f.hidden = true; } }, '×'));
  }

  // ---------------------------------------------------------------- dialogs

  function anyDialogOpen() {
    return $$('dialog').some((d) => d.open);
  }

  function closeDialogs() {
    for (const d of $$('dialog')) {
      if (d.open) d.close();
      d.remove();
    }
  }

  // A modal dialog; `onOk` may throw to keep it open (its message is shown).
  function dialog({ id, title, body, okLabel = 'OK', okClass = 'btn-primary', onOk }) {
    const errBox = h('div', { class: 'dialog-error', role: 'alert', 'data-testid': 'dialog-error', hidden: true });
    const ok = h('button', { type: 'submit', class: `btn ${okClass}`, id: id ? `${id}-submit` : null, 'data-testid': id ? `${id}-submit` : 'dialog-ok' }, okLabel);
    const cancel = h('button', { type: 'button', class: 'btn', id: id ? `${id}-cancel` : null, 'data-testid': id ? `${id}-cancel` : 'dialog-cancel' }, 'Cancel');
    const form = h('form', { method: 'dialog', class: 'dialog-form' },
      h('h2', null, title), errBox, body, h('div', { class: 'dialog-actions' }, cancel, ok));
    const dlg = h('dialog', { id, class: 'dialog', 'data-testid': id || 'dialog' }, form);
    cancel.addEventListener('click', () => dlg.close());
    dlg.addEventListener('close', () => dlg.remove());
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      ok.disabled = true;
      errBox.hidden = true;
      try {
        await onOk(dlg);
        if (dlg.open) dlg.close();
      } catch (e) {
        if (e.status === 401) return;
        errBox.hidden = false;
        errBox.textContent = errText(e);
      } finally {
        ok.disabled = false;
      }
    });
    document.body.appendChild(dlg);
    dlg.showModal();
    const first = $('textarea, input', dlg);
    if (first) first.focus();
    return dlg;
  }

  function confirmDialog(id, title, text, okLabel, onOk) {
    return dialog({ id, title, body: h('p', null, text), okLabel, okClass: 'btn-danger', onOk });
  }

  // ---------------------------------------------------------------- tables

  function table(testid, headers, opts = {}) {
    const tbody = h('tbody');
    const t = h('table', { class: `table ${opts.class || ''}`, 'data-testid': testid },
      h('thead', null, h('tr', null, headers.map((c) => h('th', typeof c === 'string' ? null : c.attrs, typeof c === 'string' ? c : c.label)))),
      tbody);
    return { el: h('div', { class: 'table-wrap' }, t), table: t, tbody, cols: headers.length };
  }

  function emptyRow(t, text) {
    return h('tr', { class: 'empty' }, h('td', { colspan: t.cols }, text));
  }

  function section(title, ...content) {
    return h('section', { class: 'panel' }, title ? h('h2', null, title) : null, content);
  }

  function runRows(t, runs, now) {
    if (!runs.length) {
      fill(t.tbody, emptyRow(t, 'No runs yet.'));
      return;
    }
    fill(t.tbody, runs.map((r) => {
      const shards = r.shards || [];
      const done = shards.filter((s) => FINAL_STATES.has(s.state)).length;
      return h('tr', { 'data-run': r.run_id, 'data-job': r.job, 'data-cause': r.cause, 'data-state': r.state, 'data-scheduled-ms': r.scheduled_at_ms, 'data-testid': 'run-row', class: 'clickable', onclick: (ev) => { if (!ev.target.closest('a')) location.hash = runHref(r.run_id); } },
        h('td', null, h('a', { href: runHref(r.run_id), 'data-testid': 'run-link', title: r.run_id }, r.job)),
        h('td', null, h('span', { class: `cause cause-${r.cause}`, 'data-testid': 'run-cause' }, r.cause)),
        h('td', null, stateBadge(r.state, 'run-state')),
        h('td', null, timeEl(r.scheduled_at_ms)),
        h('td', null, timeEl(r.fired_at_ms)),
        h('td', { class: 'num' }, duration(r.fired_at_ms, r.finished_at_ms)),
        h('td', { class: 'num', 'data-testid': 'run-shards' }, shards.length ? `${done}/${shards.length}` : '—'));
    }));
    void now;
  }

  const RUN_HEADERS = ['Job', 'Cause', 'State', 'Scheduled', 'Fired', { label: 'Duration', attrs: { class: 'num' } }, { label: 'Shards done', attrs: { class: 'num' } }];


  // ---------------------------------------------------------------- charts
  // The last hour from /api/history, as small SVG line charts (no library: the
  // console has no build step and its CSP allows no outside script). Each chart
  // is rebuilt on the page's refresh; a path carries how many points it drew
  // (data-points) and how many were above zero (data-nonzero), which the
  // browser test reads.

  const SVG_NS = 'http://www.w3.org/2000/svg';
  const CW = 320; // viewBox width
  const CH = 110; // viewBox height
  const PAD = { l: 38, r: 8, t: 8, b: 18 };

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
    for (const c of children) if (c) el.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    return el;
  }

  // 1234 → "1.2k"; small rates keep a decimal.
  function shortNum(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return '—';
    const a = Math.abs(v);
    if (a >= 1e6) return `${(v / 1e6).toFixed(a >= 1e7 ? 0 : 1)}M`;
    if (a >= 1e3) return `${(v / 1e3).toFixed(a >= 1e4 ? 0 : 1)}k`;
    if (a >= 10 || Number.isInteger(v)) return String(Math.round(v));
    return v.toFixed(1);
  }

  // A "nice" upper bound for the y axis: 1, 2, 5 × 10^n.
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  // The charts each page shows: series read from the history answer.
  const CHARTS = {
    items: {
      title: 'Items per second',
      series: [['enqueued', (x) => x.enqueued_per_s], ['fired', (x) => x.fired_per_s], ['failed', (x) => x.failed_per_s]],
      fmt: (v) => `${shortNum(v)}/s`,
    },
    lag: { title: 'Item lag p99', series: [['p99', (x) => x.lag_p99_ms]], fmt: (v) => msText(v), unit: 'ms', minTop: 10 },
    depth: { title: 'Queue depth', series: [['pending', (x) => x.depth]], fmt: (v) => shortNum(v) },
    age: { title: 'Oldest due age', series: [['oldest due', (x) => x.oldest_due_age_ms]], fmt: (v) => msText(v), unit: 'ms', minTop: 1000 },
    jobs: {
      title: 'Job runs per minute',
      series: [['fired', (x) => x.job_fires_per_min], ['failed', (x) => x.runs_failed_per_min]],
      fmt: (v) => shortNum(v),
      minutes: true,
    },
    workers: { title: 'Live workers', series: [['workers', (x) => x.workers]], fmt: (v) => shortNum(v) },
  };

  // A history that cannot be read leaves the page's other numbers shown.
  function chartFailed(e) {
    if (e && e.status === 401) throw e;
  }

  // The window the charts show (minutes), kept for this tab across pages.
  const RANGE_KEY = 'chime.chartMinutes';
  const RANGES = [5, 15, 60];
  let chartMinutes = RANGES.includes(Number(sessionStorage.getItem(RANGE_KEY))) ? Number(sessionStorage.getItem(RANGE_KEY)) : 60;

  function chartGrid(testid, names) {
    // A new page: no pointer rests on its charts yet.
    for (const k of Object.keys(chartHover)) delete chartHover[k];
    const el = h('div', { class: `charts charts-${names.length}`, 'data-testid': testid });
    const note = h('span', { class: 'muted small chart-note' });
    let lastGen = null;
    const buttons = RANGES.map((m) => h('button', {
      type: 'button', class: 'btn btn-small', id: `chart-range-${m}`, 'data-testid': `chart-range-${m}`, 'data-minutes': m,
      onclick: () => {
        chartMinutes = m;
        sessionStorage.setItem(RANGE_KEY, String(m));
        mark();
        if (lastGen !== null) grid.refresh(lastGen).catch(chartFailed);
      },
    }, m === 60 ? '1 h' : `${m} min`));
    const mark = () => buttons.forEach((b) => b.classList.toggle('active', Number(b.dataset.minutes) === chartMinutes));
    mark();
    const wrap = h('section', { class: 'panel' },
      h('div', { class: 'panel-head' }, h('h2', null, 'Activity'), h('div', { class: 'toolbar' }, note, buttons)), el);
    const grid = {
      el: wrap,
      async refresh(gen) {
        lastGen = gen;
        const minutes = chartMinutes;
        const x = await api('GET', `/api/history?minutes=${minutes}`);
        if (!current(gen)) return;
        if (x.available === false) {
          wrap.hidden = true;
          return;
        }
        wrap.hidden = false;
        el.dataset.minutes = String(minutes);
        note.textContent = `family ${x.family} · last ${minutes === 60 ? 'hour' : `${minutes} min`} · 10-s buckets`;
        fill(el, names.map((n) => chart(n, CHARTS[n], x)));
      },
    };
    return grid;
  }

  // Where the pointer rests on each chart (viewBox x), across refreshes.
  const chartHover = {};

  function chart(name, spec, x) {
    const ts = spec.minutes ? (x.minute_t || []) : (x.t || []);
    const step = spec.minutes ? 60000 : (x.bucket_ms || 10000);
    const lines = spec.series.map(([label, get]) => [label, get(x) || []]);
    // Every chart spans the window of the 10-s buckets; per-minute points sit at
    // their minute's middle (the first and the current minute may be partial).
    const base = x.t || [];
    const t0 = base.length ? base[0] : Date.now() - 3600000;
    const t1 = base.length ? base[base.length - 1] + (x.bucket_ms || 10000) : Date.now();
    let max = 0;
    for (const [, vs] of lines) for (const v of vs) if (v !== null && v > max) max = v;
    const top = niceMax(Math.max(max, spec.minTop || 0));
    const W = CW - PAD.l - PAD.r;
    const H = CH - PAD.t - PAD.b;
    const X = (t) => PAD.l + Math.min(1, Math.max(0, (t + step / 2 - t0) / Math.max(1, t1 - t0))) * W;
    const Y = (v) => PAD.t + H - (v / top) * H;
    const g = svg('svg', { viewBox: `0 0 ${CW} ${CH}`, class: 'chart-svg', role: 'img', 'aria-label': spec.title });
    // Axes: three horizontal rules (0, half, top) and the time marks.
    for (const f of [0, 0.5, 1]) {
      const y = Y(top * f);
      g.appendChild(svg('line', { x1: PAD.l, x2: CW - PAD.r, y1: y, y2: y, class: f === 0 ? 'axis' : 'grid' }));
      g.appendChild(svg('text', { x: PAD.l - 4, y: y + 3, class: 'tick', 'text-anchor': 'end' }, spec.unit === 'ms' ? msText(top * f) : shortNum(top * f)));
    }
    const mins = Math.round((t1 - t0) / 60000);
    for (const [f, label] of [[0, `−${mins} min`], [0.5, `−${Math.round(mins / 2)} min`], [1, 'now']]) {
      g.appendChild(svg('text', { x: PAD.l + f * W, y: CH - 4, class: 'tick', 'text-anchor': f === 0 ? 'start' : f === 1 ? 'end' : 'middle' }, label));
    }
    lines.forEach(([label, vs], i) => {
      let d = '';
      let area = '';
      let points = 0;
      let nonzero = 0;
      let run = [];
      const flush = () => {
        if (!run.length) return;
        d += run.map(([px, py], k) => `${k ? 'L' : 'M'}${px.toFixed(1)},${py.toFixed(1)}`).join('');
        if (i === 0) area += `M${run[0][0].toFixed(1)},${Y(0).toFixed(1)}${run.map(([px, py]) => `L${px.toFixed(1)},${py.toFixed(1)}`).join('')}L${run[run.length - 1][0].toFixed(1)},${Y(0).toFixed(1)}Z`;
        run = [];
      };
      vs.forEach((v, k) => {
        if (v === null || v === undefined || k >= ts.length) {
          flush();
          return;
        }
        points += 1;
        if (v > 0) nonzero += 1;
        run.push([X(ts[k]), Y(v)]);
      });
      flush();
      if (area) g.appendChild(svg('path', { d: area, class: `area s${i}` }));
      g.appendChild(svg('path', { d: d || 'M0,0', class: `line s${i}`, 'data-series': label, 'data-points': points, 'data-nonzero': nonzero }));
    });
    // Hover: the values at the bucket under the pointer.
    const cursor = svg('line', { y1: PAD.t, y2: PAD.t + H, class: 'cursor', visibility: 'hidden' });
    g.appendChild(cursor);
    const last = (vs) => {
      for (let k = vs.length - 1; k >= 0; k -= 1) if (vs[k] !== null && vs[k] !== undefined) return vs[k];
      return null;
    };
    const valueLine = h('div', { class: 'chart-values', 'data-testid': `chart-${name}-values` });
    const show = (k) => fill(valueLine,
      k === null ? null : h('span', { class: 'muted' }, `${clock(ts[k])} `),
      lines.map(([label, vs], i) => h('span', { class: `chart-key s${i}` }, `${label} ${spec.fmt(k === null ? last(vs) : vs[k])}`)));
    show(null);
    const hit = svg('rect', { x: PAD.l, y: PAD.t, width: W, height: H, class: 'hit' });
    const pointAt = (px) => {
      if (!ts.length) return;
      let k = 0;
      ts.forEach((t, i) => {
        if (Math.abs(X(t) - px) < Math.abs(X(ts[k]) - px)) k = i;
      });
      cursor.setAttribute('x1', X(ts[k]));
      cursor.setAttribute('x2', X(ts[k]));
      cursor.setAttribute('visibility', 'visible');
      show(k);
    };
    hit.addEventListener('mousemove', (e) => {
      const r = g.getBoundingClientRect();
      chartHover[name] = ((e.clientX - r.left) / Math.max(1, r.width)) * CW;
      pointAt(chartHover[name]);
    });
    hit.addEventListener('mouseleave', () => {
      delete chartHover[name];
      cursor.setAttribute('visibility', 'hidden');
      show(null);
    });
    g.appendChild(hit);
    // A refresh rebuilds the chart under a resting pointer: keep showing its point.
    if (chartHover[name] !== undefined) pointAt(chartHover[name]);
    return h('div', { class: 'chart', 'data-testid': `chart-${name}`, 'data-chart': name },
      h('div', { class: 'chart-head' }, h('span', { class: 'card-title' }, spec.title), valueLine), g);
  }

  // ---------------------------------------------------------------- overview

  function overviewView(root, gen) {
    const cards = h('div', { class: 'cards', 'data-testid': 'overview-cards' });
    const workers = table('workers-table', ['Worker', 'Group', 'Handlers', 'Load', 'Last heartbeat', 'Connected', 'State']);
    const runs = table('recent-runs', RUN_HEADERS);
    const workersTitle = h('h2', null, 'Workers');
    const charts = chartGrid('overview-charts', ['items', 'lag', 'depth', 'age', 'jobs', 'workers']);
    fill(root,
      h('div', { class: 'page-head' }, h('h1', null, 'Overview')),
      cards,
      charts.el,
      h('section', { class: 'panel' }, workersTitle, workers.el),
      section('Recent runs', runs.el));

    const card = (title, testid, main, ...rest) => h('div', { class: 'card', 'data-testid': testid },
      h('div', { class: 'card-title' }, title), h('div', { class: 'card-main' }, main), rest.length ? h('div', { class: 'card-sub' }, rest) : null);

    return {
      providesOverview: true,
      async refresh() {
        const o = await api('GET', '/api/overview');
        if (!current(gen)) return;
        updateBadge(o);
        const q = o.queues || {};
        const lag = o.trigger_lag_ms || {};
        const jobs = o.jobs || {};
        fill(cards,
          card('Leader', 'card-leader', o.leader || h('span', { class: 'warn-text' }, 'unknown'),
            o.is_leader ? h('span', { class: 'badge badge-ok' }, 'this replica leads') : h('span', { class: 'badge badge-info' }, 'this replica follows')),
          card('This replica', 'card-this', o.this || '—', `fence ${o.fence ?? '—'}`),
          card('Jobs', 'card-jobs', String(jobs.total ?? 0), `${jobs.paused ?? 0} paused`),
          q.available === false
            ? card('Delayed items', 'card-queues', h('span', { class: 'muted' }, 'no delay store'))
            : card('Delayed items', 'card-queues', `${q.pending ?? 0} pending`,
              `${q.count ?? '?'} queues · ${q.due_now ?? 0} due now · ${q.in_flight ?? 0} in flight · `,
              h('span', { class: q.dead ? 'warn-text' : null }, `${q.dead ?? 0} dead`),
              q.waiting ? h('span', { class: 'warn-text', 'data-testid': 'overview-waiting' }, ` · ${q.waiting} waiting for a handler`) : null,
              isSet(q.oldest_due_ms) ? h('span', null, ' · oldest due ', relative(q.oldest_due_ms, o.now_ms || Date.now())) : null),
          card('Fire lag', 'card-lag', lag.p50 === null || lag.p50 === undefined ? h('span', { class: 'muted' }, 'no runs yet') : `p50 ${msText(lag.p50)}`,
            lag.p99 === null || lag.p99 === undefined ? null : `p99 ${msText(lag.p99)} · max ${msText(lag.max)}`));

        const ws = o.workers || [];
        workersTitle.textContent = `Workers (${ws.length})`;
        const now = o.now_ms || Date.now();
        if (!ws.length) fill(workers.tbody, emptyRow(workers, 'No worker is connected.'));
        else {
          fill(workers.tbody, ws.map((w) => {
            const cap = w.capacity || 0;
            const pct = cap ? Math.min(100, Math.round((100 * (w.running || 0)) / cap)) : 0;
            const age = isSet(w.last_heartbeat_ms) ? now - w.last_heartbeat_ms : null;
            return h('tr', { 'data-worker': w.worker_id, 'data-testid': 'worker-row' },
              h('td', null, h('strong', null, w.worker_id)),
              h('td', null, w.group),
              h('td', { class: 'handlers' }, (w.handlers || []).map((x) => h('code', { class: 'chip' }, x))),
              h('td', null, h('div', { class: 'load', title: `${w.running}/${cap} running (${pct}%)` },
                h('div', { class: 'load-bar' }, h('div', { class: `load-fill${pct >= 90 ? ' hot' : ''}`, style: { width: `${pct}%` } })),
                h('span', { class: 'load-text' }, `${w.running ?? 0}/${cap}`))),
              h('td', { class: age !== null && age > 6000 ? 'warn-text' : null, title: isSet(w.last_heartbeat_ms) ? fullDate(w.last_heartbeat_ms) : '' }, age === null ? '—' : `${span(Math.max(0, age))} ago`),
              h('td', null, timeEl(w.connected_at_ms)),
              h('td', null, w.draining ? h('span', { class: 'badge badge-warn' }, 'draining') : h('span', { class: 'badge badge-ok' }, 'live')));
          }));
        }
        runRows(runs, o.recent_runs || []);
        await charts.refresh(gen).catch(chartFailed);
      },
    };
  }

  // Namespaces: the part of a name before its '/', `default` without one.
  const nsOf = (name) => (name.includes('/') ? name.split('/')[0] : 'default');

  // ---------------------------------------------------------------- jobs list

  function jobsView(root, gen) {
    const t = table('jobs-table', ['Name', 'Group', 'Handler', 'Schedule', 'Routing', 'Next fire', 'Last fire', 'State', { label: 'Actions', attrs: { class: 'actions' } }]);
    const filter = h('input', { id: 'jobs-filter', type: 'search', placeholder: 'Filter by name, group or handler', 'data-testid': 'jobs-filter', 'aria-label': 'Filter jobs' });
    const nsSel = h('select', { id: 'jobs-namespace', 'data-testid': 'jobs-namespace', 'aria-label': 'Namespace', hidden: true });
    const count = h('span', { class: 'muted' });
    let jobs = [];
    filter.addEventListener('input', () => render());
    nsSel.addEventListener('change', () => render());

    fill(root,
      h('div', { class: 'page-head' }, h('h1', null, 'Jobs ', count),
        h('div', { class: 'toolbar' }, nsSel, filter, ifMay('admin', h('a', { href: '#/jobs/new', id: 'job-new', class: 'btn btn-primary', 'data-testid': 'job-new' }, 'New job')))),
      section(null, t.el));

    async function act(job, what) {
      try {
        await api('POST', `/api/jobs/${enc(job.name)}/${what}`);
        flash('ok', `${what === 'pause' ? 'Paused' : 'Resumed'} ${job.name}.`);
        await view.refresh();
      } catch (e) {
        if (e.status !== 401) flash('error', `Could not ${what} ${job.name}: ${errText(e)}`);
      }
    }

    function trigger(job) {
      const params = h('textarea', { id: 'trigger-params', 'data-testid': 'trigger-params', 'data-field': 'params', rows: 4, placeholder: job.params ? `empty: the job's params (${job.params})` : "empty: the job's params" });
      dialog({
        id: 'trigger-dialog',
        title: `Trigger ${job.name}`,
        okLabel: 'Trigger now',
        body: h('div', { class: 'field' }, h('label', { for: 'trigger-params' }, 'Params for this run'), params,
          h('div', { class: 'hint' }, 'Given to every shard of this run only.')),
        async onOk() {
          const body = params.value === '' ? {} : { params: params.value };
          const run = await api('POST', `/api/jobs/${enc(job.name)}/trigger`, body);
          flash('ok', `Triggered ${job.name}: `, h('a', { href: runHref(run.run_id), 'data-testid': 'flash-run-link', 'data-run': run.run_id }, run.run_id));
          view.refresh().catch(() => {});
        },
      });
    }

    function remove(job) {
      confirmDialog('delete-dialog', `Delete ${job.name}?`, 'The job stops firing and its definition is removed. Runs already recorded stay in the history.', 'Delete', async () => {
        await api('DELETE', `/api/jobs/${enc(job.name)}`);
        flash('ok', `Deleted ${job.name}.`);
        view.refresh().catch(() => {});
      });
    }

    function render() {
      // The namespace choice lists those the jobs have; it shows once there are two.
      const spaces = [...new Set(jobs.map((j) => nsOf(j.name)))].sort();
      const chosen = nsSel.value;
      fill(nsSel, h('option', { value: '' }, 'All namespaces'), spaces.map((n) => h('option', { value: n }, n)));
      nsSel.value = spaces.includes(chosen) ? chosen : '';
      nsSel.hidden = spaces.length < 2;
      const f = filter.value.trim().toLowerCase();
      const inNs = nsSel.value ? jobs.filter((j) => nsOf(j.name) === nsSel.value) : jobs;
      const shown = f ? inNs.filter((j) => [j.name, j.group, j.handler].some((x) => (x || '').toLowerCase().includes(f))) : inNs;
      count.textContent = `(${jobs.length}${f ? `, ${shown.length} shown` : ''})`;
      if (!shown.length) {
        fill(t.tbody, emptyRow(t, jobs.length ? 'No job matches the filter.' : 'No jobs yet. Create one with "New job".'));
        return;
      }
      fill(t.tbody, shown.map((j) => h('tr', { 'data-job': j.name, 'data-testid': 'job-row', 'data-paused': j.paused ? 'true' : 'false' },
        h('td', null, h('a', { href: jobHref(j.name), class: 'job-name' }, j.name)),
        h('td', null, j.group),
        h('td', null, h('code', null, j.handler)),
        h('td', null, scheduleSummary(j.schedule)),
        h('td', null, routingLabel(j.routing), j.routing === 'sharding_broadcast' ? h('span', { class: 'muted' }, ` · ${j.shard_count ? `${j.shard_count} shards` : 'per worker'}`) : null),
        h('td', null, j.paused ? h('span', { class: 'muted' }, '—') : timeEl(j.next_fire_ms)),
        h('td', null, timeEl(j.last_fire_ms)),
        h('td', null, j.paused ? h('span', { class: 'badge badge-warn', 'data-testid': 'paused-marker' }, 'paused') : h('span', { class: 'badge badge-ok', 'data-testid': 'active-marker' }, 'active')),
        h('td', { class: 'actions' },
          ifMay('operator', j.paused
            ? h('button', { type: 'button', class: 'btn btn-small', 'data-action': 'resume', onclick: () => act(j, 'resume') }, 'Resume')
            : h('button', { type: 'button', class: 'btn btn-small', 'data-action': 'pause', onclick: () => act(j, 'pause') }, 'Pause')),
          ifMay('operator', h('button', { type: 'button', class: 'btn btn-small', 'data-action': 'trigger', onclick: () => trigger(j) }, 'Trigger')),
          h('a', { href: jobHref(j.name), class: 'btn btn-small', 'data-action': 'edit' }, may('admin') ? 'Edit' : 'View'),
          h('a', { href: `#/runs?job=${enc(j.name)}`, class: 'btn btn-small', 'data-action': 'runs' }, 'Runs'),
          ifMay('admin', h('button', { type: 'button', class: 'btn btn-small btn-danger-ghost', 'data-action': 'delete', onclick: () => remove(j) }, 'Delete'))))));
    }

    const view = {
      async refresh() {
        const r = await api('GET', '/api/jobs');
        if (!current(gen)) return;
        jobs = r.jobs || [];
        render();
      },
    };
    return view;
  }

  // ---------------------------------------------------------------- job form

  function toLocalInput(ms) {
    if (!isSet(ms)) return '';
    const d = new Date(Number(ms));
    return `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}T${clock(ms)}`;
  }

  function jobFormView(root, gen, name) {
    const isNew = name === null;
    let version = null;
    let gone = false;
    const inputs = {}; // path -> element
    const summary = h('div', { id: 'job-errors', class: 'form-errors', role: 'alert', 'data-testid': 'job-errors', hidden: true });

    const idOf = (path) => `job-${path.replace(/[._]/g, '-')}`;

    function field(path, label, control, hint, opts = {}) {
      control.id = control.id || idOf(path);
      control.dataset.field = path;
      control.dataset.testid = control.id;
      control.setAttribute('data-testid', control.id);
      inputs[path] = control;
      const err = h('div', { class: 'field-error', 'data-error-for': path, 'data-testid': 'field-error', id: `${control.id}-error`, role: 'alert', hidden: true });
      control.setAttribute('aria-describedby', err.id);
      return h('div', { class: `field ${opts.wide ? 'field-wide' : ''}`, 'data-field-wrap': path },
        control.type === 'checkbox'
          ? h('label', { class: 'check' }, control, ` ${label}`)
          : [h('label', { for: control.id }, label, opts.required ? h('span', { class: 'req', title: 'required' }, ' *') : null), control],
        hint ? h('div', { class: 'hint' }, hint) : null,
        err);
    }

    const text = (attrs = {}) => h('input', Object.assign({ type: 'text', autocomplete: 'off', spellcheck: 'false' }, attrs));
    const num = (attrs = {}) => h('input', Object.assign({ type: 'number', min: '0', step: '1', inputmode: 'numeric', placeholder: '0' }, attrs));
    const when = () => h('input', { type: 'datetime-local', step: '1' });
    const select = (opts) => h('select', null, opts.map(([v, l]) => h('option', { value: v }, l)));
    const area = (attrs = {}) => h('textarea', Object.assign({ rows: 3, spellcheck: 'false' }, attrs));
    const msHint = (path) => {
      const el = h('span', { class: 'ms-hint' });
      queueMicrotask(() => {
        const upd = () => {
          const v = inputs[path].value.trim();
          el.textContent = /^\d+$/.test(v) && Number(v) > 0 ? ` = ${span(Number(v))}` : '';
        };
        inputs[path].addEventListener('input', upd);
        upd();
      });
      return el;
    };

    const saveBtn = h('button', { type: 'submit', id: 'job-save', class: 'btn btn-primary', 'data-testid': 'job-save' }, isNew ? 'Create job' : 'Save changes');
    const meta = h('div', { class: 'job-meta muted', 'data-testid': 'job-meta' });
    const form = h('form', { id: 'job-form', class: 'form', 'data-testid': 'job-form', novalidate: true, autocomplete: 'off' },
      summary,
      h('fieldset', null, h('legend', null, 'Job'),
        h('div', { class: 'grid' },
          field('name', 'Name', text({ maxlength: 128, pattern: '[A-Za-z0-9._:-]+' }), 'Unique; letters, digits, . _ : -', { required: true }),
          field('group', 'Worker group', text({ list: 'known-groups' }), 'Workers of this group run it', { required: true }),
          field('handler', 'Handler', text({ list: 'known-handlers' }), 'Handler name on the workers', { required: true }),
          field('paused', 'Paused (does not fire)', h('input', { type: 'checkbox' })))),
      h('fieldset', null, h('legend', null, 'Schedule'),
        h('div', { class: 'grid' },
          field('schedule.kind', 'Kind', select(SCHEDULE_KINDS)),
          field('schedule.expr', 'Cron expression', text({ placeholder: '0 */5 * * * *' }), 'sec min hour day month weekday (seconds optional)', { kind: 'cron' }),
          field('schedule.time_zone', 'Time zone', text({ placeholder: 'UTC', list: 'known-zones' }), 'IANA name, empty for UTC', { kind: 'cron' }),
          field('schedule.every_ms', 'Every (ms)', num({ placeholder: '5000' }), msHint('schedule.every_ms')),
          field('schedule.delay_ms', 'Delay after each run (ms)', num({ placeholder: '5000' }), msHint('schedule.delay_ms')),
          field('schedule.at_ms', 'At (local time)', when()),
          field('start_at_ms', 'Not before (local time)', when(), 'Empty: no bound'),
          field('end_at_ms', 'Not after (local time)', when(), 'Empty: no bound'),
          field('jitter_ms', 'Jitter (ms)', num(), msHint('jitter_ms')))),
      h('fieldset', null, h('legend', null, 'Routing'),
        h('div', { class: 'grid' },
          field('routing', 'Routing', select(ROUTINGS)),
          field('shard_count', 'Shard count', num(), '0: one shard per live worker'),
          field('shard_params', 'Shard params', area({ placeholder: 'one line per shard' }), 'Optional; one line per shard, as many as the shard count'),
          field('hash_param', 'Hash param', text({ placeholder: 'user' }), 'Top-level JSON field of params to hash on'))),
      h('fieldset', null, h('legend', null, 'Params'),
        field('params', 'Params', area({ rows: 4, placeholder: 'any text, often JSON' }), 'Given to every shard', { wide: true })),
      h('fieldset', null, h('legend', null, 'Policies'),
        h('div', { class: 'grid' },
          field('overlap', 'Overlap (previous run still going)', select(OVERLAPS)),
          field('misfire', 'Misfire (ticks nobody fired)', select(MISFIRES)),
          field('catch_up_window_ms', 'Catch-up window (ms)', num(), msHint('catch_up_window_ms')),
          field('timeout_ms', 'Timeout per shard (ms)', num(), h('span', null, '0: none', msHint('timeout_ms'))),
          field('retries', 'Retries', num({ max: '100' }), 'Of a failed or timed-out shard'),
          field('retry_backoff_ms', 'First retry backoff (ms)', num(), h('span', null, 'Doubles per retry', msHint('retry_backoff_ms'))),
          field('children', 'Child jobs', text({ placeholder: 'job-a, job-b' }), 'Fired when a run succeeds; comma-separated'))),
      h('div', { class: 'form-actions' },
        ifMay('admin', saveBtn),
        h('a', { href: '#/jobs', class: 'btn', id: 'job-cancel', 'data-testid': 'job-cancel' }, may('admin') ? 'Cancel' : 'Back'),
        meta));
    // A viewer or operator sees the definition, read-only.
    if (!may('admin')) form.querySelectorAll('fieldset').forEach((f) => { f.disabled = true; });

    const datalists = h('div', { hidden: true },
      h('datalist', { id: 'known-groups' }), h('datalist', { id: 'known-handlers' }),
      h('datalist', { id: 'known-zones' }, ['UTC', 'Europe/Paris', 'Europe/London', 'America/New_York', 'America/Los_Angeles', 'Asia/Shanghai', 'Asia/Tokyo'].map((z) => h('option', { value: z }))));

    fill(root,
      h('div', { class: 'page-head' }, h('h1', null, isNew ? 'New job' : may('admin') ? `Edit job ${name}` : `Job ${name}`),
        isNew ? null : h('div', { class: 'toolbar' }, h('a', { class: 'btn', href: `#/runs?job=${enc(name)}` }, 'Runs of this job'))),
      h('section', { class: 'panel' }, form), datalists);

    function syncVisibility() {
      const kind = inputs['schedule.kind'].value;
      const show = (path, on) => { $(`[data-field-wrap="${path}"]`, form).hidden = !on; };
      show('schedule.expr', kind === 'cron');
      show('schedule.time_zone', kind === 'cron');
      show('schedule.every_ms', kind === 'fixed_rate');
      show('schedule.delay_ms', kind === 'fixed_delay');
      show('schedule.at_ms', kind === 'once');
      const manualOnly = kind === 'manual';
      show('start_at_ms', !manualOnly);
      show('end_at_ms', !manualOnly);
      show('jitter_ms', !manualOnly);
      const r = inputs.routing.value;
      show('shard_count', r === 'sharding_broadcast');
      show('shard_params', r === 'sharding_broadcast');
      show('hash_param', r === 'consistent_hash');
      show('catch_up_window_ms', inputs.misfire.value === 'fire_all');
    }
    for (const p of ['schedule.kind', 'routing', 'misfire']) inputs[p].addEventListener('change', syncVisibility);
    form.addEventListener('input', (ev) => {
      const p = ev.target.dataset && ev.target.dataset.field;
      if (p) clearFieldError(p);
    });

    // A workflow's DAG is not edited here (chime job update --file, or the JSON
    // API): it is kept as loaded and sent back with the fields edited.
    let workflow = null;

    function setValues(j) {
      workflow = j.workflow || null;
      const s = j.schedule || { kind: 'cron' };
      inputs.name.value = j.name || '';
      inputs.group.value = j.group || '';
      inputs.handler.value = j.handler || '';
      inputs.paused.checked = !!j.paused;
      inputs['schedule.kind'].value = s.kind || 'cron';
      inputs['schedule.expr'].value = s.expr || '';
      inputs['schedule.time_zone'].value = s.time_zone || '';
      inputs['schedule.every_ms'].value = s.every_ms ?? '';
      inputs['schedule.delay_ms'].value = s.delay_ms ?? '';
      inputs['schedule.at_ms'].value = toLocalInput(s.at_ms);
      inputs.start_at_ms.value = toLocalInput(j.start_at_ms);
      inputs.end_at_ms.value = toLocalInput(j.end_at_ms);
      inputs.jitter_ms.value = j.jitter_ms || '';
      inputs.routing.value = j.routing || 'round_robin';
      inputs.shard_count.value = j.shard_count || '';
      inputs.shard_params.value = (j.shard_params || []).join('\n');
      inputs.hash_param.value = j.hash_param || '';
      inputs.params.value = j.params || '';
      inputs.overlap.value = j.overlap || 'allow';
      inputs.misfire.value = j.misfire || 'fire_once';
      inputs.catch_up_window_ms.value = j.catch_up_window_ms || '';
      inputs.timeout_ms.value = j.timeout_ms || '';
      inputs.retries.value = j.retries || '';
      inputs.retry_backoff_ms.value = j.retry_backoff_ms || '';
      inputs.children.value = (j.children || []).join(', ');
      for (const el of Object.values(inputs)) el.dispatchEvent(new Event('input'));
      syncVisibility();
    }

    // Reads the form into a Job body; local errors are [path, message] pairs.
    function readForm() {
      const errors = [];
      const str = (p) => inputs[p].value.trim();
      const int = (p) => {
        const v = inputs[p].value.trim();
        if (inputs[p].validity && inputs[p].validity.badInput) {
          errors.push([p, 'must be a whole number, 0 or more']);
          return 0;
        }
        if (v === '') return 0;
        if (!/^\d+$/.test(v)) {
          errors.push([p, 'must be a whole number, 0 or more']);
          return 0;
        }
        return Number(v);
      };
      const at = (p, required) => {
        const v = inputs[p].value;
        if (!v) {
          if (required) errors.push([p, 'pick a date and time']);
          return 0;
        }
        const ms = new Date(v).getTime();
        if (!Number.isFinite(ms)) {
          errors.push([p, 'is not a valid date and time']);
          return 0;
        }
        return ms;
      };
      for (const p of workflow ? ['name', 'group'] : ['name', 'group', 'handler']) if (!str(p)) errors.push([p, 'is required']);
      const kind = inputs['schedule.kind'].value;
      let schedule;
      switch (kind) {
        case 'cron':
          if (!str('schedule.expr')) errors.push(['schedule.expr', 'is required for a cron schedule']);
          schedule = { kind, expr: str('schedule.expr'), time_zone: str('schedule.time_zone') };
          break;
        case 'fixed_rate':
          schedule = { kind, every_ms: int('schedule.every_ms') };
          break;
        case 'fixed_delay':
          schedule = { kind, delay_ms: int('schedule.delay_ms') };
          break;
        case 'once':
          schedule = { kind, at_ms: at('schedule.at_ms', true) };
          break;
        default:
          schedule = { kind: 'manual' };
      }
      const routing = inputs.routing.value;
      const sharded = routing === 'sharding_broadcast';
      const manual = kind === 'manual';
      const body = {
        name: str('name'),
        group: str('group'),
        handler: str('handler'),
        schedule,
        routing,
        shard_count: sharded ? int('shard_count') : 0,
        shard_params: sharded ? inputs.shard_params.value.split('\n').map((s) => s.replace(/\r$/, '')).filter((s, i, all) => s !== '' || i < all.length - 1) : [],
        hash_param: routing === 'consistent_hash' ? str('hash_param') : '',
        params: inputs.params.value,
        overlap: inputs.overlap.value,
        misfire: inputs.misfire.value,
        catch_up_window_ms: inputs.misfire.value === 'fire_all' ? int('catch_up_window_ms') : 0,
        timeout_ms: int('timeout_ms'),
        retries: int('retries'),
        retry_backoff_ms: int('retry_backoff_ms'),
        children: str('children') ? str('children').split(/[\s,]+/).filter(Boolean) : [],
        paused: inputs.paused.checked,
        start_at_ms: manual ? 0 : at('start_at_ms'),
        end_at_ms: manual ? 0 : at('end_at_ms'),
        jitter_ms: manual ? 0 : int('jitter_ms'),
      };
      if (body.shard_params.length === 1 && body.shard_params[0] === '') body.shard_params = [];
      if (workflow) body.workflow = workflow;
      return { body, errors };
    }

    // The input a server-side field path names (aliases, indexes, parents).
    function inputFor(path) {
      if (!path) return null;
      const tries = [path, FIELD_ALIASES[path], path.replace(/\[\d+\]/g, '')];
      let p = path;
      while (p.includes('.')) {
        p = p.slice(0, p.lastIndexOf('.'));
        tries.push(p, FIELD_ALIASES[p]);
      }
      for (const t of tries) {
        if (t && inputs[t] && !inputs[t].closest('[hidden]')) return inputs[t];
      }
      for (const t of tries) if (t && inputs[t]) return inputs[t];
      return null;
    }

    function clearFieldError(path) {
      const el = inputs[path];
      if (!el) return;
      el.classList.remove('invalid');
      el.removeAttribute('aria-invalid');
      const err = $(`[data-error-for="${CSS.escape(path)}"]`, form);
      err.hidden = true;
      err.textContent = '';
    }

    function clearErrors() {
      for (const p of Object.keys(inputs)) clearFieldError(p);
      summary.hidden = true;
      summary.replaceChildren();
    }

    // Shows errors next to their inputs and a summary on top.
    function showErrors(errors, extra) {
      clearErrors();
      const items = [];
      let first = null;
      for (const [path, message] of errors) {
        const el = inputFor(path);
        if (el) {
          const p = el.dataset.field;
          const err = $(`[data-error-for="${CSS.escape(p)}"]`, form);
          err.textContent = message;
          err.hidden = false;
          el.classList.add('invalid');
          el.setAttribute('aria-invalid', 'true');
          if (!first) first = el;
          items.push(h('li', null, h('a', { href: '#', 'data-goto': p, onclick: (ev) => { ev.preventDefault(); el.focus(); } }, labelOf(p)), `: ${message}`));
        } else {
          items.push(h('li', null, path && path !== 'body' ? `${path}: ${message}` : message));
        }
      }
      fill(summary, h('strong', null, isNew ? 'The job was not created.' : 'The changes were not saved.'), items.length ? h('ul', null, items) : null, extra || null);
      summary.hidden = false;
      if (first) {
        first.scrollIntoView({ block: 'center' });
        first.focus({ preventScroll: true });
      } else summary.scrollIntoView({ block: 'nearest' });
    }

    function labelOf(path) {
      const l = $(`label[for="${CSS.escape(inputs[path].id)}"]`, form);
      return l ? l.firstChild.textContent.trim() : path;
    }

    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const { body, errors } = readForm();
      if (errors.length) {
        showErrors(errors);
        return;
      }
      saveBtn.disabled = true;
      try {
        let saved;
        if (isNew) saved = await api('POST', '/api/jobs', body);
        else saved = await api('PUT', `/api/jobs/${enc(name)}`, Object.assign(body, { version }));
        if (!current(gen)) return;
        flashNext('ok', `${isNew ? 'Created' : 'Saved'} job `, h('a', { href: jobHref(saved.name || body.name) }, saved.name || body.name), '.');
        location.hash = '#/jobs';
      } catch (e) {
        if (e.status === 401 || !current(gen)) return;
        if (e.code === 'invalid_argument') showErrors([[e.field, e.message]]);
        else if (e.code === 'already_exists') showErrors([['name', e.message || `a job named ${body.name} already exists`]]);
        else if (e.code === 'conflict') {
          showErrors([[null, 'This job was changed by someone else since you opened it. Reload to see the latest version, then make your change again.']],
            h('button', { type: 'button', class: 'btn btn-small', id: 'job-reload', 'data-testid': 'job-reload', onclick: () => load() }, 'Reload'));
        } else if (e.code === 'not_found' && !isNew) showErrors([[null, `The job ${name} no longer exists (deleted by someone else?).`]]);
        else showErrors([[null, errText(e)]]);
      } finally {
        saveBtn.disabled = false;
      }
    });

    async function load() {
      const j = await api('GET', `/api/jobs/${enc(name)}`);
      if (!current(gen)) return;
      clearErrors();
      version = j.version;
      setValues(j);
      inputs.name.readOnly = true;
      fill(meta, `version ${j.version ?? '—'} · created `, timeEl(j.created_at_ms), ' · next fire ', j.paused ? 'paused' : timeEl(j.next_fire_ms), ' · last fire ', timeEl(j.last_fire_ms));
    }

    // Suggestions from the workers that are connected.
    api('GET', '/api/workers').then((r) => {
      if (!current(gen)) return;
      const ws = r.workers || [];
      fill($('#known-groups', datalists), [...new Set(ws.map((w) => w.group))].map((g) => h('option', { value: g })));
      fill($('#known-handlers', datalists), [...new Set(ws.flatMap((w) => w.handlers || []))].map((x) => h('option', { value: x })));
    }).catch(() => {});

    setValues({ schedule: { kind: 'cron' } });
    form.dataset.ready = isNew ? 'true' : 'false';
    if (isNew) {
      inputs.name.focus();
      return { editing: () => true };
    }
    return {
      // Until the job is loaded the view retries; afterwards it never overwrites
      // what is typed.
      editing: () => version !== null || gone,
      async refresh() {
        if (version !== null || gone) return;
        try {
          await load();
          form.dataset.ready = 'true';
        } catch (e) {
          if (e.code === 'not_found') {
            gone = true;
            fill(root, h('div', { class: 'page-head' }, h('h1', null, 'Job not found')), section(null, h('p', null, `There is no job named ${name}. `, h('a', { href: '#/jobs' }, 'Back to jobs'))));
            return;
          }
          throw e;
        }
      },
    };
  }

  // ---------------------------------------------------------------- runs

  function runsView(root, gen, jobFilter) {
    const t = table('runs-table', RUN_HEADERS);
    const input = h('input', { id: 'runs-filter-job', 'data-testid': 'runs-filter-job', type: 'search', list: 'runs-job-names', placeholder: 'all jobs', value: jobFilter, 'aria-label': 'Filter by job' });
    const names = h('datalist', { id: 'runs-job-names' });
    const limit = h('select', { id: 'runs-limit', 'data-testid': 'runs-limit', 'aria-label': 'How many runs' }, ['50', '100', '200'].map((n) => h('option', { value: n }, `last ${n}`)));
    // The namespace choice (the server keeps the latest runs of that namespace,
    // not the latest of all filtered here); it shows once the jobs have two.
    const nsSel = h('select', { id: 'runs-namespace', 'data-testid': 'runs-namespace', 'aria-label': 'Namespace', hidden: true });
    const apply = () => {
      const v = input.value.trim();
      const target = v ? `#/runs?job=${enc(v)}` : '#/runs';
      if (location.hash !== target) location.hash = target;
    };
    input.addEventListener('change', apply);
    input.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') apply(); });
    limit.addEventListener('change', () => view.refresh().catch(() => {}));
    nsSel.addEventListener('change', () => view.refresh().catch(() => {}));

    fill(root,
      h('div', { class: 'page-head' }, h('h1', null, 'Runs', jobFilter ? h('span', { class: 'muted' }, ` of ${jobFilter}`) : null),
        h('div', { class: 'toolbar' }, nsSel, h('label', { for: 'runs-filter-job', class: 'inline-label' }, 'Job'), input, names, limit,
          jobFilter ? h('a', { href: '#/runs', class: 'btn', 'data-testid': 'runs-filter-clear' }, 'All jobs') : null)),
      section(null, t.el));

    api('GET', '/api/jobs').then((r) => {
      if (!current(gen)) return;
      const jobs = r.jobs || [];
      fill(names, jobs.map((j) => h('option', { value: j.name })));
      const spaces = [...new Set(jobs.map((j) => nsOf(j.name)))].sort();
      fill(nsSel, h('option', { value: '' }, 'All namespaces'), spaces.map((n) => h('option', { value: n }, n)));
      nsSel.hidden = spaces.length < 2 || !!jobFilter;
    }).catch(() => {});

    const view = {
      async refresh() {
        const ns = nsSel.hidden ? '' : nsSel.value;
        const r = await api('GET', `/api/runs?job=${enc(jobFilter)}&limit=${limit.value}${ns ? `&namespace=${enc(ns)}` : ''}`);
        if (!current(gen)) return;
        runRows(t, r.runs || []);
      },
    };
    return view;
  }

  function runView(root, gen, runId) {
    const head = h('div', { class: 'page-head' }, h('h1', null, 'Run ', h('span', { class: 'mono' }, runId)));
    const info = h('dl', { class: 'info', 'data-testid': 'run-info' });
    const t = table('shards-table', ['Shard', 'Worker', 'Attempt', 'State', 'Started', 'Finished', { label: 'Duration', attrs: { class: 'num' } }, 'Error']);
    const nt = table('nodes-table', ['Node', 'Job', 'State', 'Run', 'Started', 'Finished', { label: 'Duration', attrs: { class: 'num' } }, 'Output or error', '']);
    const graph = h('div', { class: 'dag-wrap', 'data-testid': 'dag' });
    const actions = h('div', { class: 'toolbar' });
    head.appendChild(actions);
    const shardsPanel = h('section', { class: 'panel' }, h('h2', null, 'Shards'), t.el);
    const nodesPanel = h('section', { class: 'panel', hidden: true, 'data-testid': 'workflow-panel' }, h('h2', null, 'Workflow'), graph, nt.el);
    fill(root, head, section(null, info), nodesPanel, shardsPanel);
    let final = false;

    function rerun(run, node) {
      confirmDialog('rerun-dialog', `Rerun from ${node}?`, `A new run of ${run.job}: ${node} and every node after it run again; the others keep how they ended and their outputs.`, 'Rerun', async () => {
        const again = await api('POST', `/api/runs/${enc(run.run_id)}/rerun`, { node });
        flashNext('ok', 'Rerunning as ', h('a', { href: runHref(again.run_id), 'data-testid': 'flash-run-link', 'data-run': again.run_id }, again.run_id));
        location.hash = runHref(again.run_id);
      });
    }

    // The DAG: nodes in columns by depth (a node one column right of its deepest
    // parent), each coloured by its state and linked to its run; edges drawn
    // solid (on success), dashed (on failure) or dotted (always).
    function drawDag(nodes) {
      const byName = new Map(nodes.map((n) => [n.name, n]));
      const depth = new Map();
      const depthOf = (n, seen = new Set()) => {
        if (depth.has(n.name)) return depth.get(n.name);
        if (seen.has(n.name)) return 0;
        seen.add(n.name);
        let d = 0;
        for (const e of n.after || []) {
          const p = byName.get(e.node);
          if (p) d = Math.max(d, depthOf(p, seen) + 1);
        }
        depth.set(n.name, d);
        return d;
      };
      const cols = [];
      for (const n of nodes) {
        const d = depthOf(n);
        (cols[d] = cols[d] || []).push(n);
      }
      const W = 150, H = 36, GX = 60, GY = 18, P = 10;
      const pos = new Map();
      cols.forEach((col, c) => col.forEach((n, r) => pos.set(n.name, { x: P + c * (W + GX), y: P + r * (H + GY) })));
      const width = P * 2 + cols.length * (W + GX) - GX;
      const height = P * 2 + Math.max(...cols.map((c) => c.length)) * (H + GY) - GY;
      const edges = svg('g', { class: 'dag-edges' });
      for (const n of nodes) {
        const to = pos.get(n.name);
        for (const e of n.after || []) {
          const from = pos.get(e.node);
          if (!from) continue;
          const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x, y2 = to.y + H / 2, mx = (x1 + x2) / 2;
          edges.appendChild(svg('path', {
            d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 4},${y2}`,
            class: `dag-edge when-${e.when || 'on_success'}`,
            'data-testid': 'dag-edge', 'data-from': e.node, 'data-to': n.name,
            'marker-end': 'url(#dag-arrow)',
          }));
        }
      }
      const boxes = svg('g', { class: 'dag-nodes' });
      for (const n of nodes) {
        const { x, y } = pos.get(n.name);
        const label = n.name.length > 18 ? `${n.name.slice(0, 17)}…` : n.name;
        const g = svg('g', { class: `dag-node state-${n.state}`, 'data-testid': 'dag-node', 'data-node': n.name, 'data-state': n.state, transform: `translate(${x},${y})` },
          svg('title', null, `${n.name}: ${n.state.replace('_', ' ')}${n.error ? ` — ${n.error}` : ''}`),
          svg('rect', { width: W, height: H, rx: 6 }),
          svg('text', { x: 10, y: 15, class: 'dag-name' }, label),
          svg('text', { x: 10, y: 29, class: 'dag-state' }, n.state.replace('_', ' ')));
        const link = n.run_id ? svg('a', { href: runHref(n.run_id) }, g) : g;
        boxes.appendChild(link);
      }
      const defs = svg('defs', null, svg('marker', { id: 'dag-arrow', viewBox: '0 0 8 8', refX: 7, refY: 4, markerWidth: 7, markerHeight: 7, orient: 'auto' }, svg('path', { d: 'M0,0 L8,4 L0,8 z', class: 'dag-arrow' })));
      fill(graph, svg('svg', { width, height, viewBox: `0 0 ${width} ${height}`, class: 'dag', role: 'img', 'aria-label': 'workflow graph' }, defs, edges, boxes));
    }

    function renderNodes(r) {
      const nodes = r.nodes || [];
      nodesPanel.hidden = !nodes.length;
      shardsPanel.hidden = !!nodes.length;
      if (!nodes.length) return;
      drawDag(nodes);
      fill(nt.tbody, nodes.map((n) => h('tr', { 'data-node': n.name, 'data-state': n.state, 'data-testid': 'node-row' },
        h('td', null, n.name),
        h('td', { class: 'mono' }, n.job.includes('~') ? h('span', { class: 'muted' }, 'inline') : h('a', { href: jobHref(n.job) }, n.job)),
        h('td', null, stateBadge(n.state, 'node-state')),
        h('td', null, n.run_id ? h('a', { href: runHref(n.run_id), class: 'mono', 'data-testid': 'node-run' }, n.run_id.startsWith(`${r.run_id}~`) ? n.name : n.run_id) : h('span', { class: 'muted' }, '—')),
        h('td', null, timeEl(n.started_at_ms)),
        h('td', null, timeEl(n.finished_at_ms)),
        h('td', { class: 'num' }, duration(n.started_at_ms, n.finished_at_ms)),
        h('td', { class: `node-output ${n.error ? 'error-text' : ''}`, title: n.error || n.output || '' }, n.error || (n.output ? h('code', null, n.output) : '')),
        h('td', null, final
          ? ifMay('operator', h('button', { type: 'button', class: 'btn btn-small', 'data-action': 'rerun', 'data-node': n.name, onclick: () => rerun(r, n.name) }, 'Rerun from here'))
          : null))));
    }

    function kill(run) {
      confirmDialog('kill-dialog', `Kill run ${run.run_id}?`, 'Every shard still pending or running is cancelled on its worker.', 'Kill', async () => {
        await api('POST', `/api/runs/${enc(run.run_id)}/kill`);
        flash('ok', `Kill requested for ${run.run_id}.`);
        view.refresh().catch(() => {});
      });
    }

    const dt = (label, ...v) => [h('dt', null, label), h('dd', null, v)];

    function render(r) {
      final = FINAL_STATES.has(r.state);
      root.dataset.runState = r.state;
      fill(actions,
        stateBadge(r.state, 'run-state'),
        final || !may('operator') ? null : h('button', { type: 'button', id: 'run-kill', class: 'btn btn-danger', 'data-testid': 'run-kill', onclick: () => kill(r) }, 'Kill'),
        h('a', { class: 'btn', href: `#/runs?job=${enc(r.job)}` }, 'Runs of this job'));
      fill(info,
        dt('Job', h('a', { href: jobHref(r.job), 'data-testid': 'run-job' }, r.job)),
        dt('Cause', h('span', { 'data-testid': 'run-cause' }, r.cause)),
        dt('Fire id', h('span', { class: 'mono' }, r.fire_id || '—')),
        dt('Scheduled', timeEl(r.scheduled_at_ms)),
        dt('Fired', timeEl(r.fired_at_ms), isSet(r.fired_at_ms) && isSet(r.scheduled_at_ms) ? h('span', { class: 'muted' }, ` (lag ${span(r.fired_at_ms - r.scheduled_at_ms)})`) : null),
        dt('Finished', timeEl(r.finished_at_ms)),
        dt('Duration', duration(r.fired_at_ms, r.finished_at_ms)),
        dt('Params', r.params ? h('code', { class: 'wrap', 'data-testid': 'run-params' }, r.params) : h('span', { class: 'muted' }, '—')),
        r.note ? dt('Note', r.note) : null,
        r.parent_run_id ? dt('Parent run', h('a', { href: runHref(r.parent_run_id) }, r.parent_run_id)) : null,
        dt('Fence', String(r.fence ?? '—')));
      renderNodes(r);
      if ((r.nodes || []).length) return;
      const shards = r.shards || [];
      if (!shards.length) {
        fill(t.tbody, emptyRow(t, r.state === 'skipped' ? 'Skipped: no shard ran.' : 'No shard assigned yet.'));
        return;
      }
      fill(t.tbody, shards.map((s) => [
        h('tr', { 'data-shard': s.index, 'data-testid': 'shard-row', 'data-state': s.state, class: 'shard-row' },
          h('td', null, `${s.index}/${s.total}`),
          h('td', { 'data-testid': 'shard-worker' }, s.worker_id || h('span', { class: 'muted' }, '—')),
          h('td', null, String(s.attempt ?? '—'), s.failures ? h('span', { class: 'muted' }, ` (${s.failures} failed)`) : null),
          h('td', null, stateBadge(s.state, 'shard-state')),
          h('td', null, timeEl(s.started_at_ms)),
          h('td', null, timeEl(s.finished_at_ms)),
          h('td', { class: 'num' }, duration(s.started_at_ms, s.finished_at_ms)),
          h('td', { class: 'error-text' }, s.error || '')),
        h('tr', { class: 'shard-detail', 'data-shard-detail': s.index },
          h('td', { colspan: t.cols },
            h('div', { class: 'shard-detail-grid' },
              s.shard_params ? h('div', null, h('div', { class: 'label' }, 'Shard params'), h('code', { class: 'wrap' }, s.shard_params)) : null,
              h('div', null, h('div', { class: 'label' }, 'Output'), s.output ? h('code', { class: 'wrap', 'data-testid': 'shard-output' }, s.output) : h('span', { class: 'muted' }, '—')),
              h('div', { class: 'log' }, h('div', { class: 'label' }, 'Log tail'),
                h('pre', { class: 'log-tail', 'data-testid': 'shard-log' }, (s.log_tail || []).length ? s.log_tail.join('\n') : '(no log lines)'))))),
      ]));
    }

    const view = {
      async refresh() {
        if (final && view.loaded) return; // nothing changes any more
        let r;
        try {
          r = await api('GET', `/api/runs/${enc(runId)}`);
        } catch (e) {
          if (e.code === 'not_found' && current(gen)) {
            fill(info, h('p', null, 'No such run (it may have aged out of the history).'));
            final = true;
            view.loaded = true;
            return;
          }
          throw e;
        }
        if (!current(gen)) return;
        render(r);
      },
    };
    return view;
  }

  // ---------------------------------------------------------------- queues

  function queuesView(root, gen) {
    const summary = h('p', { class: 'muted', 'data-testid': 'queues-summary' });
    const t = table('queues-table', [
      { label: 'Queue', attrs: { class: 'num' } }, { label: 'Pending', attrs: { class: 'num' } }, { label: 'Due now', attrs: { class: 'num' } },
      { label: 'Due soon (60 s)', attrs: { class: 'num' } }, { label: 'In flight', attrs: { class: 'num' } }, { label: 'Dead', attrs: { class: 'num' } },
      { label: 'Waiting for a handler', attrs: { class: 'num', title: 'due, but no worker that popped them had a subscriber for their handler' } }, 'Next due']);
    const waitingLine = h('p', { class: 'muted', 'data-testid': 'queues-waiting' });
    const selectAll = h('input', { type: 'checkbox', 'aria-label': 'Select all', 'data-testid': 'dead-select-all' });
    const dead = table('dead-table', [{ label: selectAll, attrs: { class: 'check-col' } }, 'Item', 'Key', 'Handler', { label: 'Queue', attrs: { class: 'num' } }, 'Due at', 'Attempts', 'Last error', 'Payload']);
    const reqSel = h('button', { type: 'button', class: 'btn', id: 'dead-requeue-selected', 'data-testid': 'dead-requeue-selected', disabled: true }, 'Requeue selected');
    const reqAll = h('button', { type: 'button', class: 'btn', id: 'dead-requeue-all', 'data-testid': 'dead-requeue-all', disabled: true }, 'Requeue all');
    const deadTitle = h('h2', null, 'Dead letters');
    const selected = new Set();
    let items = [];
    const keyOf = (it) => `${it.item.key}\u0000${it.item.id}`;

    function updateButtons() {
      const present = new Set(items.map(keyOf));
      for (const k of [...selected]) if (!present.has(k)) selected.delete(k);
      reqSel.disabled = selected.size === 0;
      reqSel.textContent = selected.size ? `Requeue selected (${selected.size})` : 'Requeue selected';
      reqAll.disabled = items.length === 0;
      selectAll.checked = items.length > 0 && selected.size === items.length;
      selectAll.indeterminate = selected.size > 0 && selected.size < items.length;
    }
    selectAll.addEventListener('change', () => {
      if (selectAll.checked) items.forEach((it) => selected.add(keyOf(it)));
      else selected.clear();
      for (const cb of $$('input[data-dead]', dead.tbody)) cb.checked = selectAll.checked;
      updateButtons();
    });
    reqSel.addEventListener('click', async () => {
      const chosen = items.filter((it) => selected.has(keyOf(it))).map((it) => ({ key: it.item.key, id: it.item.id }));
      if (!chosen.length) return;
      reqSel.disabled = true;
      try {
        const r = await api('POST', '/api/queues/dead/requeue', { items: chosen });
        selected.clear();
        flash('ok', `Requeued ${r.requeued ?? chosen.length} item(s).`);
        await view.refresh();
      } catch (e) {
        if (e.status !== 401) flash('error', `Requeue failed: ${errText(e)}`);
      } finally {
        updateButtons();
      }
    });
    reqAll.addEventListener('click', () => {
      confirmDialog('requeue-all-dialog', 'Requeue every dead letter?', 'Every item in the dead-letter set is put back in its queue, due now, with its attempts reset.', 'Requeue all', async () => {
        const r = await api('POST', '/api/queues/dead/requeue', { all: true });
        selected.clear();
        flash('ok', `Requeued ${r.requeued ?? 'all'} item(s).`);
        view.refresh().catch(() => {});
      });
    });

    const notice = h('div', { class: 'notice', hidden: true, 'data-testid': 'queues-unavailable' });
    // A token limited to namespaces sees its items' dead letters (the server
    // filters), not the queues' counts and charts, which are everyone's, and
    // requeues the items it names, never all.
    const statsPanel = h('section', { class: 'panel', hidden: limited() }, h('h2', null, 'Delayed item queues'), summary, waitingLine, t.el);
    const content = h('div', null,
      statsPanel,
      h('section', { class: 'panel' }, h('div', { class: 'panel-head' }, deadTitle, ifMay('operator', h('div', { class: 'toolbar' }, reqSel, limited() ? null : reqAll))), dead.el));
    const charts = chartGrid('queues-charts', ['items', 'lag', 'depth', 'age']);
    charts.el.hidden = limited();
    fill(root, h('div', { class: 'page-head' }, h('h1', null, 'Queues')), notice, charts.el, content);

    const n = (v) => h('td', { class: 'num' }, String(v ?? 0));

    const view = {
      async refresh() {
        if (!limited()) await refreshStats();
        if (!current(gen) || content.hidden) return;
        await refreshDead();
      },
    };

    async function refreshStats() {
      const q = await api('GET', '/api/queues');
      if (!current(gen)) return;
      notice.hidden = q.available !== false;
      content.hidden = q.available === false;
      if (q.available === false) {
        notice.textContent = `Delayed items are not available on this coordinator: ${q.reason || 'no delay store configured'}.`;
        items = [];
        updateButtons();
        return;
      }
      const now = q.now_ms || Date.now();
      const qs = q.queues || [];
      const layout = q.layout || {};
      const draining = (layout.draining || []).map((d) => (Array.isArray(d) ? d[1] : d.count)).filter((c) => c !== undefined);
      summary.textContent = [
        `${q.family ? `Family ${q.family} · ` : ''}${q.count ?? qs.length} queues`,
        layout.epoch ? `layout epoch ${layout.epoch}` : null,
        draining.length ? `resizing: items still moving from ${draining.join(', ')} queue layout(s)` : null,
      ].filter(Boolean).join(' · ');
      const tot = qs.reduce((a, s) => {
        for (const k of ['pending', 'due_now', 'due_soon', 'in_flight', 'dead', 'waiting']) a[k] += s[k] || 0;
        return a;
      }, { pending: 0, due_now: 0, due_soon: 0, in_flight: 0, dead: 0, waiting: 0 });
      const byHandler = Object.entries(q.waiting_by_handler || {});
      waitingLine.textContent = byHandler.length
        ? `Waiting for a handler (no subscriber yet): ${byHandler.map(([hd, c]) => `${hd} ${c}`).join(', ')}`
        : '';
      fill(t.tbody,
        qs.length ? qs.map((s) => h('tr', { 'data-queue': s.queue, 'data-testid': 'queue-row' },
          n(s.queue), n(s.pending), n(s.due_now), n(s.due_soon), n(s.in_flight),
          h('td', { class: `num${s.dead ? ' warn-text' : ''}` }, String(s.dead ?? 0)),
          h('td', { class: `num${s.waiting ? ' warn-text' : ''}` }, String(s.waiting ?? 0)),
          h('td', null, isSet(s.next_due_ms) ? h('span', { title: fullDate(s.next_due_ms) }, relative(s.next_due_ms, now)) : h('span', { class: 'muted' }, '—'),
            s.moving ? h('span', { class: 'badge badge-info', title: 'items moving after a resize' }, ` moving ${s.moving}`) : null))) : emptyRow(t, 'No queues.'),
        qs.length ? h('tr', { class: 'totals' }, h('td', null, 'all'), n(tot.pending), n(tot.due_now), n(tot.due_soon), n(tot.in_flight), n(tot.dead), n(tot.waiting), h('td')) : null);

      await charts.refresh(gen).catch(chartFailed);
    }

    async function refreshDead() {
      const d = await api('GET', '/api/queues/dead?limit=100');
      if (!current(gen)) return;
      items = d.items || [];
      deadTitle.textContent = `Dead letters (${items.length}${items.length >= 100 ? '+' : ''})`;
      fill(dead.tbody, items.length ? items.map((it) => {
        const k = keyOf(it);
        const cb = h('input', { type: 'checkbox', 'data-dead': it.item.id, checked: selected.has(k), 'aria-label': `Select ${it.item.id}` });
        cb.addEventListener('change', () => {
          if (cb.checked) selected.add(k);
          else selected.delete(k);
          updateButtons();
        });
        const payload = it.item.payload || '';
        return h('tr', { 'data-item': it.item.id, 'data-key': it.item.key, 'data-testid': 'dead-row' },
          h('td', { class: 'check-col' }, cb),
          h('td', { class: 'mono' }, it.item.id),
          h('td', { class: 'mono' }, it.item.key),
          h('td', null, h('code', null, it.item.handler)),
          n(it.queue),
          h('td', null, timeEl(it.item.due_at_ms)),
          h('td', null, `${it.item.attempt ?? '?'}/${it.item.max_attempts ?? '?'}`),
          h('td', { class: 'error-text' }, it.last_error || ''),
          h('td', { class: 'payload', title: payload }, payload.length > 80 ? `${payload.slice(0, 80)}…` : payload));
      }) : emptyRow(dead, 'No dead letters.'));
      updateButtons();
    }
    return view;
  }

  // ---------------------------------------------------------------- config

  function configView(root, gen) {
    const notice = h('div', { class: 'notice', hidden: true, 'data-testid': 'config-unavailable' });
    const entries = table('config-entries', ['Key', 'Value', { label: 'Revision', attrs: { class: 'num' } }, { label: 'Actions', attrs: { class: 'actions' } }]);
    const refused = table('config-refused', ['Key', 'Value', 'Reason']);
    const known = table('config-known', ['Key pattern', 'Range', 'Meaning']);
    const inForce = h('pre', { class: 'json', 'data-testid': 'config-in-force' });
    const revision = h('span', { class: 'muted' });
    const keyIn = h('input', { id: 'config-key', 'data-testid': 'config-key', 'data-field': 'key', type: 'text', list: 'config-keys', placeholder: 'queues/default/count', autocomplete: 'off', spellcheck: 'false' });
    const valIn = h('input', { id: 'config-value', 'data-testid': 'config-value', 'data-field': 'value', type: 'text', placeholder: '16', autocomplete: 'off', spellcheck: 'false' });
    const keyErr = h('div', { class: 'field-error', 'data-error-for': 'key', 'data-testid': 'field-error', role: 'alert', hidden: true });
    const valErr = h('div', { class: 'field-error', 'data-error-for': 'value', 'data-testid': 'field-error', role: 'alert', hidden: true });
    const keyList = h('datalist', { id: 'config-keys' });
    const saveBtn = h('button', { type: 'submit', id: 'config-save', class: 'btn btn-primary', 'data-testid': 'config-save' }, 'Set value');
    const form = h('form', { id: 'config-form', class: 'form inline-form', 'data-testid': 'config-form', novalidate: true },
      h('div', { class: 'field' }, h('label', { for: 'config-key' }, 'Key'), keyIn, keyList, keyErr),
      h('div', { class: 'field' }, h('label', { for: 'config-value' }, 'Value'), valIn, valErr),
      h('div', { class: 'field field-button' }, saveBtn));
    let known_ = [];
    let entryKeys = [];

    const setErr = (el, box, msg) => {
      box.hidden = !msg;
      box.textContent = msg || '';
      el.classList.toggle('invalid', !!msg);
      if (msg) el.setAttribute('aria-invalid', 'true');
      else el.removeAttribute('aria-invalid');
    };
    keyIn.addEventListener('input', () => setErr(keyIn, keyErr, null));
    valIn.addEventListener('input', () => setErr(valIn, valErr, null));

    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      setErr(keyIn, keyErr, null);
      setErr(valIn, valErr, null);
      const key = keyIn.value.trim();
      const value = valIn.value;
      if (!key) return setErr(keyIn, keyErr, 'is required');
      if (/[<>]/.test(key)) return setErr(keyIn, keyErr, 'replace <family> or <name> with a real name');
      if (value.trim() === '') return setErr(valIn, valErr, 'is required (delete the key to go back to the default)');
      saveBtn.disabled = true;
      try {
        const r = await api('PUT', '/api/config', { key, value });
        flash('ok', `Set ${r.key || key} = ${r.value ?? value} (revision ${r.revision ?? '?'}).`);
        keyIn.value = '';
        valIn.value = '';
        keyIn.blur();
        valIn.blur();
        await view.refresh();
      } catch (e) {
        if (e.status === 401) return;
        const aboutKey = e.field === 'key' || /unknown key|invalid name/i.test(e.message) || (e.field && e.field !== key && e.field !== 'value' && e.field !== 'body' && !e.field.includes('/'));
        if (e.code === 'invalid_argument' && aboutKey) setErr(keyIn, keyErr, e.message);
        else if (e.code === 'invalid_argument') setErr(valIn, valErr, e.message);
        else flash('error', `Not saved: ${errText(e)}`);
      } finally {
        saveBtn.disabled = false;
      }
    });

    function edit(key, value) {
      keyIn.value = key;
      valIn.value = value;
      valIn.focus();
      valIn.select();
    }

    function remove(key) {
      confirmDialog('config-delete-dialog', `Delete ${key}?`, 'The setting goes back to its default on every process.', 'Delete', async () => {
        const r = await api('DELETE', `/api/config?key=${enc(key)}`);
        flash('ok', `Deleted ${key} (revision ${r.revision ?? '?'}).`);
        view.refresh().catch(() => {});
      });
    }

    const content = h('div', null,
      ifMay('admin', h('section', { class: 'panel' }, h('h2', null, 'Set a value'), h('p', { class: 'muted' }, 'Written to etcd; every coordinator and worker picks it up live. A bad value is refused and nothing is written.'), form)),
      section('Entries', entries.el),
      section('Refused values', h('p', { class: 'muted' }, 'Values found in etcd that are not in force (the last good value stays).'), refused.el),
      section('Known keys', known.el),
      h('section', { class: 'panel' }, h('details', null, h('summary', null, 'Settings in force'), inForce)));
    fill(root, h('div', { class: 'page-head' }, h('h1', null, 'Config ', revision)), notice, content);

    const view = {
      editing: () => form.contains(document.activeElement) || keyIn.value !== '' || valIn.value !== '',
      async refresh() {
        const c = await api('GET', '/api/config');
        if (!current(gen)) return;
        if (c.available === false) {
          notice.hidden = false;
          notice.textContent = `Live config is not available on this coordinator: ${c.reason || 'no etcd configured'}.`;
          content.hidden = true;
          return;
        }
        notice.hidden = true;
        content.hidden = false;
        revision.textContent = c.revision !== undefined ? `(revision ${c.revision})` : '';
        const es = c.entries || [];
        entryKeys = es.map((e) => e.key);
        fill(entries.tbody, es.length ? es.map((e) => h('tr', { 'data-key': e.key, 'data-testid': 'config-entry' },
          h('td', { class: 'mono' }, e.key),
          h('td', { class: 'mono' }, e.value),
          h('td', { class: 'num' }, String(e.revision ?? '')),
          h('td', { class: 'actions' },
            ifMay('admin', h('button', { type: 'button', class: 'btn btn-small', 'data-action': 'edit', onclick: () => edit(e.key, e.value) }, 'Edit')),
            ifMay('admin', h('button', { type: 'button', class: 'btn btn-small btn-danger-ghost', 'data-action': 'delete', onclick: () => remove(e.key) }, 'Delete'))))) : emptyRow(entries, 'No settings: every default is in force.'));
        const rs = c.refused || [];
        fill(refused.tbody, rs.length ? rs.map((r) => h('tr', { 'data-key': r.key, 'data-testid': 'config-refused-row' },
          h('td', { class: 'mono' }, r.key), h('td', { class: 'mono' }, r.value ?? ''), h('td', { class: 'error-text' }, r.reason))) : emptyRow(refused, 'None.'));
        known_ = c.known_keys || [];
        fill(known.tbody, known_.length ? known_.map((k) => h('tr', { 'data-pattern': k.pattern },
          h('td', null, h('button', { type: 'button', class: 'btn-link mono', title: 'Use this key', onclick: () => { keyIn.value = k.pattern; keyIn.focus(); } }, k.pattern)),
          h('td', { class: 'mono' }, k.range || ''), h('td', null, k.doc || ''))) : emptyRow(known, '—'));
        fill(keyList, [...new Set([...entryKeys, ...known_.map((k) => k.pattern)])].map((k) => h('option', { value: k })));
        inForce.textContent = JSON.stringify(c.in_force ?? {}, null, 2);
      },
    };
    return view;
  }

  // ---------------------------------------------------------------- alerts

  // Alert rules (live in etcd), the alerts firing now, a JSON editor to put a rule,
  // and a Test button that sends a test notice to each sink of a rule.
  function alertsView(root, gen) {
    const firing = table('alerts-firing', ['Rule', 'Subject', 'Since']);
    const rules = table('alerts-rules', ['Rule', 'Condition', 'Scope', 'Sinks', 'State', { label: 'Actions', attrs: { class: 'actions' } }]);
    const example = {
      name: 'jobs-failing',
      condition: { kind: 'run_failed' },
      scope: { group: 'default' },
      sinks: [{ kind: 'webhook', url: 'https://ops.example.com/chime', secret: 'change-me' }],
      repeat_after_s: 0,
    };
    const editor = h('textarea', { id: 'alert-json', 'data-testid': 'alert-json', rows: 12, spellcheck: 'false', class: 'mono' });
    editor.value = JSON.stringify(example, null, 2);
    const err = h('div', { class: 'field-error', 'data-testid': 'field-error', role: 'alert', hidden: true });
    const saveBtn = h('button', { type: 'submit', class: 'btn btn-primary', 'data-testid': 'alert-save' }, 'Save rule');
    const form = h('form', { class: 'form', 'data-testid': 'alert-form', novalidate: true },
      h('div', { class: 'field' }, h('label', { for: 'alert-json' }, 'Rule (JSON)'), editor, err),
      h('div', { class: 'toolbar' }, saveBtn));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      err.hidden = true;
      let rule;
      try { rule = JSON.parse(editor.value); } catch (e) {
        err.hidden = false;
        err.textContent = `not JSON: ${e.message}`;
        return;
      }
      saveBtn.disabled = true;
      try {
        await api('PUT', `/api/alerts/${enc(rule.name || '')}`, rule);
        flash('ok', `Saved alert rule ${rule.name}.`);
        await view.refresh();
      } catch (e) {
        if (e.status === 401) return;
        err.hidden = false;
        err.textContent = e.field ? `${e.field}: ${e.message}` : errText(e);
      } finally {
        saveBtn.disabled = false;
      }
    });

    async function test(name, cell) {
      cell.textContent = 'sending…';
      try {
        const r = await api('POST', `/api/alerts/${enc(name)}/test`);
        fill(cell, (r.results || []).map((x) => h('div', { class: x.ok ? 'ok-text' : 'error-text', 'data-testid': 'alert-test-result' }, `${x.sink}: ${x.ok ? 'delivered' : x.error}`)));
      } catch (e) {
        if (e.status !== 401) cell.textContent = errText(e);
      }
    }

    function remove(name) {
      confirmDialog('alert-delete-dialog', `Delete alert rule ${name}?`, 'Its alerts stop; nothing more is sent for it.', 'Delete', async () => {
        await api('DELETE', `/api/alerts/${enc(name)}`);
        flash('ok', `Deleted alert rule ${name}.`);
        view.refresh().catch(() => {});
      });
    }

    const scopeText = (s) => Object.entries(s || {}).map(([k, v]) => `${k}=${v}`).join(' ') || 'everything';
    const condText = (c) => Object.entries(c).filter(([k]) => k !== 'kind').reduce((t, [k, v]) => `${t} ${k}=${v}`, c.kind);
    const sinkText = (x) => {
      let where = x.kind === 'email' ? (x.to || []).join(', ') : '';
      if (!where && x.url) { try { where = new URL(x.url).host; } catch (_) { where = ''; } }
      return `${x.kind}${where ? ` (${where})` : ''}`;
    };

    fill(root, h('div', { class: 'page-head' }, h('h1', null, 'Alerts')),
      section('Firing now', firing.el),
      section('Rules', h('p', { class: 'muted' }, 'Evaluated every second on the leader; each alert is told once when it starts and once when it resolves.'), rules.el),
      ifMay('admin', section('Put a rule', h('p', { class: 'muted' }, 'A rule with the same name is replaced. Conditions: run_failed, fire_skipped, dead_letters {above}, queue_lag {above_ms}, workers_below {min} (scope.group), leader_changed. Sinks: webhook, slack, dingtalk, feishu, email.'), form)));

    const view = {
      editing: () => form.contains(document.activeElement),
      async refresh() {
        const r = await api('GET', '/api/alerts');
        if (!current(gen)) return;
        const now = Date.now();
        const fs = r.firing || [];
        fill(firing.tbody, fs.length ? fs.map((f) => h('tr', { 'data-testid': 'alert-firing', 'data-rule': f.rule },
          h('td', { class: 'mono' }, f.rule), h('td', { class: 'mono' }, f.subject), h('td', null, timeEl(f.since_ms, { now })))) : emptyRow(firing, 'Nothing fires.'));
        const rs = r.rules || [];
        fill(rules.tbody, rs.length ? rs.map((x) => {
          const result = h('div', { class: 'small' });
          return h('tr', { 'data-testid': 'alert-rule', 'data-rule': x.name },
            h('td', { class: 'mono' }, x.name, x.description ? h('div', { class: 'muted small' }, x.description) : null),
            h('td', { class: 'mono' }, condText(x.condition)),
            h('td', { class: 'mono' }, scopeText(x.scope)),
            h('td', null, (x.sinks || []).map((k) => h('div', { class: 'mono' }, sinkText(k))), result),
            h('td', null, x.disabled ? h('span', { class: 'badge badge-muted' }, 'disabled') : h('span', { class: 'badge' }, 'on')),
            h('td', { class: 'actions' },
              ifMay('admin', h('button', { type: 'button', class: 'btn btn-small', 'data-action': 'edit', onclick: () => { editor.value = JSON.stringify(x, null, 2); editor.focus(); } }, 'Edit')),
              ifMay('operator', h('button', { type: 'button', class: 'btn btn-small', 'data-action': 'test', onclick: () => test(x.name, result) }, 'Test')),
              ifMay('admin', h('button', { type: 'button', class: 'btn btn-small btn-danger-ghost', 'data-action': 'delete', onclick: () => remove(x.name) }, 'Delete'))));
        }) : emptyRow(rules, 'No rule yet.'));
      },
    };
    return view;
  }

  // ---------------------------------------------------------------- audit

  // Who changed what: the newest 100 entries, then older pages on demand. An
  // entry's before/after is JSON; a job shows the fields that changed.
  function auditView(root, gen) {
    const t = table('audit-table', ['When', 'Who', 'Action', 'Target', 'Change']);
    const more = h('button', { type: 'button', class: 'btn', 'data-testid': 'audit-more', hidden: true }, 'Older entries');
    fill(root, h('div', { class: 'page-head' }, h('h1', null, 'Audit log')),
      section(null, h('p', { class: 'muted' }, 'Changes made through the coordinators: jobs, kills, live settings and dead-letter requeues, with the name of the token used (never the token). Settings written straight to etcd are not here.'), t.el, h('div', { class: 'toolbar' }, more)));
    let shown = [];

    function changed(before, after) {
      const text = (v) => (v === undefined || v === null ? '—' : (typeof v === 'string' ? v : JSON.stringify(v)));
      const isObj = (v) => v && typeof v === 'object' && !Array.isArray(v);
      if (isObj(before) && isObj(after)) {
        const keys = [...new Set([...Object.keys(before), ...Object.keys(after)])]
          .filter((k) => JSON.stringify(before[k]) !== JSON.stringify(after[k]));
        if (!keys.length) return h('span', { class: 'muted' }, 'no field changed');
        return h('ul', { class: 'plain' }, keys.map((k) => h('li', { class: 'mono' }, `${k}: ${text(before[k])} → ${text(after[k])}`)));
      }
      if (before === undefined || before === null) return h('details', null, h('summary', null, 'after'), h('pre', { class: 'json' }, JSON.stringify(after, null, 2)));
      if (after === undefined || after === null) return h('details', null, h('summary', null, 'before'), h('pre', { class: 'json' }, JSON.stringify(before, null, 2)));
      return h('span', { class: 'mono' }, `${text(before)} → ${text(after)}`);
    }

    function render(now) {
      fill(t.tbody, shown.length ? shown.map((e) => h('tr', { 'data-testid': 'audit-entry', 'data-id': e.id, 'data-action': e.action },
        h('td', null, timeEl(e.at_ms, { now })),
        h('td', { class: 'mono' }, e.who),
        h('td', null, h('span', { class: 'badge badge-muted' }, e.action)),
        h('td', { class: 'mono' }, e.action.startsWith('job.') && e.action !== 'job.delete' ? h('a', { href: jobHref(e.target) }, e.target) : (e.action === 'run.kill' ? h('a', { href: runHref(e.target) }, e.target) : e.target)),
        h('td', null, changed(e.before, e.after)))) : emptyRow(t, 'No change recorded yet.'));
    }

    more.addEventListener('click', async () => {
      const last = shown[shown.length - 1];
      if (!last) return;
      more.disabled = true;
      try {
        const r = await api('GET', `/api/audit?limit=100&before=${enc(last.id)}`);
        if (!current(gen)) return;
        const page = r.entries || [];
        shown = shown.concat(page);
        more.hidden = page.length < 100;
        render(Date.now());
      } catch (e) {
        if (e.status !== 401) flash('error', `Cannot load older entries: ${errText(e)}`);
      } finally {
        more.disabled = false;
      }
    });

    return {
      async refresh() {
        const r = await api('GET', '/api/audit?limit=100');
        if (!current(gen)) return;
        const fresh = r.entries || [];
        // Keep older pages the operator opened: new entries go on top.
        if (shown.length <= 100) {
          shown = fresh;
          more.hidden = shown.length < 100;
        } else {
          const have = new Set(shown.map((e) => e.id));
          shown = fresh.filter((e) => !have.has(e.id)).concat(shown);
        }
        render(Date.now());
      },
    };
  }

  // ---------------------------------------------------------------- start

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
  else boot();
})();
