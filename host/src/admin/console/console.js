// The Switchboard console: one page over the admin API (/api/*, /events/stream).
// Plain ES module, no build step. Views are chosen by the URL's hash:
// #/ overview, #/routes, #/events, #/dlq/<plugin>, #/plugin/<name>, #/history.

const $ = (sel) => document.querySelector(sel);
const main = $('#main');
const params = new URLSearchParams(location.search);
const POLL_MS = Number(params.get('poll')) || 2000; // ?poll=ms (tests)
const HISTORY_MS = 5 * 60 * 1000; // sparkline window
const MAX_EVENTS = 200;
const PAGE = 50;

// ---- DOM helper --------------------------------------------------------------

const SVG_NS = 'http://www.w3.org/2000/svg';
const SVG_TAGS = new Set(['svg', 'path', 'line', 'rect', 'text', 'g', 'polyline', 'title']);

/** h('tag.class', {attr: v, onclick: f}, ...children): an element; text is
 * escaped. 'svg:a' is SVG's link. */
function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split('.');
  const el = tag === 'svg:a' || SVG_TAGS.has(tag) ? document.createElementNS(SVG_NS, tag.replace('svg:', '')) : document.createElement(tag);
  if (classes.length) el.setAttribute('class', classes.join(' '));
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'testid') el.setAttribute('data-testid', v);
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const fmtRate = (r) => (r === null || r === undefined ? '–' : r < 10 ? r.toFixed(1) : Math.round(r).toString());
const fmtNum = (n) => (n === null || n === undefined ? '–' : String(n));
const fmtTime = (t) => (t ? new Date(t).toLocaleString() : '–');
const enc = encodeURIComponent;

// ---- API, with the token ----------------------------------------------------

const TOKEN_KEY = 'switchboard-token';
let info = { token_required: false, actions_allowed: false, bus: '', archive: false };
let tokenWaiters = [];

function showTokenForm() {
  const form = $('#token-form');
  form.hidden = false;
  $('#token-input').focus();
  return new Promise((resolve) => tokenWaiters.push(resolve));
}

$('#token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const token = $('#token-input').value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $('#token-input').value = '';
  $('#token-form').hidden = true;
  loadInfo();
  tokenWaiters.splice(0).forEach((w) => w(true));
});
$('#token-cancel').addEventListener('click', () => {
  $('#token-form').hidden = true;
  tokenWaiters.splice(0).forEach((w) => w(false));
});

/** fetch with the tab's token; on 401 asks for the token and tries again. */
async function api(path, options = {}) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { ...(options.headers || {}) };
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    if (token) sessionStorage.removeItem(TOKEN_KEY); // wrong or rotated
    if (!(await showTokenForm())) return response;
  }
}

/** The body as JSON (or {error: text}), with the status. */
async function json(path, options) {
  const response = await api(path, options);
  const text = await response.text();
  let body;
  try { body = JSON.parse(text); } catch { body = { error: text }; }
  return { ok: response.ok, status: response.status, body };
}

async function loadInfo() {
  const r = await json('/api/console');
  if (r.ok) info = r.body;
  $('#bus').textContent = info.bus ? `bus: ${info.bus}` : '';
  $('#nav-history').hidden = !info.archive;
  const banner = $('#banner');
  if (!info.token_required && !info.actions_allowed) {
    banner.textContent = 'Actions (redrive, reload) are allowed only from this machine: no [http] token is set.';
    banner.hidden = false;
  } else banner.hidden = true;
  document.querySelectorAll('button.action').forEach((b) => { b.disabled = !actionsPossible(); });
}

/** Actions are refused for sure only without a token and off loopback. */
const actionsPossible = () => info.token_required || info.actions_allowed;
const actionButton = (label, attrs) => h('button.action', { ...attrs, disabled: !actionsPossible() }, label);

// ---- Plugin polling and rates -------------------------------------------------

