// The files list: purpose, size, created and expiry times, download and delete. A file that a
// running batch reads cannot be deleted: the server's 409 message is shown as it is.

import { api, download } from '../api.js';
import { h, fill, notice, toast, fmtBytes, timeEl, confirmDialog, actionButton, table } from '../ui.js';

const PAGE = 50;

export async function renderFiles(main, { config, query, navigate }) {
  const purpose = query.get('purpose') || '';
  const after = query.get('after') || '';
  const status = h('div', { class: 'notices', id: 'files-status' });
  const list = h('div', { 'aria-live': 'polite' });
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  const sel = h('select', { id: 'f-purpose', name: 'purpose' },
    h('option', { value: '' }, 'Any purpose'),
    [...config.purposes, 'batch_output'].map((p) => h('option', { value: p, selected: p === purpose }, p)));
  const form = h('form', { class: 'filters', role: 'search', 'aria-label': 'Filter files' },
    h('div', { class: 'field' }, h('label', { for: 'f-purpose' }, 'Purpose'), sel),
    h('div', { class: 'field end' }, h('button', { type: 'submit', class: 'secondary' }, 'Apply')));
  const go = (q) => {
    const s = new URLSearchParams(Object.entries(q).filter(([, v]) => v)).toString();
    navigate(s ? `/files?${s}` : '/files');
  };
  form.addEventListener('submit', (e) => { e.preventDefault(); go({ purpose: sel.value }); });
  sel.addEventListener('change', () => form.requestSubmit());
  fill(main,
    h('div', { class: 'page-head' }, h('h1', {}, 'Files'), h('a', { href: '/new', class: 'button primary' }, 'Upload a batch file')),
    form, status, list, pager);

  const load = async () => {
    try {
      const page = await api.listFiles({ purpose, after, limit: PAGE });
      fill(list, page.data.length ? fileTable(page.data, status, load) : h('div', { class: 'empty card' }, h('p', {}, purpose ? `No file with purpose ${purpose}.` : 'No files yet.')));
      fill(pager,
        after ? h('button', { type: 'button', class: 'secondary', onclick: () => go({ purpose }) }, '← Newest') : null,
        page.has_more ? h('button', { type: 'button', class: 'secondary', onclick: () => go({ purpose, after: page.last_id }) }, 'Older →') : null);
    } catch (e) {
      if (e.status !== 401) fill(list, notice(`The files could not be listed: ${e.message}`));
    }
  };
  await load();
  return null;
}

function fileTable(files, status, reload) {
  return table('Files, newest first', ['File', 'Purpose', 'Size', 'Created', 'Expires', 'Actions'],
    files.map((f) => [
      h('span', { class: 'file-cell' }, h('strong', { class: 'filename' }, f.filename), h('code', { class: 'small block' }, f.id)),
      h('code', {}, f.purpose),
      fmtBytes(f.bytes),
      timeEl(f.created_at),
      timeEl(f.expires_at),
      h('span', { class: 'actions tight' },
        actionButton('Download', () => download(api.fileContentPath(f.id), f.filename).catch((e) => fill(status, notice(`Download failed: ${e.message}`))),
          { class: 'secondary small', 'aria-label': `Download ${f.filename}` }),
        actionButton('Delete', () => remove(f, status, reload), { class: 'danger small', 'aria-label': `Delete ${f.filename}`, dataset: { file: f.id } })),
    ]), { id: 'files-table' });
}

async function remove(f, status, reload) {
  const ok = await confirmDialog({
    title: `Delete ${f.filename}?`,
    body: `The file ${f.id} and its bytes are removed for good.`,
    confirm: 'Delete file', cancel: 'Keep it', danger: true,
  });
  if (!ok) return;
  try {
    await api.deleteFile(f.id);
    fill(status);
    toast(`Deleted ${f.filename}.`);
    await reload();
  } catch (e) {
    fill(status, notice(e.status === 409 ? `Not deleted: ${e.message}` : `Delete failed: ${e.message}`));
  }
}
