// The dashboard in a real browser: playwright-core drives Debian's chromium against a running
// trialhub. Run by tests/browser/test_dashboard.py, which starts the server, seeds trial T1 and
// passes TRIALHUB_BASE, TRIALHUB_KEY (an investigator key), TRIALHUB_PLAN (submissions and the
// numbers the page must show after each) and TRIALHUB_SCREENSHOT.
//
// Phase 1: the page's own headers (CSP and friends), sign in through the form, pick the trial,
// the WebSocket goes live; each submission's numbers appear within 2 s of its 201; the key is
// in sessionStorage only. Phase 2: a second browser context where the WebSocket is refused; the
// page falls back to polling and still shows the next submission.
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';

const base = process.env.TRIALHUB_BASE;
const key = process.env.TRIALHUB_KEY;
const plan = JSON.parse(process.env.TRIALHUB_PLAN);
const screenshot = process.env.TRIALHUB_SCREENSHOT;
const LIVE_DEADLINE_MS = 2000;
const POLL_DEADLINE_MS = 4000; // the page polls every 2 s without its socket
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
  + "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function checkAssetHeaders() {
  for (const [path, type] of [['/', 'text/html; charset=utf-8'],
    ['/app.js', 'text/javascript; charset=utf-8'], ['/style.css', 'text/css; charset=utf-8']]) {
    const res = await fetch(base + path);
    assert.equal(res.status, 200, path);
    assert.equal(res.headers.get('content-type'), type, path);
    assert.equal(res.headers.get('content-security-policy'), CSP, path);
    assert.equal(res.headers.get('x-content-type-options'), 'nosniff', path);
    assert.equal(res.headers.get('referrer-policy'), 'no-referrer', path);
    assert.equal(res.headers.get('cache-control'), 'no-cache', path);
    const etag = res.headers.get('etag');
    assert.match(etag, /^"[0-9a-f]{16}"$/, path);
    assert.ok((await res.text()).length > 100, path);
    const again = await fetch(base + path, { headers: { 'If-None-Match': `W/${etag}` } });
    assert.equal(again.status, 304, `${path} with If-None-Match`);
  }
}

async function readNumbers(page, names) {
  return page.evaluate((ids) => Object.fromEntries(ids.map((id) => {
    const node = document.querySelector(`[data-testid="${id}"]`);
    return [id, node ? node.textContent.trim() : null];
  })), names);
}

// Waits until every data-testid in expect shows its value; returns the ms it took from start.
async function waitNumbers(page, expect, start, deadlineMs, what) {
  const names = Object.keys(expect);
  for (;;) {
    const seen = await readNumbers(page, names);
    const wrong = names.filter((n) => seen[n] !== String(expect[n]));
    if (wrong.length === 0) return Date.now() - start;
    if (Date.now() - start > deadlineMs) {
      throw new Error(`${what}: ${Date.now() - start} ms on, the page shows `
        + wrong.map((n) => `${n}=${seen[n]} (want ${expect[n]})`).join(', '));
    }
    await sleep(20);
  }
}

async function waitState(page, wanted, timeoutMs) {
  await page.waitForFunction(
    (w) => document.getElementById('conn').dataset.state === w, wanted, { timeout: timeoutMs });
}