let plugins = []; // the last /api/plugins
const samples = new Map(); // plugin -> [{t, handled, outputs, retried, dead_lettered}]
const pollListeners = new Set();

async function poll() {
  try {
    const r = await json('/api/plugins');
    if (r.ok) {
      plugins = r.body;
      const t = Date.now();
      for (const p of plugins) {
        const list = samples.get(p.name) || [];
        const d = p.dispatch || {};
        list.push({ t, handled: d.handled || 0, outputs: d.outputs || 0, retried: d.retried || 0, dead_lettered: d.dead_lettered || 0 });
        while (list.length > 2 && t - list[0].t > HISTORY_MS) list.shift();
        samples.set(p.name, list);
      }
      pollListeners.forEach((f) => f());
    }
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

/** Per-second rate of `field` between the last two samples (null before two). */
function rate(name, field) {
  const list = samples.get(name) || [];
  if (list.length < 2) return null;
  const [a, b] = list.slice(-2);
  return Math.max(0, (b[field] - a[field]) / ((b.t - a.t) / 1000));
}

function sparkline(name) {
  const list = samples.get(name) || [];
  const w = 120, ht = 24, now = Date.now();
  const pts = [];
  for (let i = 1; i < list.length; i++) {
    const dt = (list[i].t - list[i - 1].t) / 1000;
    pts.push([list[i].t, Math.max(0, (list[i].handled - list[i - 1].handled) / dt)]);
  }
  const peak = Math.max(0, ...pts.map((p) => p[1]));
  const max = Math.max(1, peak) * 1.15;
  // The window: the last 5 minutes, or since the page opened if that is shorter.
  const span = Math.min(HISTORY_MS, Math.max(10000, now - (list[0]?.t ?? now)));
  const coords = pts.map(([t, v]) => `${(w - ((now - t) / span) * w).toFixed(1)},${(ht - 1 - (v / max) * (ht - 2)).toFixed(1)}`);
  return h('svg.spark', { width: w, height: ht, viewBox: `0 0 ${w} ${ht}`, role: 'img', 'aria-label': `handled per second, last 5 minutes, peak ${fmtRate(peak)}` },
    h('polyline', { points: coords.join(' '), fill: 'none', stroke: '#2563eb', 'stroke-width': 1.5 }));
}

const queueDepth = (p) => (p.queue ? p.queue.depth : p.broker ? p.broker.messages : null);
const dlqSize = (p) => (p.queue ? p.queue.dead_letters : p.broker ? p.broker.dead_letters : null);
const statusBadge = (p) => h(`span.badge.s-${p.status}`, { testid: `status-${p.name}` }, p.status);

// ---- Views --------------------------------------------------------------------

function overview() {
  const body = h('tbody');
  const render = () => {
    body.replaceChildren(...plugins.map((p) => h('tr', { testid: `row-${p.name}` },
      h('th', { scope: 'row' }, h('a', { href: `#/plugin/${enc(p.name)}` }, p.name)),
      h('td', {}, statusBadge(p)),
      h('td.mono', {}, p.content_hash || '–'),
      h('td.num', { testid: `rate-in-${p.name}` }, fmtRate(rate(p.name, 'handled'))),
      h('td.num', { testid: `rate-out-${p.name}` }, fmtRate(rate(p.name, 'outputs'))),
      h('td.num', { testid: `rate-retry-${p.name}` }, fmtRate(rate(p.name, 'retried'))),
      h('td.num', { testid: `rate-dead-${p.name}` }, fmtRate(rate(p.name, 'dead_lettered'))),
      h('td', {}, sparkline(p.name)),
      h('td.num', { testid: `depth-${p.name}` }, fmtNum(queueDepth(p))),
      h('td.num', { testid: `inflight-${p.name}` }, fmtNum(p.queue ? p.queue.in_flight : null)),
      h('td.num', {}, h('a', { href: `#/dlq/${enc(p.name)}`, testid: `dlq-${p.name}` }, fmtNum(dlqSize(p)))),
      h('td.error', {}, p.last_error || ''),
    )));
    if (!plugins.length) body.append(h('tr', {}, h('td', { colspan: 12 }, 'No plugins yet.')));
  };
  render();
  main.replaceChildren(h('h1', {}, 'Plugins'), h('div.scroll', {}, h('table', { testid: 'overview' },
    h('thead', {}, h('tr', {}, ['Plugin', 'Status', 'Version', 'Handled/s', 'Outputs/s', 'Retries/s', 'Dead/s', 'Handled, 5 min', 'Queue', 'In flight', 'DLQ', 'Last error'].map((c) => h('th', { scope: 'col' }, c)))),
    body)));
  return render;
}

async function routesView() {
  const routes = await json('/api/routes');
  if (!routes.ok) return main.replaceChildren(h('p.error', {}, routes.body.error));
  const list = routes.body;
  const exchanges = [...new Set(list.map((r) => r.exchange))];
  const names = [...new Set([...list.map((r) => r.plugin), ...plugins.map((p) => p.name)])];
  // Outputs go to the plugin's output_exchange, else back where the event came from.
  const outputs = new Map(names.map((n) => {
    const p = plugins.find((x) => x.name === n);
    const from = list.filter((r) => r.plugin === n).map((r) => r.exchange);
    return [n, p && p.output_exchange ? [p.output_exchange] : [...new Set(from)]];
  }));
  const outEx = [...new Set([...outputs.values()].flat())];
  const rowH = 44, colX = [10, 390, 680], boxW = 170;
  const height = Math.max(exchanges.length, names.length, outEx.length) * rowH + 20;
  const y = (i) => 20 + i * rowH;
  const svg = h('svg.graph', { width: 870, height, viewBox: `0 0 870 ${height}`, role: 'img', 'aria-label': 'Exchanges, routes, plugins and output exchanges', testid: 'route-graph' });
  const box = (x, yy, label, cls, href) => {
    const g = h('g', { class: cls }, h('rect', { x, y: yy, width: boxW, height: 28, rx: 5 }), h('text', { x: x + 8, y: yy + 18 }, label));
    return href ? h('svg:a', { href }, g) : g;
  };
  const edge = (x1, y1, x2, y2, label) => [
    h('path', { d: `M${x1},${y1} C${x1 + 70},${y1} ${x2 - 70},${y2} ${x2},${y2}`, class: 'edge' }),
    label ? h('text', { x: x2 - 6, y: y2 - 5, class: 'edge-label', 'text-anchor': 'end' }, label.length > 34 ? `${label.slice(0, 33)}…` : label, h('title', {}, label)) : null,
  ];
  for (const ex of exchanges) for (const n of names) {
    const pats = list.filter((r) => r.exchange === ex && r.plugin === n).map((r) => r.pattern);
    if (pats.length) svg.append(...edge(colX[0] + boxW, y(exchanges.indexOf(ex)) + 14, colX[1], y(names.indexOf(n)) + 14, pats.join(', ')).filter(Boolean));
  }
  for (const n of names) for (const o of outputs.get(n)) {
    svg.append(...edge(colX[1] + boxW, y(names.indexOf(n)) + 14, colX[2], y(outEx.indexOf(o)) + 14, '').filter(Boolean));
  }
  exchanges.forEach((ex, i) => svg.append(box(colX[0], y(i), ex, 'node exchange')));
  names.forEach((n, i) => svg.append(box(colX[1], y(i), n, 'node plugin', `#/plugin/${enc(n)}`)));
  outEx.forEach((ex, i) => svg.append(box(colX[2], y(i), ex, 'node exchange')));

  const select = h('select', { id: 'match-exchange', testid: 'match-exchange' }, exchanges.map((e) => h('option', {}, e)));
  const key = h('input', { id: 'match-key', testid: 'match-key', placeholder: 'bill.created', required: true });
  const out = h('div', { testid: 'match-result', 'aria-live': 'polite' });
  const form = h('form.inline', {
    onsubmit: async (e) => {
      e.preventDefault();
      const r = await json(`/api/routes/match?exchange=${enc(select.value)}&key=${enc(key.value)}`);
      if (!r.ok) return out.replaceChildren(h('p.error', {}, r.body.error));
      out.replaceChildren(h('ul.match', {}, r.body.plugins.map((p) => h('li', { class: p.matched ? 'yes' : 'no', testid: `match-${p.plugin}` },
        h('strong', {}, p.plugin), p.matched ? ' gets it' : ' does not', p.why ? ` — ${p.why}` : ''))));
    },
  }, h('label', { for: 'match-exchange' }, 'Exchange'), select, h('label', { for: 'match-key' }, 'Routing key'), key, h('button', { type: 'submit' }, 'Who gets it?'));
  main.replaceChildren(h('h1', {}, 'Routes'),
    h('p.muted', {}, 'Exchanges → plugins (edges labelled with their patterns) → the exchanges their outputs go to.'),
    h('div.scroll', {}, svg), h('h2', {}, 'Which plugins get an event?'), form, out);
}

// Live events: fetch-based SSE (sends the token; EventSource cannot), events
// named by routing key.
const live = { filter: '#', paused: false, rows: [], buffered: [], abort: null };

function startStream(onEvent) {
  if (live.abort) live.abort.abort();
  const abort = new AbortController();
  live.abort = abort;
  (async () => {
    try {
      const response = await api(`/events/stream?match=${enc(live.filter || '#')}`, { signal: abort.signal, headers: { Accept: 'text/event-stream' } });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n/g, '\n');
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, '')).join('\n');
          if (data) { try { onEvent(JSON.parse(data)); } catch { /* not JSON */ } }
        }
      }
    } catch { /* aborted or dropped */ }
    if (live.abort === abort && !abort.signal.aborted) setTimeout(() => live.abort === abort && startStream(onEvent), 2000);
  })();
}

