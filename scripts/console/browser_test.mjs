// Headless-Chromium test of the chime web console.
//
// Drives the system Chromium (Debian's /usr/bin/chromium) with playwright-core; no
// browser download. Every wait has a deadline; no blind sleeps.
//
//   CONSOLE_URL     console address, e.g. http://127.0.0.1:18080/ (required)
//   ADMIN_TOKEN     admin token ('' when the coordinator runs without auth)
//   CHROMIUM_PATH   default /usr/bin/chromium
//   SCREENSHOT_DIR  optional: console-overview.png, console-queues.png, console-jobs.png,
//                   console-run.png, console-alerts.png, console-workflow.png
//                   (and console-failure.png when a step fails), 1280x800
//   JOB_NAME        default browser-job
//
// Fails on an uncaught page exception or a Content-Security-Policy violation; other
// browser console errors (e.g. the expected 400 of the refused create) are logged.
//
// Prints one JSON line on success and exits 0; on failure prints which step failed
// and why, and exits 1.

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';

const CONSOLE_URL = process.env.CONSOLE_URL || '';
const TOKEN = process.env.ADMIN_TOKEN || '';
const VIEWER_TOKEN = process.env.VIEWER_TOKEN || '';
const TEAM_TOKEN = process.env.TEAM_TOKEN || '';
const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SHOTS = process.env.SCREENSHOT_DIR || '';
const JOB = process.env.JOB_NAME || 'browser-job';
const TOTAL_DEADLINE_MS = 240_000;
const started = Date.now();

const consoleErrors = [];
const pageErrors = [];
const cspViolations = [];
let browser = null;
let page = null;
let currentStep = 'start';

function log(msg) {
  process.stderr.write(`[browser-test +${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}\n`);
}

async function fail(message) {
  process.stderr.write(`\nFAIL in step "${currentStep}": ${message}\n`);
  if (consoleErrors.length) process.stderr.write(`browser console errors:\n  ${consoleErrors.join('\n  ')}\n`);
  if (pageErrors.length) process.stderr.write(`uncaught page exceptions:\n  ${pageErrors.join('\n  ')}\n`);
  if (page) {
    try {
      process.stderr.write(`page url: ${page.url()}\n`);
      if (SHOTS) {
        await page.screenshot({ path: path.join(SHOTS, 'console-failure.png'), fullPage: true, timeout: 5000 });
        process.stderr.write(`screenshot: ${path.join(SHOTS, 'console-failure.png')}\n`);
      }
    } catch (_) {
      // best effort
    }
  }
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}

const watchdog = setTimeout(() => {
  fail(`the whole test took longer than ${TOTAL_DEADLINE_MS / 1000} s`);
}, TOTAL_DEADLINE_MS);

async function step(name, fn) {
  currentStep = name;
  const t0 = Date.now();
  log(`step: ${name}`);
  try {
    const r = await fn();
    if (pageErrors.length) throw new Error(`the page threw: ${pageErrors[0]}`);
    if (cspViolations.length) throw new Error(`the page broke the coordinator's Content-Security-Policy: ${cspViolations[0]}`);
    log(`  ok (${Date.now() - t0} ms)`);
    return r;
  } catch (e) {
    await fail(e && e.message ? e.message : String(e));
    return undefined;
  }
}

function check(cond, message) {
  if (!cond) throw new Error(message);
}

// Polls `probe` until it returns a truthy value or the deadline passes.
async function waitUntil(what, probe, timeoutMs, intervalMs = 250) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) {
      const detail = last instanceof Error ? ` (last error: ${last.message})` : '';
      throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what}${detail}`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

async function visible(selector, what, timeoutMs = 10_000) {
  try {
    await page.locator(selector).first().waitFor({ state: 'visible', timeout: timeoutMs });
  } catch (_) {
    throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what} (${selector}) to be visible`);
  }
  return page.locator(selector).first();
}

async function hidden(selector, what, timeoutMs = 10_000) {
  try {
    await page.locator(selector).first().waitFor({ state: 'hidden', timeout: timeoutMs });
  } catch (_) {
    throw new Error(`timed out after ${timeoutMs / 1000} s waiting for ${what} (${selector}) to go away`);
  }
}

// The HTTP API, called from the test itself (not through the page).
async function apiCall(method, p, body) {
  const headers = { Accept: 'application/json' };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const url = new URL(p, CONSOLE_URL);
  let resp;
  try {
    resp = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(10_000) });
  } catch (e) {
    throw new Error(`${method} ${url} failed: ${e.cause ? e.cause.message || e.cause.code : e.message}`);
  }
  const text = await resp.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch (_) {
    json = null;
  }
  return { status: resp.status, json, text };
}

