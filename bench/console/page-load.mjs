// The console's page weight (issue 20), against a real `switchboard run` with 30
// plugins, in Debian's chromium driven by playwright-core (tests/console's copy):
//
//   (a) page load: from navigation start to the overview table holding all 30
//       plugin rows (a MutationObserver in the page notes performance.now()), a
//       fresh browser context (cold cache) per load, median of --loads, the
//       router idle;
//   (b1) cost to the router in CPU time (its threads' schedstat, summed): the
//       router idle, windows of --seconds with no tab and with a tab open on the
//       overview, alternating --rounds times; and one GET /api/plugins (what the
//       tab polls every 2 s) alone, 1000 times;
//   (b2) cost to the router in throughput: `order.created` events POSTed by --connections
//       clients without pause through the whole run, measured in windows of
//       --seconds with no tab open, with a tab open on the overview (its own
//       polling, every 2 s), and with the tab's requests alone (the same GETs
//       from this script, no browser), --rounds times each, the order rotating
//       per round. Throughput: plugin handlings/s from /api/plugins counters at
//       each window's ends, ÷ the plugin count = input events/s.
//
// node bench/console/page-load.mjs [--plugins 30] [--loads 10] [--seconds 10]
//   [--rounds 3] [--connections 8] [--wasm plugins/notification.wasm]
//   [--switchboard target/release/switchboard]
// (`make bench-console`; results in BENCHMARKS.md). CHROMIUM overrides
// /usr/bin/chromium.
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const require = createRequire(path.join(ROOT, 'tests/console/package.json'));
const { chromium } = require('playwright-core');

const opts = { plugins: 30, loads: 10, seconds: 10, rounds: 3, connections: 8, wasm: 'plugins/notification.wasm', switchboard: 'target/release/switchboard' };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  const key = argv[i].replace(/^--/, '');
  if (!(key in opts) || argv[i + 1] === undefined) {
    console.error(`usage: node bench/console/page-load.mjs ${Object.keys(opts).map((k) => `[--${k} ${opts[k]}]`).join(' ')}`);
    process.exit(2);
  }
  opts[key] = typeof opts[key] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
const fmt = (x, d = 1) => x.toFixed(d);

// ---- The router -----------------------------------------------------------------

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sb-console-bench-'));
fs.mkdirSync(path.join(dir, 'plugins'));
fs.copyFileSync(path.resolve(ROOT, opts.wasm), path.join(dir, 'plugins/copy.wasm'));
let toml = 'plugins_dir = "plugins"\nstate_dir = "state"\n\n[[exchanges]]\nname = "events"\nkind = "topic"\n';
const names = [];
for (let i = 1; i <= opts.plugins; i++) {
  const name = `plugin-${String(i).padStart(2, '0')}`;
  names.push(name);
  toml += `\n[plugins.${name}]\nfile = "copy.wasm"\n\n[[routes]]\nexchange = "events"\npattern = "order.*"\nplugin = "${name}"\n`;
}
fs.writeFileSync(path.join(dir, 'router.toml'), toml);

const port = await new Promise((resolve) => {
  const s = net.createServer().listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => resolve(p)); });
});
const base = `http://127.0.0.1:${port}`;
const env = { ...process.env, SWITCHBOARD_HTTP_LISTEN: `127.0.0.1:${port}` };
for (const v of ['RABBITMQ_URL', 'RABBITMQ_HOST', 'RABBITMQ_PORT', 'RABBITMQ_USER', 'RABBITMQ_PASSWORD', 'RABBITMQ_VHOST', 'REDIS_URL', 'SWITCHBOARD_ADMIN_TOKEN']) delete env[v];
const log = fs.openSync(path.join(dir, 'switchboard.log'), 'a');
const router = spawn(path.resolve(ROOT, opts.switchboard), ['run', '--config', path.join(dir, 'router.toml')], { env, stdio: ['ignore', log, log] });
let exited = false;
router.on('exit', () => { exited = true; });

const agent = new http.Agent({ keepAlive: true, maxSockets: opts.connections + 4 });

/** One request: resolves {status, body, headers}. */
function request(method, url, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(`${base}${url}`, { method, agent, headers: body ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } : {} }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString(), headers: res.headers }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** Nanoseconds the router's threads have spent on a CPU (schedstat, summed). */
function cpuNs() {
  let sum = 0;
  for (const task of fs.readdirSync(`/proc/${router.pid}/task`)) {
    try { sum += Number(fs.readFileSync(`/proc/${router.pid}/task/${task}/schedstat`, 'utf8').split(' ')[0]); } catch { /* thread gone */ }
  }
  return sum;
}