function eventsView() {
  const list = h('ol.events', { testid: 'event-list' });
  const status = h('span.muted', { testid: 'events-buffered', 'aria-live': 'polite' });
  const pause = h('button', { type: 'button', testid: 'events-pause' }, 'Pause');
  const input = h('input', { id: 'filter', value: live.filter, testid: 'events-filter', placeholder: 'order.* or #' });
  const row = (ev) => {
    const m = ev.message || {};
    const detail = h('div.detail', { hidden: true },
      h('dl', {}, ['id', 'type', 'source', 'correlation_id', 'causation_id', 'hops', 'timestamp'].map((f) => [h('dt', {}, f), h('dd.mono', { testid: `field-${f}` }, fmtNum(m[f]))])),
      h('pre', {}, JSON.stringify(m, null, 2)));
    const btn = h('button.row', { type: 'button', 'aria-expanded': 'false', onclick: () => {
      detail.hidden = !detail.hidden; btn.setAttribute('aria-expanded', String(!detail.hidden));
    } }, h('span.mono', {}, (m.timestamp || '').slice(11, 23)), h('strong', {}, ev.routing_key), h('span.muted', {}, ev.exchange), h('span.mono.muted', {}, m.id || ''));
    return h('li', { testid: 'event-row', 'data-key': ev.routing_key }, btn, detail);
  };
  const show = () => {
    status.textContent = live.paused ? `Paused: ${live.buffered.length} new event(s) buffered` : `${list.children.length} shown`;
  };
  const add = (ev) => {
    if (live.paused) { live.buffered.push(ev); if (live.buffered.length > MAX_EVENTS) live.buffered.shift(); return show(); }
    list.prepend(row(ev));
    while (list.children.length > MAX_EVENTS) list.lastChild.remove();
    show();
  };
  pause.addEventListener('click', () => {
    live.paused = !live.paused;
    pause.textContent = live.paused ? 'Resume' : 'Pause';
    if (!live.paused) live.buffered.splice(0).forEach(add);
    show();
  });
  const form = h('form.inline', { onsubmit: (e) => {
    e.preventDefault();
    live.filter = input.value.trim() || '#';
    list.replaceChildren(); live.buffered = [];
    startStream(add);
    show();
  } }, h('label', { for: 'filter' }, 'Routing key pattern'), input, h('button', { type: 'submit', testid: 'events-apply' }, 'Apply'), pause, status);
  main.replaceChildren(h('h1', {}, 'Live events'), form, list);
  live.paused = false; live.buffered = [];
  startStream(add);
  show();
}