async function submit(step) {
  const res = await fetch(`${base}/fhir/QuestionnaireResponse`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${step.key}`, 'Content-Type': 'application/fhir+json' },
    body: JSON.stringify(step.qr),
  });
  assert.equal(res.status, 201, `${step.name}: ${await res.text()}`);
  return Date.now();
}

async function signIn(page) {
  const response = await page.goto(`${base}/`);
  assert.equal(response.status(), 200);
  await page.getByTestId('key-input').fill(key);
  await page.getByTestId('key-submit').click();
  await page.waitForFunction(() => [...document.querySelectorAll('#trial-select option')]
    .some((o) => o.value === 'T1'), null, { timeout: 10000 });
  await page.getByTestId('trial-select').selectOption('T1');
  await page.getByTestId('trial-submit').click();
}

async function checkKeyStorage(page) {
  assert.ok(!page.url().includes(key), 'the key is in the URL');
  const storage = await page.evaluate(() => ({
    local: Object.keys(localStorage).map((k) => k + localStorage.getItem(k)).join('\n'),
    localCount: localStorage.length,
    session: Object.keys(sessionStorage).map((k) => sessionStorage.getItem(k)).join('\n'),
    cookie: document.cookie,
    input: document.getElementById('key').value,
  }));
  assert.equal(storage.localCount, 0, `localStorage is not empty: ${storage.local}`);
  assert.ok(!storage.local.includes(key), 'the key is in localStorage');
  assert.ok(storage.session.includes(key), 'the key is not in sessionStorage');
  assert.equal(storage.cookie, '', 'the page set a cookie');
  assert.equal(storage.input, '', 'the key is still in the form field');
}

const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
    '--disable-background-networking', '--disable-component-update', '--no-first-run',
    '--disable-default-apps', '--disable-sync'],
});
try {
  await checkAssetHeaders();
  console.log('headers: CSP, nosniff, no-referrer, ETag/304 on /, /app.js, /style.css');

  // ---- phase 1: live over the WebSocket ----
  const context = await browser.newContext({ viewport: { width: 1440, height: 1000 } });
  await context.addInitScript(() => {
    window.cspViolations = [];
    document.addEventListener('securitypolicyviolation',
      (e) => window.cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
  });
  const page = await context.newPage();
  const problems = [];
  page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); });
  page.on('pageerror', (e) => problems.push(String(e)));
  const wsUrls = [];
  page.on('websocket', (ws) => wsUrls.push(ws.url()));

  await signIn(page);
  let start = Date.now();
  await waitNumbers(page, plan.initial, start, 10000, 'initial numbers');
  await waitState(page, 'live', 10000).catch(() => {
    throw new Error('the WebSocket did not go live within 10 s (is GET /v1/events there?); '
      + `state: ${problems.join(' | ')}`);
  });
  console.log(`signed in, trial T1 shown, live over ${wsUrls.length} WebSocket(s)`);
  await checkKeyStorage(page);
  assert.ok(wsUrls.every((u) => !u.includes(key)), 'the key is in a WebSocket URL');

  for (const step of plan.steps) {
    const t201 = await submit(step);
    const took = await waitNumbers(page, step.expect, t201, LIVE_DEADLINE_MS, step.name);
    if (step.alert) {
      await page.waitForFunction((p) => [...document.querySelectorAll('#alert-list li')]
        .some((li) => li.textContent.includes(`patient ${p}`)), step.patient,
      { timeout: Math.max(1, LIVE_DEADLINE_MS - (Date.now() - t201)) });
    }
    console.log(`${step.name}: on the page ${took} ms after the 201`);
  }
  const n = plan.steps.length;
  await waitNumbers(page, { 'rate-window': n }, Date.now(), 1000, 'questionnaires per minute');
  const feed = await page.locator('#feed li').count();
  assert.equal(feed, n, 'latest submissions list (submission.accepted events)');
  const alerts = await page.locator('#alert-list li').count();
  assert.equal(alerts, plan.steps.filter((s) => s.alert).length, 'alerts listed once each');
  await page.waitForFunction(() => /^\d+$/.test(document.querySelector(
    '[data-testid="pool-threads"]').textContent), null, { timeout: 8000 });
  const system = await readNumbers(page, ['pool-busy', 'pool-threads', 'pool-queued',
    'pool-rejected', 'writer-commit-ms', 'system-source']);
  console.log(`system panel: ${JSON.stringify(system)}`);
  const polylines = await page.locator('#rate-chart polyline').count();
  assert.equal(polylines, 1, 'the per-minute line is drawn');
  await checkKeyStorage(page);
  assert.deepEqual(await page.evaluate(() => window.cspViolations), [], 'CSP violations');
  assert.deepEqual(problems, [], 'console errors');
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`screenshot: ${screenshot}`);

  // A reload keeps the session (sessionStorage), with no new sign-in.
  await page.reload();
  start = Date.now();
  await waitNumbers(page, plan.steps[n - 1].expect, start, 10000, 'after a reload');
  assert.equal(await page.getByTestId('key-input').isVisible(), false, 'asked for the key again');
  await waitState(page, 'live', 10000);
  // Signing out forgets the key.
  await page.getByTestId('sign-out').click();
  assert.equal(await page.evaluate(() => sessionStorage.length), 0, 'sign out left storage');
  assert.equal(await page.getByTestId('key-input').isVisible(), true);
  console.log('reload keeps the session; sign out forgets the key');
  await context.close();

  // ---- phase 2: no WebSocket, the page polls ----
  const blocked = await browser.newContext({ viewport: { width: 1440, height: 1000 } });
  let refused = 0;
  await blocked.routeWebSocket(/\/v1\/events/, (ws) => {
    refused++;
    ws.close({ code: 1011, reason: 'blocked by the test' });
  });
  const page2 = await blocked.newPage();
  await signIn(page2);
  start = Date.now();
  await waitNumbers(page2, plan.steps[n - 1].expect, start, 10000, 'numbers without WebSocket');
  await waitState(page2, 'polling', 10000);
  const t201 = await submit(plan.fallback);
  const took = await waitNumbers(page2, plan.fallback.expect, t201, POLL_DEADLINE_MS,
    plan.fallback.name);
  assert.ok(refused >= 1, 'the page never tried the WebSocket');
  await page2.waitForFunction(() => document.querySelector('[data-testid="system-source"]')
    .textContent.includes('/metrics'), null, { timeout: 8000 });
  console.log(`${plan.fallback.name}: on the page ${took} ms after the 201 `
    + `(${refused} WebSocket attempt(s) refused)`);
  await blocked.close();
  console.log('dashboard test passed');
} finally {
  await browser.close();
}
