// The dashboard of vmreplicad: reads /api/vms every 2 s and the selected
// VM's /api/vms/NAME (samples, recovery points, events); read-only.  The
// DOM is built with createElement/textContent only: VM names and event
// messages are never parsed as HTML.
'use strict';

const SVGNS = 'http://www.w3.org/2000/svg';
let selected = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmtLag(s) {
  if (s === null || s === undefined) return '-';
  if (s < 120) return s.toFixed(1) + ' s';
  if (s < 7200) return (s / 60).toFixed(1) + ' min';
  return (s / 3600).toFixed(1) + ' h';
}

function fmtBytes(n) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : Math.round(n)) + ' ' + u[i];
}

function fmtTime(t) {
  if (!t) return 'never';
  const d = new Date(t);
  return isNaN(d) ? t : d.toLocaleString();
}

async function getJSON(url) {
  const r = await fetch(url, { cache: 'no-store' });
  if (!r.ok) throw new Error(url + ': HTTP ' + r.status);
  return r.json();
}

function renderList(data) {
  document.getElementById('host').textContent = data.hostname || '';
  const tbody = document.querySelector('#vms tbody');
  const rows = [];
  data.vms.sort((a, b) => a.name.localeCompare(b.name));
  for (const vm of data.vms) {
    const tr = el('tr', 'h-' + (vm.health || 'none'));
    tr.id = 'vm-' + vm.name;
    tr.dataset.vm = vm.name;
    if (vm.name === selected) tr.classList.add('selected');
    tr.append(el('td', 'name', vm.name), el('td', 'mode', vm.mode),
              el('td', 'state', vm.state), el('td', 'health', vm.health || '-'),
              el('td', 'last', fmtTime(vm.last_replication_time)),
              el('td', 'lag', fmtLag(vm.lag_seconds)));
    tr.addEventListener('click', () => { selected = vm.name; refresh(); });
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
  document.getElementById('empty').hidden = data.vms.length > 0;
  if (!data.vms.some(v => v.name === selected))
    selected = data.vms.length ? data.vms[0].name : null;
}

// A time series chart: points [t_ms, value] over the samples' span.
function chart(node, series, bars, fmt, none) {
  const W = 600, H = 160, L = 58, R = 8, T = 8, B = 22;
  const pts = series.filter(p => p[1] !== null);
  const kids = [svg('line', { class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B }),
                svg('line', { class: 'axis', x1: L, y1: T, x2: L, y2: H - B })];
  if (pts.length === 0) {
    kids.push(svg('text', { class: 'none', x: W / 2, y: H / 2, 'text-anchor': 'middle' },
                  none || 'no samples yet'));
    node.replaceChildren(...kids);
    return;
  }
  const t0 = series[0][0], t1 = Math.max(series[series.length - 1][0], t0 + 1);
  const vmax = Math.max(...pts.map(p => p[1]), bars ? 1 : 0.001) * 1.1;
  const x = t => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = v => H - B - v / vmax * (H - B - T);
  kids.push(svg('text', { class: 'label', x: L - 4, y: T + 8, 'text-anchor': 'end' }, fmt(vmax)));
  kids.push(svg('text', { class: 'label', x: L - 4, y: H - B, 'text-anchor': 'end' }, fmt(0)));
  kids.push(svg('text', { class: 'label', x: L, y: H - 6 }, new Date(t0).toLocaleTimeString()));
  kids.push(svg('text', { class: 'label', x: W - R, y: H - 6, 'text-anchor': 'end' },
                new Date(t1).toLocaleTimeString()));
  if (bars) {
    const w = Math.max(1, (W - L - R) / Math.max(series.length, 1) - 1);
    for (const p of pts)
      kids.push(svg('rect', { class: 'bar', x: x(p[0]) - w / 2, y: y(p[1]), width: w,
                              height: H - B - y(p[1]) }));
  } else {
    kids.push(svg('polyline', { class: 'line',
                                points: pts.map(p => x(p[0]) + ',' + y(p[1])).join(' ') }));
  }
  node.replaceChildren(...kids);
}

function timeline(node, points) {
  const W = 1220, H = 60, L = 10, R = 10;
  const kids = [svg('line', { class: 'axis', x1: L, y1: 30, x2: W - R, y2: 30 })];
  if (!points.length) {
    kids.push(svg('text', { class: 'none', x: W / 2, y: 20, 'text-anchor': 'middle' },
                  'no recovery points (kept on the Replica server)'));
    node.replaceChildren(...kids);
    return;
  }
  const ts = points.map(p => p.time_ms);
  const t0 = Math.min(...ts), t1 = Math.max(Math.max(...ts), t0 + 1);
  for (const p of points) {
    const cx = L + (p.time_ms - t0) / (t1 - t0) * (W - L - R);
    const c = svg('circle', { class: 'point' + (p.kind !== 'standard' ? ' app' : ''),
                              cx: cx, cy: 30, r: 5 });
    c.append(svg('title', {}, new Date(p.time_ms).toLocaleString() + ' (' + p.kind + ')'));
    kids.push(c);
  }
  kids.push(svg('text', { class: 'label', x: L, y: 55 }, new Date(t0).toLocaleString()));
  kids.push(svg('text', { class: 'label', x: W - R, y: 55, 'text-anchor': 'end' },
                new Date(t1).toLocaleString() + ' · ' + points.length + ' points'));
  node.replaceChildren(...kids);
}

function renderDetail(d) {
  document.getElementById('detail').hidden = false;
  document.getElementById('detail-name').textContent =
    d.name + ' — ' + d.mode + ', ' + d.state + ', health ' + (d.health || '-');
  chart(document.getElementById('lag-chart'), d.samples.map(s => [s[0], s[1]]), false,
        v => v.toFixed(v < 10 ? 1 : 0) + ' s');
  chart(document.getElementById('bytes-chart'), d.samples.map(s => [s[0], s[2] || null]), true,
        fmtBytes, d.mode === 'replica' ? 'measured on the primary server' : 'no cycles sent yet');
  timeline(document.getElementById('points-chart'), d.points || []);
  const items = (d.events || []).slice().reverse().map(e => {
    const li = el('li', e.level);
    li.append(el('span', 'time', fmtTime(e.time)), el('span', 'msg', e.message));
    return li;
  });
  document.getElementById('events').replaceChildren(...items);
}

async function refresh() {
  const status = document.getElementById('status');
  try {
    renderList(await getJSON('/api/vms'));
    if (selected)
      renderDetail(await getJSON('/api/vms/' + encodeURIComponent(selected)));
    else
      document.getElementById('detail').hidden = true;
    status.textContent = 'updated ' + new Date().toLocaleTimeString();
    status.classList.remove('stale');
  } catch (e) {
    status.textContent = 'cannot reach vmreplicad: ' + e.message;
    status.classList.add('stale');
  }
}

refresh();
setInterval(refresh, 2000);