async function dlqView(name) {
  if (!name) name = plugins[0]?.name;
  const select = h('select', { id: 'dlq-plugin', testid: 'dlq-plugin', onchange: () => { location.hash = `#/dlq/${enc(select.value)}`; } },
    plugins.map((p) => h('option', { selected: p.name === name }, p.name)));
  const count = h('strong', { testid: 'dlq-count' });
  const handled = h('strong', { testid: 'handled-count' });
  const result = h('span', { testid: 'redrive-result', role: 'status' });
  const table = h('tbody');
  const pager = h('div.pager');
  const chosen = new Set(); // event ids of the letters ticked
  const redriveChosen = actionButton('Redrive selected', { type: 'button', testid: 'redrive-selected', disabled: true, onclick: () => chosen.size && redrive(0, [...chosen]) });
  const showChosen = () => {
    redriveChosen.textContent = `Redrive selected (${chosen.size})`;
    redriveChosen.disabled = !chosen.size || !actionsPossible();
  };
  const pickAll = h('input', { type: 'checkbox', testid: 'dlq-pick-all', 'aria-label': 'Select every letter on this page', onchange: () => {
    table.querySelectorAll('input[data-id]').forEach((box) => {
      box.checked = pickAll.checked;
      if (box.checked) chosen.add(box.dataset.id); else chosen.delete(box.dataset.id);
    });
    showChosen();
  } });
  let offset = 0;
  const COLS = 10;
  const counts = () => {
    const p = plugins.find((x) => x.name === name);
    count.textContent = p ? fmtNum(dlqSize(p)) : '–';
    handled.textContent = p ? fmtNum(p.dispatch?.handled) : '–';
  };
  // The rows follow the count: a poll that sees another DLQ size reloads
  // the page of letters (one load at a time).
  let loadedAt = null;
  let loading = false;
  const load = async () => {
    if (!name || loading) return;
    loading = true;
    const p = plugins.find((x) => x.name === name);
    loadedAt = p ? dlqSize(p) : null;
    let r;
    try { r = await json(`/api/dlq/${enc(name)}?offset=${offset}&limit=${PAGE}`); } finally { loading = false; }
    if (!r.ok) return table.replaceChildren(h('tr', {}, h('td.error', { colspan: COLS }, r.body.error)));
    const items = r.body.items || [];
    const present = new Set(items.map((d) => d.id));
    [...chosen].filter((id) => !present.has(id)).forEach((id) => chosen.delete(id));
    pickAll.checked = false;
    table.replaceChildren(...items.flatMap((d, i) => {
      const body = h('tr.detail', { hidden: true }, h('td', { colspan: COLS }, h('pre', { testid: 'dlq-body' }, JSON.stringify(d.message, null, 2))));
      const open = h('button.link', { type: 'button', 'aria-expanded': 'false', testid: 'dlq-open', onclick: () => {
        body.hidden = !body.hidden; open.setAttribute('aria-expanded', String(!body.hidden));
      } }, `#${offset + i + 1}`);
      const pick = h('input', { type: 'checkbox', testid: 'dlq-pick', 'data-id': d.id, 'aria-label': `Select letter ${d.id}`, checked: chosen.has(d.id), onchange: () => {
        if (pick.checked) chosen.add(d.id); else chosen.delete(d.id);
        showChosen();
      } });
      return [h('tr', { testid: 'dlq-row', 'data-id': d.id }, h('td', {}, pick), h('td', {}, open), h('td.mono', {}, d.id), h('td', {}, d.routing_key), h('td', {}, d.kind), h('td.error', {}, d.reason),
        h('td.num', {}, d.attempts), h('td.mono', {}, d.plugin_version || '–'), h('td', {}, fmtTime(d.first_failure)), h('td', {}, fmtTime(d.dead_lettered_at))), body];
    }));
    if (!items.length) table.append(h('tr', {}, h('td', { colspan: COLS }, 'No dead letters.')));
    showChosen();
    pager.replaceChildren(
      h('button', { type: 'button', disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); load(); } }, 'Previous'),
      h('span.muted', {}, items.length ? ` ${offset + 1}–${offset + items.length} ` : ' '),
      h('button', { type: 'button', disabled: r.body.next_offset == null, onclick: () => { offset = r.body.next_offset; load(); } }, 'Next'));
  };
  const redrive = async (limit, ids) => {
    result.textContent = 'Redriving…';
    const r = ids
      ? await json(`/api/dlq/${enc(name)}/redrive`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ ids }) })
      : await json(`/api/dlq/${enc(name)}/redrive${limit ? `?limit=${limit}` : ''}`, { method: 'POST' });
    const missing = r.ok && r.body.not_found?.length ? ` (no longer dead-lettered: ${r.body.not_found.join(', ')})` : '';
    result.textContent = r.ok ? `Redriven: ${r.body.redriven}${missing}` : `Refused (${r.status}): ${r.body.error}`;
    result.className = r.ok ? 'ok' : 'error';
    if (r.ok) chosen.clear();
    offset = 0;
    await load();
    setTimeout(load, 1000);
  };
  main.replaceChildren(h('h1', {}, 'Dead letters'),
    h('div.inline', {}, h('label', { for: 'dlq-plugin' }, 'Plugin'), select,
      h('span', {}, 'Dead letters: ', count), h('span', {}, 'Handled: ', handled),
      actionButton('Redrive oldest', { type: 'button', testid: 'redrive-oldest', onclick: () => redrive(1) }),
      redriveChosen,
      actionButton('Redrive all', { type: 'button', testid: 'redrive-all', onclick: () => redrive(0) }), result),
    h('div.scroll', {}, h('table', { testid: 'dlq-table' }, h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, pickAll),
      ['', 'Event id', 'Routing key', 'Kind', 'Reason', 'Attempts', 'Plugin version', 'First failure', 'Dead-lettered at'].map((c) => h('th', { scope: 'col' }, c)))), table)), pager);
  counts();
  await load();
  return () => {
    counts();
    const p = plugins.find((x) => x.name === name);
    if (p && dlqSize(p) !== loadedAt) load();
  };
}

