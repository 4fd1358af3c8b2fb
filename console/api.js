// The console's only way to the server: the public /v1 API (plus /console/config), with the
// signed-in key as the bearer token. Errors arrive in OpenAI's envelope and become ApiError.

const KEY = 'batchd.apiKey';

/** The API key of this tab (sessionStorage: gone when the tab closes). */
export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `The server answered ${status}.`);
    this.status = status;
    this.code = e.code || null;
    this.param = e.param || null;
  }
}

let unauthorized = () => {};
/** Called when the server refuses the key (401), e.g. to show the sign-in form again. */
export function onUnauthorized(fn) { unauthorized = fn; }

function withKey(headers = {}, key = session.key) {
  const h = new Headers(headers);
  if (key) h.set('Authorization', `Bearer ${key}`);
  return h;
}

function url(path, query) {
  if (!query) return path;
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

async function failure(resp, sessionKey) {
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON */ }
  const err = new ApiError(resp.status, body);
  if (resp.status === 401 && sessionKey) unauthorized(err);
  return err;
}

/** One call; resolves to the parsed JSON (or the Response itself with `raw`). */
export async function request(method, path, { json, body, query, signal, raw, key } = {}) {
  const headers = {};
  if (json !== undefined) headers['Content-Type'] = 'application/json';
  const sessionKey = key === undefined;
  const resp = await fetch(url(path, query), {
    method,
    headers: withKey(headers, sessionKey ? session.key : key),
    body: json !== undefined ? JSON.stringify(json) : body,
    signal,
  });
  // A 401 to the tab's own key means it is no longer valid (a key being tried is not).
  if (!resp.ok) throw await failure(resp, sessionKey);
  return raw ? resp : resp.json();
}

const enc = encodeURIComponent;

export const api = {
  config: (key) => request('GET', '/console/config', { key }),
  listBatches: (q) => request('GET', '/v1/batches', { query: q }),
  batch: (id) => request('GET', `/v1/batches/${enc(id)}`),
  progress: (id) => request('GET', `/v1/batches/${enc(id)}/progress`),
  cancel: (id) => request('POST', `/v1/batches/${enc(id)}/cancel`),
  retry: (id) => request('POST', `/v1/batches/${enc(id)}/retry`, { json: {} }),
  requestResult: (id, customId) => request('GET', `/v1/batches/${enc(id)}/requests/${enc(customId)}`),
  createBatch: (body) => request('POST', '/v1/batches', { json: body }),
  validate: (fileId, endpoint) => request('POST', '/v1/batches/validate', { json: { input_file_id: fileId, endpoint } }),
  listFiles: (q) => request('GET', '/v1/files', { query: q }),
  deleteFile: (id) => request('DELETE', `/v1/files/${enc(id)}`),
  fileContentPath: (id) => `/v1/files/${enc(id)}/content`,
  resultsPath: (id, kind) => `/v1/batches/${enc(id)}/results?kind=${kind}`,
  upload(file, purpose = 'batch') {
    const form = new FormData();
    form.append('purpose', purpose);
    form.append('file', file, file.name || 'input.jsonl');
    return request('POST', '/v1/files', { body: form });
  },
};

/** Fetches `path` and hands it to the browser as a download named `filename`. */
export async function download(path, filename) {
  const resp = await request('GET', path, { raw: true });
  const blob = await resp.blob();
  const href = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = href;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10_000);
}

/**
 * The pieces of a streamed answer between `sep`s, decoded as they arrive (never whole in
 * memory); `clean` rewrites each decoded chunk first. The text after the last `sep` comes
 * last when `tail` is set, and is dropped otherwise (an event cut short).
 */
async function* pieces(path, signal, { sep, clean = (t) => t, tail }) {
  const resp = await request('GET', path, { raw: true, signal });
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { done, value } = await reader.read();
    buf += clean(done ? dec.decode() : dec.decode(value, { stream: true }));
    let end;
    while ((end = buf.indexOf(sep)) >= 0) {
      yield buf.slice(0, end);
      buf = buf.slice(end + sep.length);
    }
    if (done) break;
  }
  if (tail) yield buf;
}

/** Reads a JSONL answer line by line without holding it whole: calls `each(obj)` per line. */
export async function eachJsonLine(path, each, signal) {
  for await (const piece of pieces(path, signal, { sep: '\n', tail: true })) {
    const line = piece.trim();
    if (line) each(JSON.parse(line));
  }
}

/**
 * Follows a server-sent event stream over fetch (EventSource cannot send the bearer key).
 * Calls `onEvent({event, id, data})` per event; resolves when the stream ends, rejects
 * when it breaks. Abort with `signal`.
 */
export async function followEvents(path, onEvent, signal) {
  const clean = (t) => t.replace(/\r\n?/g, '\n');
  for await (const block of pieces(path, signal, { sep: '\n\n', clean })) {
    const ev = parseEvent(block);
    if (ev) onEvent(ev);
  }
}

function parseEvent(block) {
  const ev = { event: 'message', id: null, data: '' };
  const data = [];
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
    if (field === 'event') ev.event = value;
    else if (field === 'id') ev.id = value;
    else if (field === 'data') data.push(value);
  }
  if (!data.length) return null;
  try { ev.data = JSON.parse(data.join('\n')); } catch { return null; }
  return ev;
}
