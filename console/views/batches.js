// The batches list: newest first, paged, filtered by status and searched by id or metadata
// value (the list's `status` and `search` extensions). The filter lives in the URL, so it
// survives a reload and the back button; the page refreshes itself while a batch on it runs.

import { api } from '../api.js';
import {
  h, fill, notice, statusBadge, progressBar, timeEl, endedAt, metadataChips, fmtNum, isFinal, STATUSES,
} from '../ui.js';

const REFRESH_MS = 3000;
/** Cursors of the pages before this one, to go back to newer pages. */
let pages = { key: '', cursors: [] };

export async function renderBatches(main, { query, navigate }) {
  const status = query.get('status') || '';
  const search = query.get('search') || '';
  const limit = Number(query.get('limit')) || 20;
  const after = query.get('after') || '';
  const filterKey = `${status}|${search}|${limit}`;
  if (pages.key !== filterKey) pages = { key: filterKey, cursors: [] };

  const list = h('div', { class: 'list-body', 'aria-live': 'polite', 'aria-busy': 'true' });
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  fill(main,
    h('div', { class: 'page-head' },
      h('h1', {}, 'Batches'),
      h('a', { href: '/new', class: 'button primary' }, 'New batch')),
    filterForm({ status, search, limit }, navigate),
    list,
    pager);

  const go = (params) => {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries({ status, search, limit: limit === 20 ? '' : limit, ...params })) if (v) q.set(k, v);
    const s = q.toString();
    navigate(s ? `/?${s}` : '/');
  };

  let timer = null;
  let stopped = false;
  const load = async () => {
    try {
      const page = await api.listBatches({ limit, after, status, search });
      if (stopped) return;
      list.setAttribute('aria-busy', 'false');
      // A refresh keeps the keyboard focus on the same link.
      const focused = list.contains(document.activeElement) ? document.activeElement.getAttribute('href') : null;
      fill(list, page.data.length ? batchTable(page.data) : empty(status || search));
      if (focused) list.querySelector(`a[href="${CSS.escape(focused)}"]`)?.focus();
      renderPager(pager, page, after, go);
      const running = page.data.some((b) => !isFinal(b.status));
      if (running && !stopped) timer = setTimeout(load, REFRESH_MS);
    } catch (e) {
      if (stopped || e.status === 401) return;
      fill(list, notice(`The batches could not be listed: ${e.message}`));
    }
  };
  await load();
  return () => { stopped = true; clearTimeout(timer); };
}

function filterForm({ status, search, limit }, navigate) {
  const sel = h('select', { id: 'f-status', name: 'status' },
    h('option', { value: '' }, 'Any status'),
    STATUSES.map((s) => h('option', { value: s, selected: s === status }, s.replace('_', ' '))));
  const input = h('input', {
    id: 'f-search', name: 'search', type: 'search', value: search,
    placeholder: 'batch id or metadata value', autocomplete: 'off',
  });
  const size = h('select', { id: 'f-limit', name: 'limit' },
    [20, 50, 100].map((n) => h('option', { value: n, selected: n === limit }, String(n))));
  const form = h('form', { class: 'filters', role: 'search', 'aria-label': 'Filter batches' },
    h('div', { class: 'field' }, h('label', { for: 'f-status' }, 'Status'), sel),
    h('div', { class: 'field grow' }, h('label', { for: 'f-search' }, 'Search'), input),
    h('div', { class: 'field' }, h('label', { for: 'f-limit' }, 'Per page'), size),
    h('div', { class: 'field end' }, h('button', { type: 'submit', class: 'secondary' }, 'Apply')));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    if (sel.value) q.set('status', sel.value);
    if (input.value.trim()) q.set('search', input.value.trim());
    if (size.value !== '20') q.set('limit', size.value);
    const s = q.toString();
    navigate(s ? `/?${s}` : '/');
  });
  sel.addEventListener('change', () => form.requestSubmit());
  size.addEventListener('change', () => form.requestSubmit());
  return form;
}

function empty(filtered) {
  return h('div', { class: 'empty card' },
    filtered
      ? h('p', {}, 'No batch matches this filter.')
      : [h('p', {}, 'No batches yet.'), h('p', {}, h('a', { href: '/new' }, 'Create one from a JSONL file.'))]);
}

function batchTable(batches) {
  const columns = ['Batch', 'Status', 'Progress', 'Requests', 'Endpoint', 'Model', 'Created', 'Ended', 'Metadata'];
  const rows = batches.map((b) => {
    const rc = b.request_counts || { total: 0, completed: 0, failed: 0 };
    return [
      h('a', { href: `/batches/${encodeURIComponent(b.id)}`, class: 'mono' }, b.id),
      statusBadge(b.status),
      progressBar(rc.completed, rc.failed, rc.total, `Progress of ${b.id}`),
      h('span', { class: 'counts' },
        h('span', { class: 'n-ok', title: 'completed' }, `✓ ${fmtNum(rc.completed)}`), ' ',
        h('span', { class: 'n-bad', title: 'failed' }, `✗ ${fmtNum(rc.failed)}`), ' ',
        h('span', { class: 'muted' }, `/ ${fmtNum(rc.total)}`)),
      h('span', { class: 'mono small' }, b.endpoint),
      b.model ? h('span', { class: 'mono small' }, b.model) : h('span', { class: 'muted' }, rc.total ? 'several' : '—'),
      timeEl(b.created_at),
      timeEl(endedAt(b)),
      metadataChips(b.metadata),
    ];
  });
  const t = h('table', { class: 'grid batches' },
    h('caption', { class: 'sr-only' }, 'Batches, newest first'),
    h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, rows.map((cells, i) => h('tr', { dataset: { id: batches[i].id, status: batches[i].status } },
      cells.map((c, j) => h('td', { 'data-label': columns[j] }, c))))));
  return h('div', { class: 'table-wrap' }, t);
}

function renderPager(pager, page, after, go) {
  const newer = pages.cursors.length
    ? h('button', { type: 'button', class: 'secondary', onclick: () => go({ after: pages.cursors.pop() }) }, '← Newer')
    : after ? h('button', { type: 'button', class: 'secondary', onclick: () => go({ after: '' }) }, '← Newest') : null;
  const older = page.has_more
    ? h('button', { type: 'button', class: 'secondary', onclick: () => { pages.cursors.push(after); go({ after: page.last_id }); } }, 'Older →')
    : null;
  fill(pager, newer, older);
}