async function shot(name) {
  if (!SHOTS) return;
  const file = path.join(SHOTS, name);
  await page.screenshot({ path: file, fullPage: false, timeout: 10_000 });
  log(`  screenshot ${file}`);
}

async function nav(section) {
  await page.locator(`#nav-${section}`).click();
  await waitUntil(`the ${section} view`, () => page.evaluate((s) => {
    const v = document.querySelector('#view');
    return v.dataset.view === s && v.dataset.loaded === 'true';
  }, section), 10_000, 100);
}

const jobRow = `tr[data-job="${JOB}"]`;

// Traffic for the charts: a batch of reminders every second (3 to 12 of them, due
// within 2.5 s) and, every third second, an item of the always-failing handler
// (two attempts, then a dead letter), through the JSON API like any producer.
let traffic = null;
let trafficTicks = 0;
let trafficErrors = 0;
function startTraffic() {
  const run = Date.now().toString(36);
  traffic = setInterval(async () => {
    const tick = trafficTicks++;
    const n = 3 + ((tick * 7) % 10);
    const items = Array.from({ length: n }, (_, i) => ({ id: `chart-${run}-${tick}-${i}`, handler: 'remind', in_ms: (i * 250) % 2500 }));
    if (tick % 3 === 0) items.push({ id: `chart-${run}-${tick}-fail`, handler: 'fail', max_attempts: 2 });
    const r = await apiCall('POST', '/api/queues/items', { items }).catch(() => ({ status: 0 }));
    if (r.status !== 200) trafficErrors += 1;
  }, 1000);
}

// How many points each series of a chart drew, and how many were above zero.
async function chartPoints(grid) {
  return page.$$eval(`[data-testid="${grid}"] path.line`, (paths) => Object.fromEntries(paths.map((p) => [
    `${p.closest('[data-chart]').dataset.chart}.${p.dataset.series}`,
    { points: Number(p.dataset.points), nonzero: Number(p.dataset.nonzero) },
  ])));
}

// Waits until every `want` series ("chart.series": least non-zero points) is
// drawn, on the 5-minute window (a test run lasts about a minute; the overview
// waits for a minute of traffic, so its screenshot shows a filled chart).
async function chartsFilled(grid, want) {
  await page.locator(`[data-testid="${grid}"]`).waitFor({ state: 'attached' });
  await page.locator('#chart-range-5').click();
  let last = {};
  try {
    await waitUntil(`the ${grid} charts to draw the run`, async () => {
      last = await chartPoints(grid);
      return Object.entries(want).every(([k, n]) => last[k] && last[k].nonzero >= n);
    }, 120_000, 500);
  } catch (e) {
    throw new Error(`${e.message}; drawn: ${JSON.stringify(last)}`);
  }
  return last;
}
let createdAtMs = 0; // runs of an earlier job of the same name stay in the history

