// A new batch from the browser: drop or choose a JSONL file; it is uploaded (/v1/files) and
// checked by the server's own validator (/v1/batches/validate) before anything is created,
// every problem shown with its line. Then pick endpoint, completion window, priority and
// metadata, and create.

import { api } from '../api.js';
import { h, fill, notice, fmtBytes, fmtNum, table, toast } from '../ui.js';

export async function renderNew(main, { config, navigate }) {
  const s = { file: null, upload: null, validation: null, seq: 0, created: false };

  const fileInput = h('input', { id: 'file', name: 'file', type: 'file', accept: '.jsonl,.json,.txt,application/jsonl,application/x-ndjson', class: 'file-input' });
  const drop = h('div', { class: 'drop', id: 'drop' },
    fileInput,
    h('label', { for: 'file', class: 'drop-label' },
      h('strong', {}, 'Drop a JSONL file here'), h('span', {}, ' or '), h('span', { class: 'button secondary' }, 'choose a file'),
      h('span', { class: 'muted small block' }, 'One request per line, as for OpenAI’s Batch API (or bare request bodies).')));
  const chosen = h('p', { class: 'chosen', 'aria-live': 'polite' });
  const result = h('div', { class: 'validation', id: 'validation', 'aria-live': 'polite' });

  const endpoint = h('select', { id: 'endpoint', name: 'endpoint' },
    config.endpoints.map((e) => h('option', { value: e }, e)));
  const windowSel = h('select', { id: 'window', name: 'completion_window' },
    config.completion_windows.map((w) => h('option', { value: w }, w)));
  const priority = h('input', { id: 'priority', name: 'priority', type: 'number', min: 1, max: config.max_priority, step: 1, value: 1, inputmode: 'numeric' });
  const metadata = h('textarea', { id: 'metadata', name: 'metadata', rows: 3, placeholder: 'job=nightly-eval\nowner=ana', 'aria-describedby': 'metadata-help' });
  const formStatus = h('div', { class: 'form-status' });
  const create = h('button', { type: 'submit', class: 'primary', id: 'create', disabled: true }, 'Create batch');

  const form = h('form', { class: 'card new-batch', id: 'new-batch', novalidate: true },
    h('h2', {}, '1. Input file'),
    drop, chosen, result,
    h('h2', {}, '2. Options'),
    h('div', { class: 'form-grid' },
      h('div', { class: 'field' }, h('label', { for: 'endpoint' }, 'Endpoint'), endpoint),
      h('div', { class: 'field' }, h('label', { for: 'window' }, 'Completion window'), windowSel),
      h('div', { class: 'field' }, h('label', { for: 'priority' }, `Priority (1–${config.max_priority})`), priority),
      h('div', { class: 'field wide' }, h('label', { for: 'metadata' }, 'Metadata'), metadata,
        h('p', { id: 'metadata-help', class: 'muted small' }, 'Optional: one key=value per line (at most 16).'))),
    formStatus,
    h('div', { class: 'actions' }, create));

  fill(main, h('div', { class: 'page-head' }, h('h1', {}, 'New batch')), form);

  const setCreatable = () => { create.disabled = !(s.validation && s.validation.valid && s.validation.endpoint === endpoint.value); };

  async function choose(file) {
    if (!file) return;
    const seq = ++s.seq;
    const previous = s.upload;
    s.file = file;
    s.upload = null;
    s.validation = null;
    setCreatable();
    fill(formStatus);
    fill(chosen, h('strong', {}, file.name), ` · ${fmtBytes(file.size)}`);
    const detected = await firstUrl(file);
    if (detected && config.endpoints.includes(detected)) endpoint.value = detected;
    fill(result, h('p', { class: 'muted' }, 'Uploading…'));
    try {
      const up = await api.upload(file, 'batch');
      if (seq !== s.seq) return;
      s.upload = up;
      if (previous && !s.created) api.deleteFile(previous.id).catch(() => {});
      await validate();
    } catch (e) {
      if (seq === s.seq) fill(result, notice(`The file could not be uploaded: ${e.message}`));
    }
  }

  async function validate() {
    if (!s.upload) return;
    const seq = s.seq;
    const ep = endpoint.value;
    fill(result, h('p', { class: 'muted' }, 'Validating…'));
    try {
      const v = await api.validate(s.upload.id, ep);
      if (seq !== s.seq || ep !== endpoint.value) return;
      s.validation = v;
      showValidation(result, v, s.file.name);
    } catch (e) {
      if (seq === s.seq) fill(result, notice(`The file could not be validated: ${e.message}`));
    }
    setCreatable();
  }

  fileInput.addEventListener('change', () => {
    const f = fileInput.files[0];
    fileInput.value = ''; // choosing the same (fixed) file again fires another change
    choose(f);
  });
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) choose(f);
  });
  endpoint.addEventListener('change', () => { setCreatable(); validate(); });

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    if (create.disabled) return;
    let meta;
    try { meta = parseMetadata(metadata.value); } catch (err) {
      fill(formStatus, notice(err.message));
      metadata.focus();
      return;
    }
    const p = Number(priority.value || 1);
    if (!Number.isInteger(p) || p < 1 || p > config.max_priority) {
      fill(formStatus, notice(`Priority must be a whole number from 1 to ${config.max_priority}.`));
      priority.focus();
      return;
    }
    create.disabled = true;
    fill(formStatus, h('p', { class: 'muted' }, 'Creating…'));
    try {
      const b = await api.createBatch({
        input_file_id: s.upload.id, endpoint: endpoint.value, completion_window: windowSel.value,
        priority: p, metadata: meta,
      });
      s.created = true;
      toast(`Batch ${b.id} created.`);
      navigate(`/batches/${encodeURIComponent(b.id)}`);
    } catch (err) {
      fill(formStatus, notice(`The batch could not be created: ${err.message}`));
      setCreatable();
    }
  });
  return null;
}

