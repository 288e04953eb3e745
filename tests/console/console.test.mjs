// Browser scenarios of the console, run by tests/console.rs against a running
// appliance: `node console.test.mjs <scenario> <url> [token|screenshot-dir|candidate] [candidate]`.
// Exits 0 when the scenario holds; prints what failed otherwise. Drives Debian's
// chromium (CHROMIUM overrides the path) through playwright-core.
import { chromium } from 'playwright-core';

const [scenario, url, extra, candidate] = process.argv.slice(2);
const TIMEOUT = 15000;

/** Polls `check` (async, returns truthy when done) until it holds. */
async function until(what, check, timeout = TIMEOUT) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    try { if ((last = await check())) return last; } catch (e) { last = e.message; }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function assert(cond, message) {
  if (!cond) throw new Error(`assertion failed: ${message}`);
}

const text = (page, testid) => page.getByTestId(testid).first().textContent();
const number = async (page, testid) => Number(await text(page, testid));

const scenarios = {
  // Rates move while the driver posts `echo` events to `worker`.
  async overview(page) {
    await page.goto(`${url}/`);
    assert(new URL(page.url()).pathname === '/ui/', `/ redirects to /ui/, got ${page.url()}`);
    await page.goto(`${url}/ui/?poll=500`);
    await until('the worker row', async () => (await text(page, 'status-worker')) === 'serving');
    await until('handled/s > 0', async () => (await number(page, 'rate-in-worker')) > 0);
    await until('outputs/s > 0', async () => (await number(page, 'rate-out-worker')) > 0);
    await until('a sparkline', async () => (await page.locator('[data-testid=row-worker] svg polyline').getAttribute('points')).split(' ').length >= 2);
    assert(await page.getByTestId('banner').isHidden(), 'no banner on loopback');
    await page.getByRole('link', { name: 'worker' }).click();
    await until('the plugin page', async () => (await page.getByTestId('plugin-limits').textContent()).includes('max_attempts'));
    // The routes view answers "who gets it?".
    await page.goto(`${url}/ui/#/routes`);
    assert((await page.getByTestId('route-graph').textContent()).includes('worker'), 'the graph');
    await page.getByTestId('match-key').fill('echo');
    await page.getByRole('button', { name: 'Who gets it?' }).click();
    await until('the match', async () => (await text(page, 'match-worker')).includes('gets it'));
  },

  // The driver posts keep.N and drop.N; with the filter keep.*, only keep.N show.
  async stream(page) {
    await page.goto(`${url}/ui/#/events`);
    await until('unfiltered drop.* events', async () => (await page.locator('[data-testid=event-row][data-key^="drop."]').count()) > 0);
    await page.getByTestId('events-filter').fill('keep.*');
    await page.getByTestId('events-apply').click();
    await until('5 filtered events', async () => (await page.getByTestId('event-row').count()) >= 5);
    const keys = await page.getByTestId('event-row').evaluateAll((rows) => rows.map((r) => r.dataset.key));
    assert(keys.every((k) => k.startsWith('keep.')), `only keep.* after filtering, got ${keys}`);
    // Expand: the envelope and its links.
    await page.getByTestId('event-row').first().getByRole('button').click();
    const row = page.getByTestId('event-row').first();
    assert((await row.getByTestId('field-correlation_id').textContent()).startsWith('corr-'), 'correlation id shown');
    assert((await row.locator('pre').textContent()).includes('"type"'), 'the envelope JSON');
    // Pause buffers, resume renders.
    await page.getByTestId('events-pause').click();
    const shown = await page.getByTestId('event-row').count();
    await until('buffered events', async () => /Paused: [1-9]/.test(await text(page, 'events-buffered')));
    assert((await page.getByTestId('event-row').count()) === shown, 'nothing rendered while paused');
    await page.getByTestId('events-pause').click();
    await until('more rows after resume', async () => (await page.getByTestId('event-row').count()) > shown);
  },

  // Two dead letters of `worker`, whose plugin now succeeds: redrive the oldest.
  async dlq(page) {
    await page.goto(`${url}/ui/?poll=500#/dlq/worker`);
    await until('2 dead letters', async () => (await text(page, 'dlq-count')) === '2');
    const handled = await number(page, 'handled-count');
    await until('two rows', async () => (await page.getByTestId('dlq-row').count()) === 2);
    await page.getByTestId('dlq-open').first().click();
    const body = page.getByTestId('dlq-body').first();
    assert(await body.isVisible(), 'the body opens');
    assert((await body.textContent()).includes('"dl-0"'), 'the oldest letter first');
    assert((await page.getByTestId('dlq-row').first().textContent()).includes('ok'), 'its routing key');
    await page.getByTestId('redrive-oldest').click();
    await until('the redrive result', async () => (await text(page, 'redrive-result')) === 'Redriven: 1');
    await until('the DLQ count drops', async () => (await text(page, 'dlq-count')) === '1');
    await until('handled rises', async () => (await number(page, 'handled-count')) > handled);
    await until('one row left', async () => (await page.getByTestId('dlq-row').count()) === 1);
  },

  // Three dead letters of `worker` (sel-0, sel-1, sel-2), whose plugin now
  // succeeds: tick the first and the last, redrive the selection.
  async select(page) {
    await page.goto(`${url}/ui/?poll=500#/dlq/worker`);
    await until('3 dead letters', async () => (await text(page, 'dlq-count')) === '3');
    const handled = await number(page, 'handled-count');
    const ids = await until('3 rows', async () => {
      const shown = await page.getByTestId('dlq-row').evaluateAll((rows) => rows.map((r) => r.dataset.id));
      return shown.length === 3 && shown;
    });
    assert(JSON.stringify(ids) === JSON.stringify(['sel-0', 'sel-1', 'sel-2']), `rows by event id, oldest first: ${ids}`);
    assert(await page.getByTestId('redrive-selected').isDisabled(), 'nothing selected yet');
    await page.locator('[data-testid=dlq-pick][data-id="sel-0"]').check();
    await page.locator('[data-testid=dlq-pick][data-id="sel-2"]').check();
    assert((await text(page, 'redrive-selected')) === 'Redrive selected (2)', 'the count of the selection');
    await page.getByTestId('redrive-selected').click();
    await until('the redrive result', async () => (await text(page, 'redrive-result')) === 'Redriven: 2');
    await until('the DLQ count drops', async () => (await text(page, 'dlq-count')) === '1');
    await until('handled rises by 2', async () => (await number(page, 'handled-count')) >= handled + 2);
    await until('sel-1 alone is left', async () => {
      const left = await page.getByTestId('dlq-row').evaluateAll((rows) => rows.map((r) => r.dataset.id));
      return JSON.stringify(left) === '["sel-1"]';
    });
    assert(await page.getByTestId('redrive-selected').isDisabled(), 'the selection is cleared');
  },

  // An archive of orders O-1 and O-2; `extra` is a notification candidate whose
  // order.shipped subject reads differently: the diff names O-1's shipped event.
  async diff(page) {
    await page.goto(`${url}/ui/#/history`);
    await page.getByTestId('diff-plugin').selectOption('notification');
    await page.getByTestId('diff-aggregate').fill('O-1');
    await page.getByTestId('diff-file').setInputFiles(extra);
    await page.getByTestId('diff-run').click();
    const summary = await until('the report', async () => {
      const t = await text(page, 'diff-summary');
      return t && t;
    }, 60000);
    assert(summary.startsWith('3 events: 2 same, 1 differ, 0 fail only in the running version, 0 only in the candidate'), `the summary: ${summary}`);
    const rows = page.getByTestId('diff-row');
    assert((await rows.count()) === 1, 'one differing event');
    assert((await rows.first().getAttribute('data-verdict')) === 'differ', 'verdict differ');
    assert((await rows.first().textContent()).includes('order.shipped'), 'the shipped event');
    await rows.first().getByRole('button').click();
    const sides = await page.locator('.sides').first().textContent();
    assert(sides.includes('has shipped') && sides.includes('was shipped'), `both outputs side by side: ${sides.slice(0, 400)}`);
    // A file that is no component: refused with the reason.
    await page.getByTestId('diff-file').setInputFiles({ name: 'junk.wasm', mimeType: 'application/wasm', buffer: Buffer.from('not wasm') });
    await page.getByTestId('diff-run').click();
    const refused = await until('the refusal', async () => {
      const t = await page.getByTestId('diff-error').textContent({ timeout: 500 }).catch(() => '');
      return t && t;
    }, 60000);
    assert(refused.startsWith('Refused (422): the candidate cannot load'), `the reason: ${refused}`);
  },

  // worker.wasm now holds garbage: the reload is refused, with the reason.
  async reload(page) {
    await page.goto(`${url}/ui/#/plugin/worker`);
    await page.getByTestId('reload').click();
    const result = await until('the refusal', async () => {
      const t = await text(page, 'reload-result');
      return t.startsWith('Reload refused') && t;
    });
    assert(result.includes('422') && result.includes('running version keeps serving'), `the reason: ${result}`);
    assert(await page.getByTestId('reload-result').isVisible(), 'visible');
  },

  // [http] token set: an action asks for the token, a wrong one is refused,
  // the right one is kept for the tab.
  async token(page) {
    const statuses = [];
    page.on('response', (r) => { if (r.request().method() === 'POST') statuses.push(r.status()); });
    await page.goto(`${url}/ui/#/plugin/worker`);
    assert(await page.getByTestId('banner').isHidden(), 'no loopback banner with a token');
    await page.getByTestId('reload').click();
    await page.getByTestId('token-form').waitFor({ state: 'visible' });
    assert(statuses.includes(401), `the API said 401: ${statuses}`);
    await page.getByTestId('token-input').fill('not-the-token');
    await page.getByTestId('token-submit').click();
    await until('a second 401', async () => statuses.filter((s) => s === 401).length === 2);
    await page.getByTestId('token-form').waitFor({ state: 'visible' });
    await page.getByTestId('token-input').fill(extra);
    await page.getByTestId('token-submit').click();
    await until('the reload', async () => (await text(page, 'reload-result')).startsWith('Reloaded: version'));
    assert(await page.getByTestId('token-form').isHidden(), 'form gone');
    assert((await page.evaluate(() => sessionStorage.getItem('switchboard-token'))) === extra, 'kept for the tab');
    await page.goto(`${url}/ui/#/dlq/worker`);
    await page.getByTestId('redrive-all').click();
    await until('a redrive with the kept token', async () => (await text(page, 'redrive-result')) === 'Redriven: 0');
    assert(await page.getByTestId('token-form').isHidden(), 'not asked again');
  },

  // README pictures, with the real plugins: <dir>/<view>.png.
  async screenshots(page) {
    const shot = (name) => page.screenshot({ path: `${extra}/${name}.png` });
    await page.goto(`${url}/ui/?poll=1000`);
    await until('rates', async () => (await number(page, 'rate-in-analytics')) > 0);
    await page.waitForTimeout(6000); // a few sparkline points
    await shot('overview');
    await page.goto(`${url}/ui/#/routes`);
    await page.getByTestId('match-key').fill('bill.paid');
    await page.getByRole('button', { name: 'Who gets it?' }).click();
    await page.getByTestId('match-result').locator('li').first().waitFor();
    await shot('routes');
    await page.goto(`${url}/ui/#/events`);
    await until('events', async () => (await page.getByTestId('event-row').count()) >= 8);
    await page.getByTestId('events-pause').click();
    await page.locator('[data-testid=event-row][data-key="bill.paid"]').first().getByRole('button').click();
    await shot('events');
    await page.goto(`${url}/ui/#/dlq/billing`);
    await page.getByTestId('dlq-open').first().click();
    await page.getByTestId('dlq-pick').first().check();
    await shot('dead-letters');
    await page.goto(`${url}/ui/#/plugin/notification`);
    await page.getByTestId('plugin-limits').waitFor();
    await shot('plugin');
    await page.goto(`${url}/ui/#/history`);
    await page.getByTestId('history-aggregate').fill('B-1');
    await page.getByRole('button', { name: 'Search' }).click();
    await page.getByTestId('history-row').first().waitFor();
    // replay --diff of a notification candidate over bill B-1's events.
    await page.getByTestId('diff-plugin').selectOption('notification');
    await page.getByTestId('diff-aggregate').fill('B-1');
    await page.getByTestId('diff-file').setInputFiles(candidate);
    await page.getByTestId('diff-run').click();
    await page.getByTestId('diff-row').first().getByRole('button').click({ timeout: 60000 });
    await page.screenshot({ path: `${extra}/history.png`, fullPage: true });
  },
};

if (!scenarios[scenario] || !url) {
  console.error(`usage: node console.test.mjs <${Object.keys(scenarios).join('|')}> <url> [token|dir|candidate] [candidate]`);
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
page.setDefaultTimeout(TIMEOUT);
const problems = [];
page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
let code = 0;
const started = Date.now();
try {
  await scenarios[scenario](page);
  // A 401 the scenario provoked is logged by chromium as a failed resource.
  const unexpected = problems.filter((p) => !(scenario === 'token' && p.includes('401'))
    && !((scenario === 'reload' || scenario === 'diff') && p.includes('422')));
  if (unexpected.length) throw new Error(unexpected.join('\n'));
  console.log(`${scenario}: ok in ${Date.now() - started} ms`);
} catch (e) {
  code = 1;
  console.error(`${scenario}: FAILED: ${e.stack || e}`);
  problems.forEach((p) => console.error(p));
  try { console.error(`page text:\n${(await page.locator('body').innerText()).slice(0, 3000)}`); } catch { /* closed */ }
} finally {
  await browser.close();
}
process.exit(code);