async function main() {
  if (!CONSOLE_URL) {
    process.stderr.write('CONSOLE_URL is not set (e.g. http://127.0.0.1:18080/)\n');
    process.exit(2);
  }
  if (SHOTS) mkdirSync(SHOTS, { recursive: true });
  const summary = { ok: false, url: CONSOLE_URL, job: JOB };

  await step('launch chromium', async () => {
    browser = await chromium.launch({
      executablePath: CHROMIUM_PATH,
      headless: true,
      timeout: 30_000,
      args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    page = await context.newPage();
    page.setDefaultTimeout(10_000);
    page.on('console', (msg) => {
      if (msg.type() === 'error') {
        const text = `${msg.text()}${msg.location() && msg.location().url ? ` (${msg.location().url})` : ''}`;
        consoleErrors.push(text);
        if (/Content Security Policy/i.test(text)) cspViolations.push(text);
        log(`  browser console error: ${text}`);
      }
    });
    page.on('pageerror', (err) => {
      pageErrors.push(String(err && err.stack ? err.stack : err));
      log(`  UNCAUGHT page exception: ${err}`);
    });
    summary.chromium = browser.version();
  });

  await step('clean up a job left by an earlier run', async () => {
    const r = await apiCall('GET', `/api/jobs/${encodeURIComponent(JOB)}`);
    if (r.status === 200) {
      const d = await apiCall('DELETE', `/api/jobs/${encodeURIComponent(JOB)}`);
      check(d.status === 200, `DELETE /api/jobs/${JOB} answered ${d.status}: ${d.text}`);
      log(`  deleted a leftover ${JOB}`);
    } else {
      check(r.status === 404, `GET /api/jobs/${JOB} answered ${r.status}: ${r.text}`);
    }
  });

  await step('1. open the console and log in', async () => {
    const session = await apiCall('GET', '/api/session');
    check(session.status === 200 && session.json, `GET /api/session answered ${session.status}: ${session.text}`);
    await page.goto(CONSOLE_URL, { waitUntil: 'domcontentloaded', timeout: 15_000 });
    if (session.json.auth_required) {
      check(TOKEN, 'the coordinator requires a token but ADMIN_TOKEN is empty');
      await visible('#login-token', 'the login form');
      // A wrong token is refused with a message, and the form stays.
      await page.locator('#login-token').fill(`${TOKEN}-wrong`);
      await page.locator('#login-submit').click();
      const msg = await visible('#login-message', 'the refused-token message');
      check(/refused|wrong|invalid/i.test(await msg.innerText()), `unexpected login message: ${await msg.innerText()}`);
      await page.locator('#login-token').fill(TOKEN);
      await page.locator('#login-submit').click();
    }
    await visible('#topbar', 'the top bar after login');
    await hidden('#login', 'the login form');
    await waitUntil('the overview to load', () => page.evaluate(() => document.querySelector('#view').dataset.loaded === 'true'), 10_000, 100);
    summary.auth_required = !!session.json.auth_required;
    startTraffic();
  });

  await step('2. a bad cron expression is refused next to its input', async () => {
    await nav('jobs');
    await page.locator('#job-new').click();
    await visible('#job-form', 'the job form');
    await page.locator('#job-name').fill(JOB);
    await page.locator('#job-group').fill('demo');
    await page.locator('#job-handler').fill('demo.echo');
    await page.locator('#job-schedule-kind').selectOption('cron');
    await page.locator('#job-schedule-expr').fill('not a cron');
    await page.locator('#job-routing').selectOption('sharding_broadcast');
    await page.locator('#job-shard-count').fill('2');
    await page.locator('#job-params').fill('hello');
    await page.locator('#job-save').click();

    const err = await visible('[data-field-wrap="schedule.expr"] [data-error-for="schedule.expr"]', 'the error next to the cron expression input');
    const errText = (await err.innerText()).trim();
    check(errText.length > 0, 'the cron field error is empty');
    // It sits in the same field block as the cron input, which is marked invalid.
    const sameWrap = await page.evaluate(() => {
      const input = document.querySelector('#job-schedule-expr');
      const e = document.querySelector('[data-error-for="schedule.expr"]');
      return input.closest('[data-field-wrap]') === e.closest('[data-field-wrap]') && input.classList.contains('invalid');
    });
    check(sameWrap, 'the cron error is not next to the cron input, or the input is not marked invalid');
    await visible('#job-errors', 'the error summary at the top of the form');
    // Nothing else changed: still on the form, with what was typed.
    check(page.url().endsWith('#/jobs/new'), `the console left the form: ${page.url()}`);
    check((await page.locator('#job-name').inputValue()) === JOB, 'the name input lost its value');
    check((await page.locator('#job-params').inputValue()) === 'hello', 'the params input lost its value');
    const otherErrors = await page.locator('[data-testid="field-error"]:visible').count();
    check(otherErrors === 1, `expected exactly one field error, saw ${otherErrors}`);
    const r = await apiCall('GET', `/api/jobs/${encodeURIComponent(JOB)}`);
    check(r.status === 404, `GET /api/jobs/${JOB} after the refused create answered ${r.status} (want 404): ${r.text}`);
    check(r.json && r.json.error && r.json.error.code === 'not_found', `404 body is not a not_found error: ${r.text}`);
    summary.cron_error = errText;
  });

  await step('3. fix the cron expression and create the job', async () => {
    await page.locator('#job-schedule-expr').fill('*/2 * * * * *');
    await hidden('[data-error-for="schedule.expr"]', 'the cron error once the input changes', 5_000);
    createdAtMs = Date.now();
    await page.locator('#job-save').click();
    await waitUntil('the jobs list after creating', () => page.url().endsWith('#/jobs'), 10_000, 100);
    const row = await visible(jobRow, `the ${JOB} row in the jobs list`);
    const text = await row.innerText();
    check(text.includes('demo') && text.includes('demo.echo'), `the ${JOB} row lacks its group or handler: ${text}`);
    const r = await apiCall('GET', `/api/jobs/${encodeURIComponent(JOB)}`);
    check(r.status === 200, `GET /api/jobs/${JOB} answered ${r.status}: ${r.text}`);
    const j = r.json;
    check(j.group === 'demo' && j.handler === 'demo.echo', `stored group/handler: ${j.group}/${j.handler}`);
    check(j.schedule && j.schedule.kind === 'cron' && j.schedule.expr === '*/2 * * * * *', `stored schedule: ${JSON.stringify(j.schedule)}`);
    check(j.routing === 'sharding_broadcast' && j.shard_count === 2, `stored routing/shards: ${j.routing}/${j.shard_count}`);
    check(j.params === 'hello' && j.paused === false, `stored params/paused: ${JSON.stringify(j.params)}/${j.paused}`);
  });

  await step('4. a scheduled run succeeds on 2 shards', async () => {
    await nav('runs');
    await page.locator('#runs-filter-job').fill(JOB);
    await page.locator('#runs-filter-job').press('Enter');
    await waitUntil('the runs page filtered by job', () => decodeURIComponent(page.url()).endsWith(`#/runs?job=${JOB}`), 5_000, 100);
    const rows = `tr[data-run][data-job="${JOB}"][data-cause="scheduled"][data-state="succeeded"]`;
    const runId = await waitUntil(`a succeeded scheduled run of ${JOB} on the runs page`, () => page.$$eval(rows,
      (trs, since) => (trs.find((tr) => Number(tr.dataset.scheduledMs) >= since) || {}).dataset?.run, createdAtMs - 1000), 30_000);
    await page.locator(`tr[data-run="${runId.replace(/"/g, '\\"')}"] [data-testid="run-link"]`).click();
    await waitUntil('the run page', () => page.evaluate(() => document.querySelector('#view').dataset.loaded === 'true' && document.querySelectorAll('[data-testid="shard-row"]').length > 0), 10_000, 100);
    const badge = page.locator('.page-head [data-testid="run-state"]');
    check((await badge.getAttribute('data-state')) === 'succeeded', `run badge state: ${await badge.getAttribute('data-state')}`);
    const shards = await page.$$eval('[data-testid="shard-row"]', (rows) => rows.map((r) => ({
      index: r.dataset.shard,
      state: r.dataset.state,
      label: r.cells[0].innerText.trim(),
      worker: r.querySelector('[data-testid="shard-worker"]').innerText.trim(),
    })));
    check(shards.length === 2, `expected 2 shards, saw ${shards.length}: ${JSON.stringify(shards)}`);
    for (const s of shards) {
      check(s.state === 'succeeded', `shard ${s.index} is ${s.state}`);
      check(s.worker && s.worker !== '—', `shard ${s.index} has no worker id`);
      check(/^[01]\/2$/.test(s.label), `shard label ${s.label} is not index/2`);
    }
    const logs = await page.$$eval('[data-testid="shard-log"]', (pres) => pres.map((p) => p.innerText));
    check(logs.some((l) => l.includes('hello')), `no shard log tail mentions the params "hello": ${JSON.stringify(logs)}`);
    await shot('console-run.png');
    summary.scheduled_run = runId;
    summary.shards = shards;
  });

  await step('5. trigger with params from the jobs page; the manual run succeeds', async () => {
    await nav('jobs');
    await visible(jobRow, `the ${JOB} row`);
    await page.locator(`${jobRow} [data-action="trigger"]`).click();
    await visible('#trigger-dialog', 'the trigger dialog');
    await page.locator('#trigger-params').fill('manual-1');
    await page.locator('#trigger-dialog-submit').click();
    await hidden('#trigger-dialog', 'the trigger dialog');
    const link = await visible('[data-testid="flash-run-link"]', 'the link to the triggered run');
    const runId = await link.getAttribute('data-run');
    check(runId, 'the triggered run link has no run id');
    await nav('runs');
    await page.locator('#runs-filter-job').fill(JOB);
    await page.locator('#runs-filter-job').press('Enter');
    const sel = `tr[data-run="${runId.replace(/"/g, '\\"')}"]`;
    await visible(sel, `the manual run ${runId} on the runs page`, 10_000);
    check((await page.locator(sel).getAttribute('data-cause')) === 'manual', `run ${runId} cause is ${await page.locator(sel).getAttribute('data-cause')}`);
    await visible(`${sel}[data-state="succeeded"]`, `the manual run ${runId} to succeed`, 30_000);
    await page.locator(`${sel} [data-testid="run-link"]`).click();
    const params = await visible('[data-testid="run-params"]', 'the params of the manual run');
    check((await params.innerText()).trim() === 'manual-1', `manual run params: ${await params.innerText()}`);
    await waitUntil('the manual run shards to show', async () => (await page.locator('[data-testid="shard-row"][data-state="succeeded"]').count()) >= 1, 10_000, 100);
    summary.manual_run = runId;
  });

  await step('6. pause the job; screenshots', async () => {
    await nav('jobs');
    await visible(jobRow, `the ${JOB} row`);
    await page.locator(`${jobRow} [data-action="pause"]`).click();
    await visible(`${jobRow} [data-testid="paused-marker"]`, 'the paused marker');
    check((await page.locator(jobRow).getAttribute('data-paused')) === 'true', 'the row is not marked paused');
    await visible(`${jobRow} [data-action="resume"]`, 'the Resume action');
    const r = await apiCall('GET', `/api/jobs/${encodeURIComponent(JOB)}`);
    check(r.status === 200 && r.json.paused === true, `the API does not show the job paused: ${r.text}`);
    await shot('console-jobs.png');

    await nav('overview');
    await visible('[data-testid="worker-row"]', 'a worker on the overview', 10_000);
    const workers = await page.$$eval('[data-testid="worker-row"]', (rows) => rows.map((r) => r.dataset.worker));
    const leader = await page.locator('#leader-badge').innerText();
    check(!/…/.test(leader), `the leader badge never filled: ${leader}`);
    await visible('[data-testid="card-lag"]', 'the fire lag card');
    // The charts hold the run: items enqueued, fired and failed over several
    // 10-s buckets, their lag, the sampled depth and live workers, job fires.
    summary.overview_charts = await chartsFilled('overview-charts', {
      'items.enqueued': 6, 'items.fired': 6, 'items.failed': 2, 'lag.p99': 4,
      'depth.pending': 1, 'workers.workers': 4, 'jobs.fired': 1,
    });
    const axis = await page.$$eval('[data-testid="chart-items"] .tick', (ts) => ts.map((t) => t.textContent));
    check(axis.includes('now') && axis.some((t) => /−5 min/.test(t)), `the time axis reads ${JSON.stringify(axis)}`);
    // Hovering names the values of the bucket under the pointer.
    const box = await page.locator('[data-testid="chart-items"] svg').boundingBox();
    await page.mouse.move(box.x + box.width * 0.97, box.y + box.height * 0.5);
    const hover = await page.locator('[data-testid="chart-items-values"]').innerText();
    check(/\d\d:\d\d:\d\d/.test(hover) && /fired/.test(hover), `the hover line reads ${hover}`);
    // The page's refresh redraws the chart; a resting pointer keeps its point.
    await page.evaluate(() => { document.querySelector('[data-testid="chart-items"]').dataset.old = '1'; });
    await waitUntil('a refresh to redraw the charts', () => page.evaluate(() => !document.querySelector('[data-testid="chart-items"]').dataset.old), 10_000, 100);
    const still = await page.locator('[data-testid="chart-items-values"]').innerText();
    check(/\d\d:\d\d:\d\d/.test(still), `after a refresh the hover line reads ${still}`);
    await page.mouse.move(0, 0);
    await shot('console-overview.png');
    summary.workers = workers;
    summary.leader_badge = leader;
  });

  await step('6b. the queues page charts the same run; screenshot', async () => {
    await nav('queues');
    summary.queue_charts = await chartsFilled('queues-charts', {
      'items.enqueued': 4, 'items.fired': 4, 'items.failed': 1, 'lag.p99': 1, 'depth.pending': 1,
    });
    await visible('[data-testid="dead-row"]', 'a dead letter of the failing handler', 30_000);
    await shot('console-queues.png');
  });

  await step('7. an alert rule: a bad one is refused at its field, a good one is saved and its Test reaches the webhook', async () => {
    // A local webhook receiver (this process), recording what chime posts.
    const got = [];
    const server = http.createServer((req, res) => {
      let body = '';
      req.on('data', (c) => { body += c; });
      req.on('end', () => { got.push({ headers: req.headers, body }); res.end('{}'); });
    });
    await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
    const hook = `http://127.0.0.1:${server.address().port}/hook`;
    try {
      await nav('alerts');
      const rule = (above) => JSON.stringify({ name: 'browser-lag', condition: { kind: 'queue_lag', above_ms: above },
        sinks: [{ kind: 'webhook', url: hook, secret: 'browser-secret' }] }, null, 2);
      await page.locator('#alert-json').fill(rule(5));
      await page.locator('[data-testid="alert-save"]').click();
      const errBox = await visible('[data-testid="alert-form"] [data-testid="field-error"]', 'the rule error');
      check(/condition\.above_ms/.test(await errBox.innerText()), `the error does not name condition.above_ms: ${await errBox.innerText()}`);
      await page.locator('#alert-json').fill(rule(60_000));
      await page.locator('[data-testid="alert-save"]').click();
      const row = '[data-testid="alert-rule"][data-rule="browser-lag"]';
      await visible(row, 'the saved rule');
      await page.locator(`${row} [data-action="test"]`).click();
      const result = await visible(`${row} [data-testid="alert-test-result"]`, 'the test result', 15_000);
      check(/webhook: delivered/.test(await result.innerText()), `test result: ${await result.innerText()}`);
      check(got.length === 1 && /^sha256=/.test(got[0].headers['x-chime-signature'] || ''), `the webhook got ${got.length} signed posts`);
      check(JSON.parse(got[0].body).rule === 'browser-lag', `posted: ${got[0].body}`);
      await shot('console-alerts.png');
    } finally {
      server.close();
    }
  });

  await step('8. the audit log shows the changes made above, newest first', async () => {
    await nav('audit');
    await visible('[data-testid="audit-entry"]', 'an audit entry', 10_000);
    const rows = await page.$$eval('[data-testid="audit-entry"]', (rs) => rs.map((r) => r.dataset.action));
    // This run's create, trigger and pause (newest first); a job left by an earlier
    // run may have added its own entries further down.
    const i = rows.indexOf('job.pause');
    check(i >= 0 && rows.indexOf('job.trigger', i) > i && rows.indexOf('job.create', i) > rows.indexOf('job.trigger', i),
      `audit rows out of order: ${rows.slice(0, 8).join(', ')}`);
    const pauseRow = page.locator('[data-testid="audit-entry"][data-action="job.pause"]').first();
    const text = await pauseRow.innerText();
    check(text.includes(JOB) && /paused: false → true/.test(text), `the pause entry does not show what changed: ${text}`);
    check(!(await page.locator('#view').innerText()).includes(TOKEN), 'the token is shown in the audit log');
    summary.audit_rows = rows.length;
  });

  await step('8b. a workflow run draws its DAG live, node by node; a rerun from a node keeps the rest', async () => {
    const FLOW = `${JOB}-flow`;
    await apiCall('DELETE', `/api/jobs/${encodeURIComponent(FLOW)}`);
    const echo = (name, after) => ({ name, handler: 'demo.echo', after: after.map((p) => (typeof p === 'string' ? { node: p } : p)) });
    const created = await apiCall('POST', '/api/jobs', {
      name: FLOW, group: 'demo', schedule: { kind: 'manual' },
      workflow: { nodes: [echo('extract', []), echo('load', ['extract']), echo('index', ['extract']), echo('report', [{ node: 'load', when: 'always' }, 'index'])] },
    });
    check(created.status === 201, `POST /api/jobs (workflow) answered ${created.status}: ${created.text}`);
    const run = await apiCall('POST', `/api/jobs/${encodeURIComponent(FLOW)}/trigger`, { params: '{"day":"today"}' });
    check(run.status === 200 && run.json.run_id, `trigger answered ${run.status}: ${run.text}`);
    const id = run.json.run_id;
    await page.evaluate((h) => { location.hash = h; }, `#/runs/${encodeURIComponent(id)}`);
    await visible('[data-testid="dag"] svg', 'the workflow graph', 10_000);
    const nodes = await waitUntil('every node of the DAG to show succeeded', () => page.$$eval('[data-testid="dag-node"]', (gs) => {
      const all = gs.map((g) => ({ node: g.dataset.node, state: g.dataset.state }));
      return all.length === 4 && all.every((n) => n.state === 'succeeded') ? all : null;
    }), 30_000);
    const edges = await page.$$eval('[data-testid="dag-edge"]', (es) => es.map((e) => `${e.dataset.from}>${e.dataset.to}`));
    check(edges.length === 4 && edges.includes('load>report') && edges.includes('extract>index'), `edges drawn: ${edges.join(', ')}`);
    check((await page.$$eval('.dag-edge.when-always', (es) => es.length)) === 1, 'the always edge is not drawn as such');
    await visible('.page-head [data-testid="run-state"][data-state="succeeded"]', 'the workflow run to succeed', 10_000);
    check((await page.locator('[data-testid="node-row"]').count()) === 4, 'the nodes table does not list 4 nodes');
    await shot('console-workflow.png');
    // Rerun from load: load and report run again, extract and index keep their runs.
    await page.locator('[data-action="rerun"][data-node="load"]').click();
    await visible('#rerun-dialog', 'the rerun dialog');
    await page.locator('#rerun-dialog-submit').click();
    await waitUntil('the rerun run page', () => page.evaluate((old) => {
      const m = decodeURIComponent(location.hash).match(/^#\/runs\/(.+)$/);
      return m && m[1] !== old ? m[1] : null;
    }, id), 10_000, 100);
    await waitUntil('the rerun to succeed', () => page.evaluate(() => document.querySelector('.page-head [data-testid="run-state"]')?.dataset.state === 'succeeded'), 30_000);
    const kept = await page.$$eval('[data-testid="node-row"]', (rows) => Object.fromEntries(rows.map((r) => [r.dataset.node, r.querySelector('[data-testid="node-run"]')?.getAttribute('href') || ''])));
    check(decodeURIComponent(kept.extract).includes(`${id}~extract`), `extract's run is not the first run's: ${kept.extract}`);
    check(!decodeURIComponent(kept.load).includes(`${id}~load`), `load did not run again: ${kept.load}`);
    summary.workflow_nodes = nodes.length;
    summary.workflow_run = id;
    await apiCall('DELETE', `/api/jobs/${encodeURIComponent(FLOW)}`);
  });

  await step('8c. a viewer token sees everything and no action it may not take', async () => {
    check(VIEWER_TOKEN, 'VIEWER_TOKEN is empty');
    // A job of another namespace: the Jobs page then offers the namespace choice.
    const NS_JOB = 'team-x/browser-ns';
    await apiCall('DELETE', `/api/jobs/${encodeURIComponent(NS_JOB)}`);
    const made = await apiCall('POST', '/api/jobs', { name: NS_JOB, group: 'team-x/demo', handler: 'demo.echo', schedule: { kind: 'manual' } });
    check(made.status === 201, `POST /api/jobs (${NS_JOB}) answered ${made.status}: ${made.text}`);
    const fired = await apiCall('POST', `/api/jobs/${encodeURIComponent(NS_JOB)}/trigger`);
    check(fired.status === 200, `triggering ${NS_JOB} answered ${fired.status}: ${fired.text}`);
    await page.locator('#logout').click();
    await visible('#login-token', 'the login form after logging out');
    await page.locator('#login-token').fill(VIEWER_TOKEN);
    await page.locator('#login-submit').click();
    await visible('#topbar', 'the top bar after the viewer logs in');
    const who = await visible('#whoami', 'who the token is');
    check(/viewer/.test(await who.innerText()), `the top bar does not say viewer: ${await who.innerText()}`);
    await nav('jobs');
    await visible(`[data-testid="job-row"][data-job="${JOB}"]`, 'the job, for the viewer');
    const nsSel = await visible('#jobs-namespace', 'the namespace choice (two namespaces)');
    await nsSel.selectOption('team-x');
    const rowsInNs = await page.$$eval('[data-testid="job-row"]', (rs) => rs.map((r) => r.dataset.job));
    check(rowsInNs.length === 1 && rowsInNs[0] === NS_JOB, `namespace team-x shows: ${rowsInNs.join(', ')}`);
    await nsSel.selectOption('');
    await visible(`[data-testid="job-row"][data-job="${JOB}"]`, 'every namespace again');
    check((await page.locator('#job-new').count()) === 0, 'a viewer is offered "New job"');
    for (const action of ['pause', 'resume', 'trigger', 'delete']) {
      check((await page.locator(`[data-testid="job-row"] [data-action="${action}"]`).count()) === 0, `a viewer is offered ${action}`);
    }
    await page.locator(`[data-testid="job-row"][data-job="${JOB}"] [data-action="edit"]`).click();
    await visible('#job-form', 'the job, read-only');
    check((await page.locator('#job-save').count()) === 0, 'a viewer is offered to save a job');
    check(await page.locator('#job-form fieldset').first().evaluate((f) => f.disabled), 'the job form is editable for a viewer');
    // The Runs page asks the server for one namespace's latest runs.
    await nav('runs');
    const runsNs = await visible('#runs-namespace', 'the runs namespace choice');
    await runsNs.selectOption('team-x');
    await waitUntil('only team-x runs', () => page.$$eval('[data-testid="run-row"]',
      (rs) => rs.length > 0 && rs.every((r) => r.dataset.job === 'team-x/browser-ns')), 10_000, 100);
    await nav('queues');
    check((await page.locator('#dead-requeue-all').count()) === 0, 'a viewer is offered to requeue');
    await nav('config');
    check((await page.locator('[data-testid="config-save"]').count()) === 0, 'a viewer is offered to set a value');
    await nav('alerts');
    check((await page.locator('[data-testid="alert-save"]').count()) === 0, 'a viewer is offered to save an alert rule');
    // The API refuses it all the same: the console only hides what would fail.
    const url = new URL(`/api/jobs/${encodeURIComponent(JOB)}/trigger`, CONSOLE_URL);
    const r = await fetch(url, { method: 'POST', headers: { Authorization: `Bearer ${VIEWER_TOKEN}` } });
    check(r.status === 403, `a viewer's trigger answered ${r.status}`);
    await apiCall('DELETE', `/api/jobs/${encodeURIComponent(NS_JOB)}`);
    summary.viewer_checked = true;
  });

  await step('8d. a token of one namespace sees its things, and no page of what is cluster-wide', async () => {
    check(TEAM_TOKEN, 'TEAM_TOKEN is empty');
    const TEAM_JOB = 'team-x/browser-team';
    await apiCall('DELETE', `/api/jobs/${encodeURIComponent(TEAM_JOB)}`);
    const made = await apiCall('POST', '/api/jobs', { name: TEAM_JOB, group: 'team-x/demo', handler: 'demo.echo', schedule: { kind: 'manual' } });
    check(made.status === 201, `POST /api/jobs (${TEAM_JOB}) answered ${made.status}: ${made.text}`);
    const TEAM_KEY = 'handlers/team-x/echo/concurrency';
    for (const [key, value] of [[TEAM_KEY, '2'], ['handlers/demo.echo/concurrency', '3']]) {
      const set = await apiCall('PUT', '/api/config', { key, value });
      check(set.status === 200, `PUT /api/config ${key} answered ${set.status}: ${set.text}`);
    }
    await page.locator('#logout').click();
    await visible('#login-token', 'the login form after logging out');
    await page.locator('#login-token').fill(TEAM_TOKEN);
    await page.locator('#login-submit').click();
    await visible('#topbar', 'the top bar after the team admin logs in');
    const who = await visible('#whoami', 'who the token is');
    check(/team-x/.test(await who.innerText()), `the top bar does not name the namespace: ${await who.innerText()}`);
    for (const v of ['overview', 'alerts', 'audit']) {
      check(await page.locator(`#nav-${v}`).isHidden(), `a team token is offered the ${v} page`);
    }
    await nav('jobs');
    await visible(`[data-testid="job-row"][data-job="${TEAM_JOB}"]`, "the team's job");
    const rows = await page.$$eval('[data-testid="job-row"]', (rs) => rs.map((r) => r.dataset.job));
    check(rows.every((j) => j.startsWith('team-x/')), `a team token sees other namespaces' jobs: ${rows.join(', ')}`);
    await nav('config');
    await visible(`[data-testid="config-entry"][data-key="${TEAM_KEY}"]`, "the team's handler setting");
    const keys = await page.$$eval('[data-testid="config-entry"]', (rs) => rs.map((r) => r.dataset.key));
    check(keys.length === 1, `a team token sees these settings: ${keys.join(', ')}`);
    await nav('queues');
    await waitUntil('the dead letters of the team (none)', () => page.$$eval('[data-testid="dead-table"] tbody tr',
      (rs) => rs.length === 1 && rs[0].textContent.includes('No dead letters.')), 10_000, 100);
    check(await page.locator('[data-testid="queues-table"]').isHidden(), 'a team token is shown the queue counts');
    check((await page.locator('#dead-requeue-all').count()) === 0, 'a team token is offered to requeue every dead letter');
    await apiCall('DELETE', `/api/jobs/${encodeURIComponent(TEAM_JOB)}`);
    for (const key of [TEAM_KEY, 'handlers/demo.echo/concurrency']) {
      await apiCall('DELETE', `/api/config?key=${encodeURIComponent(key)}`);
    }
    summary.team_checked = true;
  });

  await step('9. no uncaught page exceptions', async () => {
    check(pageErrors.length === 0, `the page threw ${pageErrors.length} uncaught exception(s)`);
    check(cspViolations.length === 0, `${cspViolations.length} Content-Security-Policy violation(s)`);
  });

  clearInterval(traffic);
  summary.traffic_ticks = trafficTicks;
  summary.traffic_errors = trafficErrors;
  clearTimeout(watchdog);
  await browser.close();
  summary.ok = true;
  summary.console_errors = consoleErrors.length;
  summary.elapsed_ms = Date.now() - started;
  process.stdout.write(`${JSON.stringify(summary)}\n`);
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