function showValidation(el, v, name) {
  const models = Object.entries(v.models || {});
  const modelTable = models.length
    ? table('Requests per model', ['Model', 'Requests', 'Input tokens (est.)'],
      models.map(([m, x]) => [h('code', {}, m), fmtNum(x.requests), fmtNum(x.input_tokens)]))
    : null;
  if (v.valid) {
    fill(el, h('div', { class: 'notice ok', role: 'status', id: 'valid' },
      h('strong', {}, '✓ Valid. '), `${name}: ${fmtNum(v.total)} request${v.total === 1 ? '' : 's'} for ${v.endpoint}${v.format === 'bare' ? ' (bare request bodies)' : ''}.`),
    modelTable);
    return;
  }
  const n = v.errors.length;
  fill(el,
    h('div', { class: 'notice error', role: 'alert', id: 'invalid' },
      h('strong', {}, `✗ ${n} problem${n === 1 ? '' : 's'} found. `),
      `${name} cannot be used for ${v.endpoint} as it is; nothing was created. Fix the lines below and choose the file again.`),
    table('Validation errors', ['Line', 'Code', 'Param', 'Message'],
      v.errors.map((e) => [e.line ?? '—', h('code', {}, e.code), e.param ? h('code', {}, e.param) : '—', e.message]),
      { id: 'validation-errors' }));
}

/** `key=value` lines → object (null when empty). */
function parseMetadata(text) {
  const out = {};
  const lines = text.split('\n').map((l) => l.trim()).filter(Boolean);
  for (const [i, line] of lines.entries()) {
    const eq = line.indexOf('=');
    if (eq <= 0) throw new Error(`Metadata line ${i + 1} must be key=value.`);
    out[line.slice(0, eq).trim()] = line.slice(eq + 1).trim();
  }
  if (Object.keys(out).length > 16) throw new Error('At most 16 metadata keys are allowed.');
  return lines.length ? out : null;
}

/** The `url` of the file's first line, to preselect the endpoint. */
async function firstUrl(file) {
  try {
    const text = await file.slice(0, 65536).text();
    const line = text.split('\n').map((l) => l.trim()).find(Boolean);
    const v = JSON.parse(line.replace(/^\uFEFF/, ''));
    return typeof v.url === 'string' ? v.url : null;
  } catch {
    return null;
  }
}