function pluginView(name) {
  const result = h('p', { testid: 'reload-result', role: 'status' });
  const section = h('div');
  const render = () => {
    const p = plugins.find((x) => x.name === name);
    if (!p) return section.replaceChildren(h('p', {}, `No plugin ${name}.`));
    const kv = (obj, id) => h('table.kv', { testid: id }, h('tbody', {}, Object.entries(obj || {}).map(([k, v]) => h('tr', {}, h('th', { scope: 'row' }, k), h('td.mono', {}, typeof v === 'object' ? JSON.stringify(v) : String(v))))));
    section.replaceChildren(...[
      kv({ status: p.status, version: p.content_hash, loaded_at: p.loaded_at, loads: p.loads, file: p.file, output_exchange: p.output_exchange || '(same as input)' }, 'plugin-summary'),
      p.last_error ? h('p.error', { testid: 'last-error' }, `Last error: ${p.last_error}`) : null,
      h('h2', {}, 'Routes'), h('ul', {}, (p.routes || []).map((r) => h('li', {}, h('span.mono', {}, r.exchange), ' ← ', h('span.mono', {}, r.pattern)))),
      h('h2', {}, 'Limits'), kv(p.limits, 'plugin-limits'),
      h('h2', {}, 'Config'), p.config && Object.keys(p.config).length ? kv(p.config, 'plugin-config') : h('p.muted', {}, 'No config keys.'),
      h('h2', {}, 'Counters'), kv({ ...(p.dispatch || {}), ...(p.queue || p.broker || {}) }, 'plugin-counters'),
      h('h2', {}, 'Recent log lines'), logs].filter(Boolean));
    loadLogs();
  };
  const logs = h('div.scroll', { testid: 'plugin-logs' });
  const loadLogs = async () => {
    const r = await json(`/api/plugins/${enc(name)}/logs`);
    if (!r.ok) return logs.replaceChildren(h('p.error', {}, r.body.error));
    const lines = (r.body.lines || []).slice(-50).reverse();
    logs.replaceChildren(lines.length
      ? h('table', {}, h('thead', {}, h('tr', {}, ['Time', 'Level', 'Event', 'Message'].map((c) => h('th', { scope: 'col' }, c)))),
        h('tbody', {}, lines.map((l) => h('tr', { testid: 'log-line' }, h('td', {}, fmtTime(l.at)), h('td', {}, l.level),
          h('td.mono', {}, l.event_id), h('td.mono', {}, l.message)))))
      : h('p.muted', {}, 'Nothing logged since the router started.'));
  };
  const reload = actionButton('Reload', { type: 'button', testid: 'reload', onclick: async () => {
    result.textContent = 'Reloading…';
    const r = await json(`/api/plugins/${enc(name)}/reload`, { method: 'POST' });
    result.className = r.ok ? 'ok' : 'error';
    result.textContent = r.ok ? `Reloaded: version ${r.body.content_hash}, loaded at ${r.body.loaded_at}` : `Reload refused (${r.status}): ${r.body.error}`;
  } });
  main.replaceChildren(h('h1', {}, `Plugin ${name}`), h('div.inline', {}, reload, h('a', { href: `#/dlq/${enc(name)}` }, 'Dead letters')), result, section);
  render();
  return render;
}