async function handled() {
  const r = await request('GET', '/api/plugins');
  return JSON.parse(r.body).reduce((sum, p) => sum + ((p.dispatch || {}).handled || 0), 0);
}

function cleanup() {
  if (!exited) router.kill('SIGTERM');
  fs.rmSync(dir, { recursive: true, force: true });
}

let browser;
try {
  const started = Date.now();
  for (;;) {
    if (exited) throw new Error(`switchboard exited: ${fs.readFileSync(path.join(dir, 'switchboard.log'), 'utf8').slice(-2000)}`);
    try { if ((await request('GET', '/readyz')).status === 200) break; } catch { /* not yet */ }
    if (Date.now() - started > 60000) throw new Error('/readyz did not answer 200 within 60 s');
    await sleep(20);
  }
  const listed = JSON.parse((await request('GET', '/api/plugins')).body).length;
  if (listed !== opts.plugins) throw new Error(`expected ${opts.plugins} plugins, /api/plugins lists ${listed}`);

  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
  });

  /** Opens /ui/ in a fresh context; resolves when the overview has every row. */
  async function openTab() {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    await page.addInitScript((want) => {
      new MutationObserver((_, observer) => {
        if (document.querySelectorAll('[data-testid=overview] tbody tr[data-testid^="row-"]').length >= want) {
          window.__rowsAt = performance.now();
          observer.disconnect();
        }
      }).observe(document, { childList: true, subtree: true });
    }, opts.plugins);
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(`${base}/ui/`);
    await page.waitForFunction(() => window.__rowsAt !== undefined, null, { timeout: 15000 });
    if (errors.length) throw new Error(`page errors: ${errors.join('; ')}`);
    const t = await page.evaluate(() => {
      const nav = performance.getEntriesByType('navigation')[0];
      const res = performance.getEntriesByType('resource');
      return {
        rows: window.__rowsAt,
        dcl: nav.domContentLoadedEventEnd,
        bytes: nav.encodedBodySize + res.reduce((s, r) => s + r.encodedBodySize, 0),
        requests: 1 + res.length,
      };
    });
    return { context, page, t };
  }

  // (a) Page load, router idle. One unmeasured load first (chromium's own warm-up).
  await (await openTab()).context.close();
  const loads = [];
  for (let i = 0; i < opts.loads; i++) {
    const { context, t } = await openTab();
    await context.close();
    loads.push(t);
  }
  const rows = loads.map((l) => l.rows);
  console.log(`(a) page load to ${opts.plugins} rows, ${opts.loads} loads (cold cache each), router idle: median ${fmt(median(rows))} ms, min ${fmt(Math.min(...rows))}, max ${fmt(Math.max(...rows))}; DOMContentLoaded median ${fmt(median(loads.map((l) => l.dcl)))} ms; ${loads[0].requests} requests, ${loads[0].bytes} bytes (encoded bodies) until then`);

  // (b1) The router idle: its CPU time with no tab, then with a tab open (its
  // polling alone, past the page load), alternating.
  const idle = { 'no tab': [], 'tab open': [] };
  for (let round = 0; round < opts.rounds; round++) {
    for (const mode of ['no tab', 'tab open']) {
      let tab = null;
      if (mode === 'tab open') { tab = await openTab(); await sleep(2000); }
      const c0 = cpuNs();
      const t0 = performance.now();
      await sleep(opts.seconds * 1000);
      const cpu = (cpuNs() - c0) / 1e6 / ((performance.now() - t0) / 1000); // ms per s
      if (tab) await tab.context.close();
      idle[mode].push(cpu);
      console.log(`round ${round + 1}, router idle, ${mode}: router on a CPU ${fmt(cpu, 3)} ms/s`);
    }
  }
  // One request of the tab's polling, alone: GET /api/plugins, 1000 times.
  const g0 = cpuNs();
  for (let i = 0; i < 1000; i++) await request('GET', '/api/plugins');
  const perGet = (cpuNs() - g0) / 1000 / 1000; // µs
  const pluginsBytes = Buffer.byteLength((await request('GET', '/api/plugins')).body);

  // (b2) Load through the whole run; windows with no tab, a tab, its requests alone.
  let stop = false;
  let accepted = 0;
  let refused = 0;
  const clients = Array.from({ length: opts.connections }, async (_, c) => {
    for (let k = 0; !stop; k++) {
      const id = `${process.pid}-${c}-${k}`;
      const body = JSON.stringify({ id, type: 'order.created', source: 'bench', tenant_id: 'acme', data: { order_id: id, total_cents: 12990, currency: 'EUR', customer: { name: 'Ann Lee', email: 'ann@example.com' } } });
      const r = await request('POST', '/events/events/order.created', body);
      if (r.status === 202) accepted++;
      else if (r.status === 503) { refused++; await sleep(1000 * Number(r.headers['retry-after'] || 1)); } else throw new Error(`POST answered ${r.status}: ${r.body}`);
    }
  });
  const loadDone = Promise.all(clients);
  loadDone.catch(() => { stop = true; });
  await sleep(3000); // warm-up: instances, connections

  const modes = ['no tab', 'tab open', 'tab requests only'];
  const results = Object.fromEntries(modes.map((m) => [m, []]));
  const tabLoads = [];
  for (let round = 0; round < opts.rounds; round++) {
    for (let j = 0; j < modes.length; j++) {
      const mode = modes[(round + j) % modes.length];
      let tab = null;
      let poller = null;
      if (mode === 'tab open') {
        tab = await openTab();
        tabLoads.push(tab.t.rows);
        await sleep(2000); // past the page load: what stays is the polling
      } else if (mode === 'tab requests only') {
        // What the tab sends: /api/console once, then /api/plugins every 2 s.
        await request('GET', '/api/console');
        const tick = async () => { await request('GET', '/api/plugins'); poller = setTimeout(tick, 2000); };
        await tick();
        await sleep(2000);
      }
      const h0 = await handled();
      const c0 = cpuNs();
      const a0 = accepted;
      const t0 = performance.now();
      await sleep(opts.seconds * 1000);
      const h1 = await handled();
      const c1 = cpuNs();
      const secs = (performance.now() - t0) / 1000;
      const a1 = accepted;
      if (tab) await tab.context.close();
      if (poller) clearTimeout(poller);
      const row = { round: round + 1, handlings: (h1 - h0) / secs, inputs: (h1 - h0) / secs / opts.plugins, accepted: (a1 - a0) / secs, cpu: (c1 - c0) / 1e6 / secs, usPerInput: (c1 - c0) / 1e3 / ((h1 - h0) / opts.plugins) };
      results[mode].push(row);
      console.log(`round ${row.round}, ${mode}: ${fmt(row.inputs)} input events/s handled by all ${opts.plugins} (${fmt(row.handlings, 0)} handlings/s), ${fmt(row.accepted)} accepted/s; router on a CPU ${fmt(row.cpu, 0)} ms/s, ${fmt(row.usPerInput)} µs per input event`);
    }
  }
  stop = true;
  await loadDone;

  const med = (mode, f = 'inputs') => median(results[mode].map((r) => r[f]));
  const idleCost = median(idle['tab open']) - median(idle['no tab']);
  console.log(`\n(b1) router idle, windows of ${opts.seconds} s: on a CPU ${idle['no tab'].map((x) => fmt(x, 3)).join(', ')} ms/s with no tab, ${idle['tab open'].map((x) => fmt(x, 3)).join(', ')} ms/s with a tab open; the tab's cost (median − median): ${fmt(idleCost, 3)} ms of CPU per second`);
  console.log(`one GET /api/plugins (${pluginsBytes} bytes), alone: ${fmt(perGet)} µs of router CPU (mean of 1000); every 2 s: ${fmt(perGet / 2000, 3)} ms/s`);
  console.log(`router CPU at full load (no tab, median): ${fmt(med('no tab', 'cpu'), 0)} ms/s; the tab's share of it: ${fmt(100 * idleCost / med('no tab', 'cpu'), 3)}% (idle windows), ${fmt(100 * (perGet / 2000) / med('no tab', 'cpu'), 3)}% (per GET)`);
  console.log(`\n(b2) ${opts.connections} clients, windows of ${opts.seconds} s, ${opts.rounds} rounds; ${refused} refusals (503) in all`);
  console.log(`| input events/s | ${results['no tab'].map((r) => `round ${r.round}`).join(' | ')} | median | ratio to no tab |`);
  for (const mode of modes) {
    console.log(`| ${mode} | ${results[mode].map((r) => fmt(r.inputs)).join(' | ')} | ${fmt(med(mode))} | ${fmt(med(mode) / med('no tab'), 3)} |`);
  }
  console.log(`| router CPU µs per input event | ${results['no tab'].map((r) => `round ${r.round}`).join(' | ')} | median | ratio to no tab |`);
  for (const mode of modes) {
    console.log(`| ${mode} | ${results[mode].map((r) => fmt(r.usPerInput)).join(' | ')} | ${fmt(med(mode, 'usPerInput'))} | ${fmt(med(mode, 'usPerInput') / med('no tab', 'usPerInput'), 3)} |`);
  }
  console.log(`tab's page load under that load (to ${opts.plugins} rows): ${tabLoads.map((x) => fmt(x)).join(', ')} ms`);
} catch (e) {
  console.error(`page-load: FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close();
  agent.destroy();
  cleanup();
}
