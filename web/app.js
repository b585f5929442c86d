// trialhub dashboard: asks for an API key, lets the user pick a trial, and shows its progress
// (GET /v1/trials/{id}/progress), updated live over the WebSocket (GET /v1/events, after a
// ticket from POST /v1/events/ticket) and by polling when the socket is down.
//
// The key lives in sessionStorage only (this tab, gone when it closes), never in localStorage,
// a cookie or a URL; it is sent only in the Authorization header to this origin. Everything the
// server sends is written with textContent or SVG attributes, never parsed as HTML.
'use strict';

const KEY_ITEM = 'trialhub.key';
const TRIAL_ITEM = 'trialhub.trial';
const TICK_MS = 2000;             // the poll loop; progress is polled at this pace without socket
const LIVE_REFRESH_MS = 15000;    // with the socket up, a safety re-read of progress
const METRICS_EVERY_MS = 5000;    // /metrics for the system panel when no system.stats arrive
const STATS_FRESH_MS = 6000;      // system.stats younger than this make /metrics unnecessary
const RECONNECT_MAX_MS = 30000;
const RATE_MINUTES = 30;
const LIST_MAX = 50;
const INSTRUMENTS = {
  'http://loinc.org/q/44249-1': 'PHQ-9',
  'http://loinc.org/q/69737-5': 'GAD-7',
};
const SVG_NS = 'http://www.w3.org/2000/svg';

const el = (id) => document.getElementById(id);
const testid = (name) => document.querySelector(`[data-testid="${name}"]`);

const state = {
  key: null,
  trial: null,
  etag: null,
  fetching: false,
  again: false,
  lastProgressAt: 0,
  lastTotal: null,
  listed: new Set(), // "list:resource" already shown (an alert comes on two topics)
  buckets: new Map(), // minute number (ms / 60000) -> questionnaires counted in it
  arms: [],
  ws: null,
  wsGen: 0,
  wsLive: false,
  wsAttempt: 0,
  wsTimer: null,
  tickTimer: null,
  tickGen: 0,
  lastStatsAt: 0,
  lastMetricsAt: 0,
  metricsPrev: null,
  commitMs: null,
};

class KeyRefused extends Error {}

// ---- small helpers ----------------------------------------------------------------------------

function setText(name, value) {
  const node = testid(name);
  const text = value === undefined || value === null ? '–' : String(value);
  if (node && node.textContent !== text) node.textContent = text;
}

function instrumentName(url) {
  return INSTRUMENTS[url] || String(url).replace(/^.*\//, '');
}

function timeText(iso) {
  const d = iso ? new Date(iso) : new Date();
  return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString();
}

function svg(name, attrs, parent) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (parent) parent.appendChild(node);
  return node;
}

function setConn(kind, text) {
  const node = el('conn');
  node.dataset.state = kind;
  node.textContent = text;
}