function historyView() {
  const input = h('input', { id: 'aggregate', testid: 'history-aggregate', required: true, placeholder: 'B-7' });
  const out = h('div', { testid: 'history-result' });
  const form = h('form.inline', { onsubmit: async (e) => {
    e.preventDefault();
    const r = await json(`/api/events?aggregate=${enc(input.value.trim())}&limit=500`);
    if (!r.ok) return out.replaceChildren(h('p.error', {}, r.body.error));
    const items = r.body.items || [];
    out.replaceChildren(h('table', {}, h('thead', {}, h('tr', {}, ['Time', 'Routing key', 'Id', 'Causation'].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, items.length ? items.map((ev) => h('tr', { testid: 'history-row' }, h('td', {}, fmtTime(ev.time)), h('td', {}, ev.routing_key),
        h('td.mono', {}, ev.id), h('td.mono', {}, ev.body?.causation_id || '–'))) : h('tr', {}, h('td', { colspan: 4 }, 'No events for this aggregate.')))));
  } }, h('label', { for: 'aggregate' }, 'Aggregate id'), input, h('button', { type: 'submit' }, 'Search'));
  main.replaceChildren(h('h1', {}, 'History'), h('p.muted', {}, 'Archived events of one aggregate, oldest first.'), form, out, diffForm());
}

/** replay --diff: a candidate .wasm against the running version, over the
 * archived events the plugin gets (of one aggregate, or all), offline. */
function diffForm() {
  const plugin = h('select', { id: 'diff-plugin', testid: 'diff-plugin' }, plugins.map((p) => h('option', {}, p.name)));
  const aggregate = h('input', { id: 'diff-aggregate', testid: 'diff-aggregate', placeholder: 'every aggregate' });
  const file = h('input', { id: 'diff-file', testid: 'diff-file', type: 'file', accept: '.wasm,application/wasm', required: true });
  const out = h('div', { testid: 'diff-result', role: 'status' });
  const run = actionButton('Run diff', { type: 'submit', testid: 'diff-run' });
  const form = h('form.inline', { onsubmit: async (e) => {
    e.preventDefault();
    const candidate = file.files[0];
    if (!candidate) return;
    out.replaceChildren(h('p.muted', {}, `Running every event through ${plugin.value} and ${candidate.name}…`));
    const agg = aggregate.value.trim();
    const r = await json(`/api/plugins/${enc(plugin.value)}/diff${agg ? `?aggregate=${enc(agg)}` : ''}`,
      { method: 'POST', headers: { 'Content-Type': 'application/wasm' }, body: candidate });
    if (!r.ok) return out.replaceChildren(h('p.error', { testid: 'diff-error' }, `Refused (${r.status}): ${r.body.error}`));
    const s = r.body.summary;
    const side = (label, line) => h('div', {}, h('h3', {}, label), h('pre', {}, JSON.stringify(line, null, 2)));
    const rows = r.body.differing.flatMap((d) => {
      const detail = h('tr.detail', { hidden: true }, h('td', { colspan: 4 }, h('div.sides', {}, side(`Running (${s.running})`, d.running), side(`Candidate (${s.candidate})`, d.candidate))));
      const open = h('button.link', { type: 'button', 'aria-expanded': 'false', onclick: () => {
        detail.hidden = !detail.hidden; open.setAttribute('aria-expanded', String(!detail.hidden));
      } }, d.input);
      return [h('tr', { testid: 'diff-row', 'data-verdict': d.verdict }, h('td.mono', {}, open), h('td', {}, d.kind), h('td', {}, d.routing_key), h('td', {}, d.verdict.replaceAll('_', ' '))), detail];
    });
    out.replaceChildren(
      h('p', { testid: 'diff-summary' }, `${s.events} event${s.events === 1 ? '' : 's'}: ${s.same} same, ${s.differ} differ, ${s.fails_only_in_running} fail only in the running version, ${s.fails_only_in_candidate} only in the candidate. Nothing was published.`),
      rows.length ? h('table', {}, h('thead', {}, h('tr', {}, ['Event', 'Kind', 'Routing key', 'Verdict'].map((c) => h('th', { scope: 'col' }, c)))), h('tbody', {}, rows))
        : h('p.ok', {}, 'The candidate does what the running version does with every event.'));
  } }, h('label', { for: 'diff-plugin' }, 'Plugin'), plugin, h('label', { for: 'diff-aggregate' }, 'Aggregate'), aggregate,
  h('label', { for: 'diff-file' }, 'Candidate'), file, run);
  return h('section', { testid: 'diff' }, h('h2', {}, 'Compare a candidate (replay --diff)'),
    h('p.muted', {}, 'Runs the archived events the plugin gets through the running version and a candidate .wasm, each on a scratch copy of the plugin state. Nothing is published or written.'),
    form, out);
}

// ---- Router -------------------------------------------------------------------

let onPoll = null;
pollListeners.add(() => onPoll && onPoll());

async function route() {
  const [, view = '', arg] = location.hash.split('/').map(decodeURIComponent);
  if (view !== 'events' && live.abort) { live.abort.abort(); live.abort = null; }
  document.querySelectorAll('nav a').forEach((a) => a.toggleAttribute('aria-current', a.dataset.view === (view || 'overview')));
  onPoll = null;
  let update;
  if (view === 'routes') update = await routesView();
  else if (view === 'events') eventsView();
  else if (view === 'dlq') update = await dlqView(arg);
  else if (view === 'plugin') update = pluginView(arg);
  else if (view === 'history') historyView();
  else update = overview();
  onPoll = update || null;
}

window.addEventListener('hashchange', route);
await loadInfo();
await poll();
route();
