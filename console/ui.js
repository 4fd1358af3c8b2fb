// DOM helpers, formatting and the shared widgets (status badges, progress bars, dialogs,
// toasts). Elements are built with h(), never from HTML strings: text from the server is
// always text.

/**
 * h('a', {href: '/', class: 'x', onclick: fn}, 'text', child) builds an element.
 * Attributes: `class`, `text`, `on<event>` listeners, `dataset`, booleans (true = present,
 * false/null = absent), everything else as an attribute.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const FINAL = new Set(['completed', 'failed', 'expired', 'cancelled']);
export const isFinal = (status) => FINAL.has(status);
export const STATUSES = ['validating', 'in_progress', 'finalizing', 'completed', 'failed', 'expired', 'cancelling', 'cancelled'];

export function statusBadge(status) {
  return h('span', { class: `badge st-${status}` }, status.replace('_', ' '));
}

/** A bar of succeeded (and failed) lines over the total. */
export function progressBar(done, failed, total, label) {
  const pct = (n) => (total > 0 ? Math.min(100, (100 * n) / total) : 0);
  const ok = h('span', { class: 'ok' });
  const bad = h('span', { class: 'bad' });
  ok.style.width = `${pct(done)}%`;
  bad.style.width = `${pct(failed)}%`;
  const all = done + failed;
  return h('div', {
    class: 'bar',
    role: 'progressbar',
    'aria-label': label || 'Progress',
    'aria-valuemin': 0,
    'aria-valuemax': total || 0,
    'aria-valuenow': all,
    'aria-valuetext': `${fmtNum(all)} of ${fmtNum(total)} done`,
  }, ok, bad);
}

const pad = (n) => String(n).padStart(2, '0');

/** Unix seconds as local `YYYY-MM-DD HH:MM:SS`. */
export function fmtTime(unix) {
  if (unix === null || unix === undefined) return '—';
  const d = new Date(unix * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function timeEl(unix) {
  if (unix === null || unix === undefined) return '—';
  return h('time', { datetime: new Date(unix * 1000).toISOString() }, fmtTime(unix));
}

export function fmtDuration(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return '—';
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function fmtNum(n, digits = 0) {
  if (n === null || n === undefined || !Number.isFinite(n)) return '—';
  return n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

/** The time a batch ended (whichever final time it has). */
export function endedAt(b) {
  return b.completed_at ?? b.failed_at ?? b.expired_at ?? b.cancelled_at ?? null;
}

export function metadataChips(meta) {
  const entries = Object.entries(meta || {});
  if (!entries.length) return h('span', { class: 'muted' }, '—');
  return h('ul', { class: 'chips', 'aria-label': 'Metadata' },
    entries.map(([k, v]) => h('li', { class: 'chip' }, h('span', { class: 'k' }, k), ' ', String(v))));
}

/** A short-lived message in the polite live region. */
export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  const t = h('div', { class: `toast ${kind}` }, message);
  box.append(t);
  setTimeout(() => t.remove(), 6000);
}

/** An inline message that stays (role=alert for errors). */
export function notice(message, kind = 'error') {
  return h('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
}

/**
 * A modal confirmation (native <dialog>: the page behind is inert, focus stays inside,
 * Escape cancels). Resolves to true when confirmed.
 */
export function confirmDialog({ title, body, confirm = 'Confirm', cancel = 'Keep', danger = false }) {
  return new Promise((resolve) => {
    const titleId = `dlg-${Math.random().toString(36).slice(2)}`;
    const ok = h('button', { type: 'submit', value: 'ok', class: danger ? 'danger' : 'primary' }, confirm);
    const no = h('button', { type: 'submit', value: 'cancel', class: 'secondary', formnovalidate: true }, cancel);
    const dlg = h('dialog', { class: 'dialog', 'aria-labelledby': titleId },
      h('form', { method: 'dialog' },
        h('h2', { id: titleId }, title),
        h('p', {}, body),
        h('div', { class: 'actions' }, no, ok)));
    dlg.addEventListener('close', () => {
      resolve(dlg.returnValue === 'ok');
      dlg.remove();
    });
    dlg.addEventListener('keydown', (e) => trapTab(dlg, e));
    document.body.append(dlg);
    dlg.showModal();
    no.focus();
  });
}

/** Keeps Tab and Shift+Tab cycling through the focusable elements of `box`. */
function trapTab(box, e) {
  if (e.key !== 'Tab') return;
  const items = [...box.querySelectorAll('button, [href], input, select, textarea, [tabindex]:not([tabindex="-1"])')]
    .filter((el) => !el.disabled);
  if (!items.length) return;
  const first = items[0];
  const last = items[items.length - 1];
  if (e.shiftKey && document.activeElement === first) { e.preventDefault(); last.focus(); }
  else if (!e.shiftKey && document.activeElement === last) { e.preventDefault(); first.focus(); }
}

/** A button that runs `fn` once at a time, disabled (and saying so) while it runs. */
export function actionButton(label, fn, attrs = {}) {
  const b = h('button', { type: 'button', ...attrs }, label);
  b.addEventListener('click', async () => {
    if (b.disabled) return;
    b.disabled = true;
    b.setAttribute('aria-busy', 'true');
    try { await fn(b); } finally {
      b.disabled = false;
      b.removeAttribute('aria-busy');
    }
  });
  return b;
}

/** A table whose cells carry their column name (shown as a label on narrow screens). */
export function table(caption, columns, rows, attrs = {}) {
  return h('div', { class: 'table-wrap' },
    h('table', { class: 'grid', ...attrs },
      h('caption', { class: 'sr-only' }, caption),
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', {}, rows.map((cells) => h('tr', {}, cells.map((c, i) => h('td', { 'data-label': columns[i] }, c)))))));
}