async function api(method, path, headers) {
  const res = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${state.key}`, ...(headers || {}) },
    cache: 'no-store',
    credentials: 'omit',
    referrerPolicy: 'no-referrer',
  });
  if (res.status === 401) {
    signOut('The server refused this key (mistyped, revoked or expired).');
    throw new KeyRefused();
  }
  return res;
}

// ---- sign in and trial choice -----------------------------------------------------------------

async function signIn(key, interactive) {
  state.key = key;
  el('login-error').textContent = '';
  let res;
  try {
    res = await api('GET', '/v1/trials');
  } catch (e) {
    if (!(e instanceof KeyRefused)) {
      el('login-error').textContent = 'Cannot reach the server. Is trialhub running?';
      state.key = null;
    }
    return;
  }
  if (res.status === 403) {
    signOut('This key cannot view trials (patient keys cannot); use an investigator, site or '
      + 'admin key.');
    return;
  }
  sessionStorage.setItem(KEY_ITEM, key);
  el('key').value = '';
  el('login').hidden = true;
  el('picker').hidden = false;
  el('sign-out').hidden = false;
  setConn('idle', 'signed in');
  let trials = null;
  if (res.ok) {
    trials = ((await res.json()).trials || []).map((t) => ({ id: t.id, name: t.name }));
  }
  fillPicker(trials, interactive);
}

// trials: [{id, name}], or null when the server cannot list them (then the user types an id).
function fillPicker(trials, interactive) {
  const select = el('trial-select');
  const input = el('trial-input');
  const remembered = sessionStorage.getItem(TRIAL_ITEM);
  select.replaceChildren();
  const typed = trials === null;
  select.hidden = typed;
  el('trial-select-label').hidden = typed;
  input.hidden = !typed;
  el('trial-input-label').hidden = !typed;
  el('trial-error').textContent = '';
  if (typed) {
    input.value = remembered || '';
    if (interactive) input.focus();
    if (remembered) showTrial(remembered);
    return;
  }
  for (const t of trials) {
    const option = document.createElement('option');
    option.value = t.id;
    option.textContent = t.name ? `${t.name} (${t.id})` : t.id;
    select.appendChild(option);
  }
  if (trials.length === 0) {
    el('trial-error').textContent = 'No trial is visible with this key.';
    return;
  }
  const pick = trials.find((t) => t.id === remembered) || (trials.length === 1 ? trials[0] : null);
  if (pick) {
    select.value = pick.id;
    showTrial(pick.id);
  } else if (interactive) {
    select.focus();
  }
}

function signOut(message) {
  sessionStorage.removeItem(KEY_ITEM);
  sessionStorage.removeItem(TRIAL_ITEM);
  state.key = null;
  stopTrial();
  el('dashboard').hidden = true;
  el('picker').hidden = true;
  el('sign-out').hidden = true;
  el('login').hidden = false;
  el('login-error').textContent = message || '';
  setConn('signed-out', 'signed out');
  el('key').focus();
}

function stopTrial() {
  state.trial = null;
  state.wsGen++;
  if (state.ws) state.ws.close(1000, 'bye');
  state.ws = null;
  state.wsLive = false;
  clearTimeout(state.wsTimer);
  clearTimeout(state.tickTimer);
  state.tickGen++;
}

function showTrial(id) {
  if (id === state.trial) {
    fetchProgress();
    return;
  }
  stopTrial();
  Object.assign(state, {
    trial: id, etag: null, lastTotal: null, buckets: new Map(), listed: new Set(), wsAttempt: 0,
    lastProgressAt: 0, lastStatsAt: 0, lastMetricsAt: 0, metricsPrev: null, commitMs: null,
  });
  sessionStorage.setItem(TRIAL_ITEM, id);
  el('site-rows').replaceChildren();
  el('alert-list').replaceChildren();
  el('feed').replaceChildren();
  el('feed-note').hidden = false;
  el('live-note').textContent = '';
  el('score-rows').replaceChildren();
  el('trial-title').textContent = id;
  el('dashboard').hidden = false;
  drawRate();
  fetchProgress();
  connectEvents();
  tick();
}

// ---- progress ---------------------------------------------------------------------------------

// Reads the progress document; concurrent callers coalesce into one more read after this one.
async function fetchProgress() {
  if (state.fetching) {
    state.again = true;
    return;
  }
  const trial = state.trial;
  state.fetching = true;
  try {
    do {
      state.again = false;
      const headers = state.etag ? { 'If-None-Match': state.etag } : {};
      const res = await api('GET', `/v1/trials/${encodeURIComponent(trial)}/progress`, headers);
      if (trial !== state.trial) return;
      state.lastProgressAt = Date.now();
      if (res.status === 200) {
        const doc = await res.json();
        if (trial !== state.trial) return;
        state.etag = res.headers.get('ETag');
        el('trial-error').textContent = '';
        renderProgress(doc);
      } else if (res.status === 404 || res.status === 403) {
        el('trial-error').textContent = res.status === 404
          ? `No trial "${trial}" (or it is not visible with this key).`
          : `This key may not view trial "${trial}".`;
        el('dashboard').hidden = true;
        stopTrial();
        return;
      } else if (res.status !== 304) {
        el('trial-error').textContent = `The server answered ${res.status}; retrying.`;
      }
    } while (state.again && trial === state.trial);
  } catch (e) {
    if (!(e instanceof KeyRefused) && trial === state.trial) {
      setConn('offline', 'server unreachable; retrying');
    }
  } finally {
    state.fetching = false;
  }
}

function renderProgress(p) {
  el('trial-title').textContent = p.name ? `${p.name} (${p.trial})` : p.trial;
  const asOf = el('as-of');
  asOf.dateTime = p.as_of || '';
  asOf.textContent = timeText(p.as_of);
  el('scope').textContent = p.scope === 'site' ? '· your site only' : '';
  state.arms = p.arms || Object.keys((p.enrolled && p.enrolled.by_arm) || {});

  const enrolled = p.enrolled || {};
  setText('enrolled-total', enrolled.total);
  setText('enrolled-arms', state.arms.map((a) => `${a}: ${(enrolled.by_arm || {})[a] || 0}`)
    .join(' · '));
  const q = p.questionnaires || {};
  setText('questionnaires-total', q.total);
  setText('questionnaires-today', q.today);
  const visits = p.visits || {};
  setText('visits-received', visits.received);
  setText('visits-expected', visits.expected);
  setText('visits-percent', visits.expected
    ? `${Math.round((100 * visits.received) / visits.expected)}%` : '–');
  setText('alerts-open', (p.alerts || {}).open);
  noteRate(q.total);
  renderSites(p.sites || []);
  renderScores(p.scores || []);
  renderAlertNote((p.alerts || {}).open);
}

function noteRate(total) {
  if (typeof total !== 'number') return;
  if (state.lastTotal !== null && total > state.lastTotal) {
    const minute = Math.floor(Date.now() / 60000);
    state.buckets.set(minute, (state.buckets.get(minute) || 0) + (total - state.lastTotal));
  }
  state.lastTotal = total;
  drawRate();
}

function renderLegend() {
  const legend = el('arm-legend');
  const want = state.arms.join(',');
  if (legend.dataset.arms === want) return;
  legend.dataset.arms = want;
  legend.replaceChildren();
  state.arms.forEach((arm, i) => {
    const item = document.createElement('span');
    const swatch = svg('svg', { width: 12, height: 12, class: 'swatch' });
    svg('rect', { width: 12, height: 12, rx: 2, class: `arm arm${i % 4}` }, swatch);
    item.append(swatch, ` arm ${arm}`);
    legend.appendChild(item);
  });
}

function siteRow(site) {
  const id = `site-row-${site.site}`;
  let row = document.getElementById(id);
  if (row) return row;
  row = document.createElement('tr');
  row.id = id;
  row.dataset.site = site.site;
  const name = document.createElement('th');
  name.scope = 'row';
  const code = document.createElement('span');
  code.className = 'code';
  code.textContent = site.site;
  name.append(code, ' ', document.createElement('span'));
  const enrolled = document.createElement('td');
  enrolled.className = 'bar-cell';
  const enrolledBar = svg('svg', { class: 'bar', viewBox: '0 0 160 14', 'aria-hidden': 'true' });
  const enrolledNum = document.createElement('span');
  enrolledNum.dataset.testid = `site-${site.site}-enrolled`;
  enrolled.append(enrolledBar, enrolledNum);
  const visits = document.createElement('td');
  visits.className = 'bar-cell';
  const visitsBar = svg('svg', { class: 'bar', viewBox: '0 0 160 14', 'aria-hidden': 'true' });
  svg('rect', { x: 0, y: 1, width: 160, height: 12, rx: 2, class: 'track' }, visitsBar);
  svg('rect', { x: 0, y: 1, width: 0, height: 12, rx: 2, class: 'done' }, visitsBar);
  const visitsText = document.createElement('span');
  const received = document.createElement('span');
  received.dataset.testid = `site-${site.site}-visits-received`;
  const expected = document.createElement('span');
  expected.dataset.testid = `site-${site.site}-visits-expected`;
  visitsText.append(received, ' / ', expected);
  visits.append(visitsBar, visitsText);
  row.append(name, enrolled, visits);
  for (const what of ['questionnaires', 'today', 'alerts']) {
    const cell = document.createElement('td');
    cell.className = 'num';
    cell.dataset.testid = `site-${site.site}-${what}`;
    row.appendChild(cell);
  }
  el('site-rows').appendChild(row);
  return row;
}

function renderSites(sites) {
  renderLegend();
  const maxEnrolled = Math.max(1, ...sites.map((s) => (s.enrolled || {}).total || 0));
  const seen = new Set();
  for (const s of sites) {
    seen.add(`site-row-${s.site}`);
    const row = siteRow(s);
    row.querySelector('th span:last-child').textContent = s.name || '';
    // Enrolment: one segment per arm, scaled to the largest site.
    const enrolled = s.enrolled || {};
    const bar = row.querySelector('td:nth-child(2) svg');
    bar.replaceChildren();
    let x = 0;
    state.arms.forEach((arm, i) => {
      const n = (enrolled.by_arm || {})[arm] || 0;
      const w = (160 * n) / maxEnrolled;
      if (w > 0) svg('rect', { x, y: 1, width: w, height: 12, class: `arm arm${i % 4}` }, bar);
      x += w;
    });
    setText(`site-${s.site}-enrolled`, enrolled.total);
    const visits = s.visits || {};
    const share = visits.expected ? Math.min(1, visits.received / visits.expected) : 0;
    row.querySelector('rect.done').setAttribute('width', String(160 * share));
    setText(`site-${s.site}-visits-received`, visits.received);
    setText(`site-${s.site}-visits-expected`, visits.expected);
    setText(`site-${s.site}-questionnaires`, (s.questionnaires || {}).total);
    setText(`site-${s.site}-today`, (s.questionnaires || {}).today);
    setText(`site-${s.site}-alerts`, (s.alerts || {}).open);
    row.classList.toggle('has-alerts', ((s.alerts || {}).open || 0) > 0);
  }
  for (const row of [...el('site-rows').children]) {
    if (!seen.has(row.id)) row.remove();
  }
}

function renderScores(scores) {
  const body = el('score-rows');
  body.replaceChildren();
  for (const s of scores) {
    const row = document.createElement('tr');
    const cells = [instrumentName(s.instrument), s.week, s.n,
      typeof s.mean === 'number' ? s.mean.toFixed(2) : '–'];
    cells.forEach((value, i) => {
      const cell = document.createElement(i === 0 ? 'th' : 'td');
      if (i === 0) cell.scope = 'row';
      else cell.className = 'num';
      cell.textContent = String(value);
      row.appendChild(cell);
    });
    body.appendChild(row);
  }
  if (scores.length === 0) {
    const row = document.createElement('tr');
    const cell = document.createElement('td');
    cell.colSpan = 4;
    cell.className = 'detail';
    cell.textContent = 'No scores yet.';
    row.appendChild(cell);
    body.appendChild(row);
  }
}

function renderAlertNote(open) {
  const listed = el('alert-list').children.length;
  let note = '';
  if (!open) note = 'No open alerts.';
  else if (listed < open) {
    note = `${open - listed} open alert${open - listed === 1 ? '' : 's'} raised before this page `
      + 'opened (counted per site above); new ones appear here as they are raised.';
  }
  el('alerts-note').textContent = note;
}

// ---- the per-minute line ----------------------------------------------------------------------

function drawRate() {
  const chart = el('rate-chart');
  const W = 400; const H = 170; const left = 30; const right = 8; const top = 10; const bottom = 24;
  const now = Math.floor(Date.now() / 60000);
  const counts = [];
  for (let m = now - RATE_MINUTES + 1; m <= now; m++) counts.push(state.buckets.get(m) || 0);
  for (const m of state.buckets.keys()) if (m <= now - RATE_MINUTES) state.buckets.delete(m);
  const max = Math.max(4, ...counts);
  const yMax = Math.ceil(max / 4) * 4;
  const x = (i) => left + ((W - left - right) * i) / (RATE_MINUTES - 1);
  const y = (v) => top + (H - top - bottom) * (1 - v / yMax);
  chart.replaceChildren();
  for (let g = 0; g <= 4; g++) {
    const v = (yMax * g) / 4;
    svg('line', { x1: left, x2: W - right, y1: y(v), y2: y(v), class: 'grid' }, chart);
    svg('text', { x: left - 6, y: y(v) + 4, class: 'axis', 'text-anchor': 'end' }, chart)
      .textContent = String(v);
  }
  [[0, `−${RATE_MINUTES - 1} min`], [RATE_MINUTES - 1, 'now']].forEach(([i, label]) => {
    svg('text', { x: x(i), y: H - 6, class: 'axis', 'text-anchor': i ? 'end' : 'start' }, chart)
      .textContent = label;
  });
  const points = counts.map((c, i) => `${x(i).toFixed(1)},${y(c).toFixed(1)}`);
  svg('path', {
    d: `M${x(0)},${y(0)} L${points.join(' L')} L${x(RATE_MINUTES - 1)},${y(0)} Z`, class: 'area',
  }, chart);
  svg('polyline', { points: points.join(' '), class: 'line' }, chart);
  svg('circle', { cx: x(RATE_MINUTES - 1), cy: y(counts[counts.length - 1]), r: 3, class: 'dot' },
    chart);
  setText('rate-minute', counts[counts.length - 1]);
  setText('rate-window', counts.reduce((a, b) => a + b, 0));
}

// ---- live events ------------------------------------------------------------------------------

function reconnectLater() {
  const gen = state.wsGen;
  const delay = Math.min(RECONNECT_MAX_MS, 1000 * 2 ** state.wsAttempt) * (0.5 + Math.random() / 2);
  state.wsAttempt = Math.min(state.wsAttempt + 1, 10);
  clearTimeout(state.wsTimer);
  state.wsTimer = setTimeout(() => {
    if (gen === state.wsGen && state.trial) connectEvents();
  }, delay);
}

function socketDown(gen) {
  if (gen !== state.wsGen) return;
  state.ws = null;
  state.wsLive = false;
  setConn('polling', `polling every ${TICK_MS / 1000} s (live updates reconnecting)`);
  reconnectLater();
}

async function connectEvents() {
  const gen = ++state.wsGen;
  const trial = state.trial;
  setConn('connecting', 'connecting…');
  let ticket;
  try {
    const res = await api('POST', '/v1/events/ticket');
    if (gen !== state.wsGen) return;
    if (res.status !== 201) throw new Error(`ticket: ${res.status}`);
    ticket = (await res.json()).ticket;
  } catch (e) {
    if (!(e instanceof KeyRefused)) socketDown(gen);
    return;
  }
  if (gen !== state.wsGen) return;
  const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
  let ws;
  try {
    ws = new WebSocket(`${scheme}${location.host}/v1/events?ticket=${encodeURIComponent(ticket)}`);
  } catch (e) {
    socketDown(gen);
    return;
  }
  state.ws = ws;
  ws.onopen = () => {
    if (gen !== state.wsGen) return;
    ws.send(JSON.stringify({ subscribe: [`trial:${trial}`, 'alerts', 'system'] }));
  };
  ws.onmessage = (ev) => {
    if (gen !== state.wsGen) return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    onEvent(msg);
  };
  ws.onerror = () => {};
  ws.onclose = () => socketDown(gen);
}

function onEvent(msg) {
  if (Array.isArray(msg.subscribed)) {
    state.wsLive = true;
    state.wsAttempt = 0;
    setConn('live', 'live');
    fetchProgress(); // whatever happened while the socket was down
    return;
  }
  if (msg.error) {
    // A refused topic (a site key may not have "system": the panel then reads /metrics).
    const what = msg.error.topic ? `topic ${msg.error.topic}` : 'live updates';
    el('live-note').textContent = `Server on ${what}: ${msg.error.reason || 'refused'}.`;
    return;
  }
  switch (msg.type) {
    case 'progress.changed':
      if (msg.trial === undefined || msg.trial === state.trial) fetchProgress();
      break;
    case 'submission.accepted':
      if (msg.topic === `trial:${state.trial}`) {
        addItem('feed', msg.resource, [timeText(msg.at), msg.patient,
          instrumentName(msg.instrument), msg.resource]);
      }
      break;
    case 'alert.raised':
      // Published on both "alerts" and "trial:<id>": listed once, by resource.
      if (msg.trial === state.trial) {
        addItem('alert-list', msg.resource, [timeText(msg.at), `patient ${msg.patient}`,
          `site ${msg.site}`, msg.resource], 'alert');
        fetchProgress();
      }
      break;
    case 'system.stats':
      state.lastStatsAt = Date.now();
      renderSystem(msg.pool || {}, msg.writer || {}, 'live from the server');
      break;
    default:
      break;
  }
}

function addItem(listId, resource, parts, cls) {
  const seen = `${listId}:${resource}`;
  if (resource && state.listed.has(seen)) return;
  if (resource) state.listed.add(seen);
  const list = el(listId);
  const item = document.createElement('li');
  item.dataset.seen = seen;
  if (cls) item.className = cls;
  parts.filter((p) => p !== undefined && p !== null).forEach((part, i) => {
    const span = document.createElement('span');
    span.textContent = String(part);
    if (i === 0) span.className = 'when';
    item.appendChild(span);
  });
  list.prepend(item);
  while (list.children.length > LIST_MAX) {
    state.listed.delete(list.lastElementChild.dataset.seen);
    list.lastElementChild.remove();
  }
  el('feed-note').hidden = el('feed').children.length > 0;
}

// ---- the system panel -------------------------------------------------------------------------

function renderSystem(pool, writer, source) {
  setText('pool-busy', pool.busy);
  setText('pool-threads', pool.threads);
  setText('pool-queued', pool.queued);
  setText('pool-rejected', pool.rejected);
  setText('writer-queued', writer.queued);
  if (typeof writer.commit_ms === 'number') state.commitMs = writer.commit_ms;
  setText('writer-commit-ms', state.commitMs === null ? null : state.commitMs.toFixed(2));
  el('system-source').textContent = `Source: ${source}.`;
}

function parseMetrics(text) {
  const values = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)/.exec(line);
    if (m) values[m[1]] = Number(m[2]);
  }
  return values;
}

// Without system.stats (socket down), the same figures from the public /metrics endpoint.
async function pollMetrics() {
  state.lastMetricsAt = Date.now();
  let values;
  try {
    const res = await fetch('/metrics', { cache: 'no-store', credentials: 'omit' });
    if (!res.ok) return;
    values = parseMetrics(await res.text());
  } catch (e) {
    return;
  }
  const pool = (s) => values[`trialhub_pool_tasks{pool="scoring",state="${s}"}`];
  const sum = values.trialhub_writer_commit_seconds_sum;
  const count = values.trialhub_writer_commit_seconds_count;
  const prev = state.metricsPrev;
  let commitMs;
  if (prev && count > prev.count) commitMs = (1000 * (sum - prev.sum)) / (count - prev.count);
  else if (!prev && count > 0) commitMs = (1000 * sum) / count;
  state.metricsPrev = { sum, count };
  renderSystem({
    busy: pool('busy'),
    threads: pool('threads'),
    queued: pool('queued'),
    rejected: values['trialhub_pool_events_total{pool="scoring",event="rejected"}'],
  }, { queued: values.trialhub_writer_queue_jobs, commit_ms: commitMs }, 'polled from /metrics');
}

// ---- the loop ---------------------------------------------------------------------------------

async function tick() {
  clearTimeout(state.tickTimer);
  const gen = ++state.tickGen;
  if (!state.trial) return;
  const now = Date.now();
  if (!state.wsLive || now - state.lastProgressAt >= LIVE_REFRESH_MS) await fetchProgress();
  if (now - state.lastStatsAt > STATS_FRESH_MS && now - state.lastMetricsAt >= METRICS_EVERY_MS) {
    await pollMetrics();
  }
  drawRate();
  if (gen === state.tickGen && state.trial) state.tickTimer = setTimeout(tick, TICK_MS);
}

// ---- start ------------------------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  el('key-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = el('key').value.trim();
    if (!key) {
      el('login-error').textContent = 'Enter an API key.';
      return;
    }
    signIn(key, true);
  });
  el('trial-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const id = (el('trial-input').hidden ? el('trial-select').value : el('trial-input').value)
      .trim();
    if (id) showTrial(id);
  });
  el('sign-out').addEventListener('click', () => signOut(''));
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) signIn(key, false);
  else el('key').focus();
});
