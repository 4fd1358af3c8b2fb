// A batch's page, live: it follows the batch's event stream from its start (`?after=0`, so
// the throughput chart has the whole history) and re-reads the batch and its /progress when
// events arrive; when the stream cannot be followed it polls instead. Shows the timeline,
// progress and ETA, at-risk and stall flags, per-upstream state, errors grouped by code and
// status, a custom_id lookup, downloads, Cancel and Retry failed lines.

import { api, download, eachJsonLine, followEvents } from '../api.js';
import { RateChart } from '../chart.js';
import {
  h, fill, notice, toast, statusBadge, progressBar, timeEl, fmtNum, fmtDuration, fmtTime,
  metadataChips, isFinal, confirmDialog, actionButton, table, endedAt,
} from '../ui.js';

const POLL_MS = 2000;
/** Pause before following a stream again after it ended with the batch still running. */
const RESUME_MS = 500;
const PROGRESS_EVERY_MS = 5000;
const ERRORS_EVERY_MS = 10000;

export async function renderBatch(main, { params: [id], config }) {
  const page = new BatchPage(main, id, config);
  await page.start();
  return () => page.stop();
}

class BatchPage {
  constructor(main, id, config) {
    this.authRequired = Boolean(config && config.auth_required);
    this.main = main;
    this.id = id;
    this.abort = new AbortController();
    this.timers = [];
    this.readings = [];
    this.lastEventId = null;
    this.errorsLoadedAt = 0;
    this.errorsFailed = -1;
    this.errorsFinal = false;
    this.refreshing = null;
    this.refreshAgain = false;
    this.stopped = false;
  }

  async start() {
    let b;
    try {
      b = await api.batch(this.id);
    } catch (e) {
      if (e.status === 404) {
        fill(this.main, h('h1', {}, 'Batch not found'),
          h('p', {}, 'There is no batch ', h('code', {}, this.id), this.authRequired ? ' for this key. ' : ' on this server. ', h('a', { href: '/' }, 'Back to the batches.')));
      } else if (e.status !== 401) {
        fill(this.main, h('h1', {}, 'Batch'), notice(`The batch could not be read: ${e.message}`));
      }
      return;
    }
    this.layout();
    this.showBatch(b);
    this.refresh();
    this.follow();
    this.every(PROGRESS_EVERY_MS, () => { if (!isFinal(this.batch.status)) this.refresh(); });
  }

  stop() {
    this.stopped = true;
    this.abort.abort();
    this.timers.forEach(clearInterval);
    if (this.chart) this.chart.destroy();
  }

  every(ms, fn) { this.timers.push(setInterval(fn, ms)); }

  // ---- layout ----

  layout() {
    const e = this.el = {};
    e.badge = h('span');
    e.live = h('span', { class: 'live muted small', 'aria-live': 'polite' });
    e.actions = h('div', { class: 'actions wrap' });
    e.notices = h('div', { class: 'notices' });
    e.flags = h('div', { class: 'flags' });
    e.bar = h('div', { class: 'big-bar' });
    e.stats = h('dl', { class: 'stats' });
    e.chart = h('div', { class: 'chart', role: 'img', 'aria-label': 'Requests per second and tokens per second over time' });
    e.timeline = h('ol', { class: 'timeline' });
    e.details = h('dl', { class: 'details' });
    e.upstreams = h('div');
    e.validation = h('section', { class: 'card', hidden: true, 'aria-labelledby': 'v-title' });
    e.errors = h('div');
    e.lookupOut = h('div', { class: 'lookup-out', 'aria-live': 'polite' });
    fill(this.main,
      h('p', { class: 'crumbs' }, h('a', { href: '/' }, '← Batches')),
      h('div', { class: 'page-head' },
        h('h1', { class: 'mono batch-id', tabindex: '-1' }, this.id),
        h('div', { class: 'head-status' }, e.badge, e.live)),
      e.actions, e.notices, e.flags,
      h('section', { class: 'card', 'aria-labelledby': 'p-title' }, h('h2', { id: 'p-title' }, 'Progress'), e.bar, e.stats),
      h('section', { class: 'card', 'aria-labelledby': 'c-title' }, h('h2', { id: 'c-title' }, 'Throughput'), e.chart),
      h('div', { class: 'cols' },
        h('section', { class: 'card', 'aria-labelledby': 't-title' }, h('h2', { id: 't-title' }, 'Timeline'), e.timeline),
        h('section', { class: 'card', 'aria-labelledby': 'd-title' }, h('h2', { id: 'd-title' }, 'Details'), e.details)),
      h('section', { class: 'card', 'aria-labelledby': 'u-title' }, h('h2', { id: 'u-title' }, 'Upstreams'), e.upstreams),
      e.validation,
      h('section', { class: 'card', 'aria-labelledby': 'e-title' }, h('h2', { id: 'e-title' }, 'Errors by code'), e.errors),
      h('section', { class: 'card', 'aria-labelledby': 'l-title' }, h('h2', { id: 'l-title' }, 'Look up a request'), this.lookupForm(), e.lookupOut));
    this.chart = new RateChart(e.chart);
  }

  // ---- data ----

  /** Re-reads the batch and its progress (one call at a time; a call asked for meanwhile runs after). */
  async refresh() {
    if (this.refreshing) { this.refreshAgain = true; return this.refreshing; }
    this.refreshing = (async () => {
      try {
        const [b, p] = await Promise.all([api.batch(this.id), api.progress(this.id)]);
        if (this.stopped) return;
        this.showBatch(b);
        this.showProgress(p);
      } catch (e) {
        if (!this.stopped && e.status !== 401 && e.name !== 'AbortError') this.setLive(`update failed: ${e.message}`);
      }
    })();
    await this.refreshing;
    this.refreshing = null;
    if (this.refreshAgain && !this.stopped) { this.refreshAgain = false; this.refresh(); }
  }

  /**
   * Follows the event stream, resuming after the last event whenever it ends before the
   * batch does (the server ends streams at their lifetime); falls back to polling when the
   * stream cannot be followed.
   */
  async follow() {
    this.setLive('● live');
    try {
      for (;;) {
        await followEvents(`/v1/batches/${encodeURIComponent(this.id)}/events?after=${this.lastEventId ?? 0}`,
          (ev) => this.onEvent(ev), this.abort.signal);
        if (this.stopped) return;
        await this.refresh();
        if (isFinal(this.batch.status)) { this.setLive('ended'); return; }
        await new Promise((r) => setTimeout(r, RESUME_MS));
        if (this.stopped) return;
      }
    } catch (e) {
      if (!this.stopped) this.poll();
    }
  }

  poll() {
    if (this.polling || this.stopped) return;
    this.polling = true;
    this.setLive('polling');
    this.every(POLL_MS, () => {
      if (isFinal(this.batch.status)) { this.setLive('ended'); return; }
      this.refresh();
    });
  }

  onEvent(ev) {
    if (ev.id) this.lastEventId = ev.id;
    const d = ev.data && ev.data.data;
    if (ev.event === 'batch.progress' && d && d.request_counts) {
      const rc = d.request_counts;
      this.readings.push({ t: ev.data.created_at, done: rc.completed + rc.failed, tokens: d.usage ? d.usage.total_tokens : null });
      this.soon('chart', () => this.drawChart(), 100);
    }
    this.soon('refresh', () => this.refresh(), 250);
  }

  /** Runs `fn` once `ms` after the first of a burst of calls. */
  soon(key, fn, ms) {
    this.pending = this.pending || {};
    if (this.pending[key]) return;
    this.pending[key] = setTimeout(() => { this.pending[key] = null; if (!this.stopped) fn(); }, ms);
  }

  setLive(text) { this.el.live.textContent = text; }

  // ---- rendering ----

  showBatch(b) {
    const first = !this.batch;
    this.batch = b;
    fill(this.el.badge, statusBadge(b.status));
    this.el.badge.dataset.status = b.status;
    this.renderActions(b);
    this.renderTimeline(b);
    this.renderDetails(b);
    this.renderValidation(b);
    if (first) this.showProgress(null);
    this.maybeLoadErrors(b);
    if (first || isFinal(b.status)) this.drawChart();
  }

  showProgress(p) {
    const b = this.batch;
    const rc = b.request_counts;
    const c = p ? p.counts : { total: rc.total, succeeded: rc.completed, failed: rc.failed, retrying: 0, in_flight: 0, pending: Math.max(0, rc.total - rc.completed - rc.failed) };
    fill(this.el.bar, progressBar(c.succeeded, c.failed, c.total, 'Batch progress'),
      h('p', { class: 'bar-label' }, `${fmtNum(c.succeeded + c.failed)} of ${fmtNum(c.total)} done`,
        c.total ? ` (${Math.floor((100 * (c.succeeded + c.failed)) / c.total)}%)` : ''));
    const stat = (label, value, cls) => [h('div', { class: `stat ${cls || ''}` }, h('dt', {}, label), h('dd', { dataset: { stat: label } }, value))];
    const running = !isFinal(b.status);
    fill(this.el.stats,
      stat('Succeeded', fmtNum(c.succeeded), 'ok'),
      stat('Failed', fmtNum(c.failed), c.failed ? 'bad' : ''),
      stat('Retrying', fmtNum(c.retrying)),
      stat('In flight', fmtNum(c.in_flight)),
      stat('Pending', fmtNum(c.pending)),
      stat('Total', fmtNum(c.total)),
      stat('Requests/s', p && running ? fmtNum(p.requests_per_second, 1) : '—'),
      stat('Tokens/s', p && running ? fmtNum(p.tokens_per_second, 0) : '—'),
      stat('ETA', p && running && p.eta_seconds !== null ? fmtDuration(p.eta_seconds) : '—'),
      ...(running ? [] : finishedStats(b, c, stat)),
      stat('Last result', p && p.seconds_since_last_result !== null && running ? `${fmtDuration(p.seconds_since_last_result)} ago` : '—'));
    this.renderFlags(p);
    this.renderUpstreams(p ? p.upstreams : null);
  }

  renderFlags(p) {
    const flags = [];
    if (p && p.stalled) {
      flags.push(h('div', { class: 'notice warn stalled', role: 'alert' },
        h('strong', {}, 'Stalled'), ` since ${fmtTime(p.stalled.since)}: `, p.stalled.reason));
    }
    if (p && p.at_risk) {
      const when = p.projected_finish_at ? ` At the current rate it ends at ${fmtTime(p.projected_finish_at)}.` : '';
      flags.push(h('div', { class: 'notice warn at-risk', role: 'status' },
        h('strong', {}, 'At risk'), `: it may not finish before it expires at ${fmtTime(this.batch.expires_at)}.${when}`));
    }
    fill(this.el.flags, flags);
  }

  renderActions(b) {
    const rc = b.request_counts;
    const cancellable = b.status === 'validating' || b.status === 'in_progress';
    const buttons = [];
    if (cancellable) {
      buttons.push(actionButton('Cancel batch', () => this.cancel(), { class: 'danger', id: 'cancel' }));
    }
    if (isFinal(b.status) && rc.failed > 0) {
      buttons.push(actionButton('Retry failed lines', () => this.retry(), { class: 'primary', id: 'retry' }));
    }
    const out = b.output_file_id;
    const errs = b.error_file_id;
    if (out || rc.completed > 0) {
      buttons.push(actionButton(out ? 'Download output' : 'Download output so far', () => this.save(out, 'output'), { class: 'secondary', id: 'dl-output' }));
    }
    if (errs || rc.failed > 0) {
      buttons.push(actionButton(errs ? 'Download errors' : 'Download errors so far', () => this.save(errs, 'errors'), { class: 'secondary', id: 'dl-errors' }));
    }
    // Keep the focused button focused across re-renders.
    const focused = document.activeElement && this.el.actions.contains(document.activeElement) ? document.activeElement.id : null;
    const sig = buttons.map((x) => x.id + x.textContent).join('|');
    if (sig === this.actionsSig) return;
    this.actionsSig = sig;
    fill(this.el.actions, buttons);
    if (focused) {
      const again = this.el.actions.querySelector(`#${focused}`);
      // A button that went away (Cancel, once cancelled) leaves the focus on the heading.
      (again || this.main.querySelector('h1')).focus();
    }
  }

  renderTimeline(b) {
    const steps = [
      ['created', b.created_at], ['in progress', b.in_progress_at], ['cancelling', b.cancelling_at],
      ['finalizing', b.finalizing_at], ['completed', b.completed_at], ['failed', b.failed_at],
      ['expired', b.expired_at], ['cancelled', b.cancelled_at],
    ].filter(([, t]) => t !== null && t !== undefined);
    steps.sort((x, y) => x[1] - y[1]);
    const items = steps.map(([name, t]) => h('li', { dataset: { step: name } },
      h('span', { class: 'dot' }), h('span', { class: 'step' }, name), ' ', timeEl(t),
      t > b.created_at ? h('span', { class: 'muted small' }, ` +${fmtDuration(t - b.created_at)}`) : null));
    if (!isFinal(b.status) && b.expires_at) {
      items.push(h('li', { class: 'future' }, h('span', { class: 'dot' }), h('span', { class: 'step' }, 'expires'), ' ', timeEl(b.expires_at)));
    }
    fill(this.el.timeline, items);
  }

  renderDetails(b) {
    const u = b.usage || {};
    const row = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
    const retryOf = b.metadata && b.metadata.retry_of;
    fill(this.el.details,
      row('Endpoint', h('code', {}, b.endpoint)),
      row('Model', b.model ? h('code', {}, b.model) : h('span', { class: 'muted' }, b.request_counts.total ? 'several' : '—')),
      row('Input file', h('code', {}, b.input_file_id)),
      row('Window', b.completion_window),
      row('Expires', timeEl(b.expires_at)),
      row('Output file', b.output_file_id ? h('code', {}, b.output_file_id) : '—'),
      row('Error file', b.error_file_id ? h('code', {}, b.error_file_id) : '—'),
      row('Tokens', `${fmtNum(u.input_tokens)} in · ${fmtNum(u.output_tokens)} out · ${fmtNum(u.total_tokens)} total`),
      row('Cost', b.cost === null || b.cost === undefined ? '—' : fmtNum(b.cost, 4)),
      retryOf ? row('Retry of', h('a', { href: `/batches/${encodeURIComponent(retryOf)}`, class: 'mono' }, retryOf)) : null,
      row('Metadata', metadataChips(b.metadata)));
  }

  renderValidation(b) {
    const list = b.errors && b.errors.data;
    const sec = this.el.validation;
    if (!list || !list.length) { sec.hidden = true; return; }
    if (!sec.hidden) return;
    sec.hidden = false;
    fill(sec, h('h2', { id: 'v-title' }, `Validation errors (${list.length})`),
      table('Validation errors', ['Line', 'Code', 'Param', 'Message'],
        list.map((e) => [e.line ?? '—', h('code', {}, e.code), e.param ? h('code', {}, e.param) : '—', e.message])));
  }

  renderUpstreams(list) {
    if (!list) { fill(this.el.upstreams, h('p', { class: 'muted' }, 'Loading…')); return; }
    if (!list.length) { fill(this.el.upstreams, h('p', { class: 'muted' }, 'No upstream serves this batch.')); return; }
    const pause = (u) => {
      if (!u.paused) return 'no';
      // The reason in words, until when, and what the upstream said (the detail without the
      // server's own "from upstream; retry-after …" / "; trying again in …" tail: the time is
      // the "until" already).
      const why = u.pause_reason ? u.pause_reason.replaceAll('_', ' ') : 'paused';
      const until = u.paused_until_ms ? ` until ${fmtTime(Math.ceil(u.paused_until_ms / 1000))}` : '';
      const said = (u.pause_detail || '').split(/ from upstream;|; trying again in |; pausing /)[0].trim().replace(/\.$/, '');
      return h('span', { class: 'n-bad pause' }, `yes: ${why}${until}`, said ? h('span', { class: 'small said' }, `upstream said: ${said}`) : null);
    };
    const opt = (v, f) => (v === undefined || v === null ? '—' : f(v));
    fill(this.el.upstreams, table('Upstreams serving this batch',
      ['Upstream', 'Mode', 'In flight', 'Window', 'Limit', 'Paused', 'Rate limited / overloaded (1 min)', 'Last error'],
      list.map((u) => [
        h('strong', {}, u.name),
        opt(u.mode, String),
        fmtNum(u.in_flight),
        fmtNum(u.window, 1),
        fmtNum(u.limit),
        pause(u),
        `${opt(u.rate_limited_last_minute, fmtNum)} / ${opt(u.overloaded_last_minute, fmtNum)}`,
        u.last_error ? h('span', { class: 'small' }, u.last_error) : h('span', { class: 'muted' }, 'none'),
      ])));
  }

  drawChart() {
    const b = this.batch;
    if (!this.chart || !b) return;
    // Readings by second (the last of a second wins), from a zero reading when it started.
    const byT = new Map();
    for (const r of this.readings) byT.set(r.t, r);
    const rs = [...byT.values()].sort((x, y) => x.t - y.t);
    if (b.in_progress_at) {
      const start = rs.length ? Math.min(b.in_progress_at, rs[0].t - 1) : b.in_progress_at;
      rs.unshift({ t: start, done: 0, tokens: 0 });
    }
    const points = rs.length ? [{ t: rs[0].t, rps: 0, tps: 0 }] : [];
    for (let i = 1; i < rs.length; i++) {
      const dt = rs[i].t - rs[i - 1].t;
      const tokens = rs[i].tokens !== null && rs[i - 1].tokens !== null ? (rs[i].tokens - rs[i - 1].tokens) / dt : null;
      points.push({ t: rs[i].t, rps: Math.max(0, (rs[i].done - rs[i - 1].done) / dt), tps: tokens === null ? null : Math.max(0, tokens) });
    }
    this.chart.set(points);
  }

  // ---- errors ----

  /** Reads the errors again when more lines failed (at most every 10 s while running) and once at the end. */
  maybeLoadErrors(b) {
    if (this.errorsFinal) return;
    const final = isFinal(b.status);
    const failed = b.request_counts.failed;
    if (failed === 0) {
      this.errorsFinal = final;
      fill(this.el.errors, h('p', { class: 'muted' }, final ? 'No line failed.' : 'No line has failed so far.'));
      return;
    }
    if (!final && (failed === this.errorsFailed || Date.now() - this.errorsLoadedAt < ERRORS_EVERY_MS)) return;
    if (this.loadingErrors) { this.errorsAgain = true; return; }
    this.errorsLoadedAt = Date.now();
    this.errorsFailed = failed;
    this.errorsFinal = final;
    this.loadErrors().then(() => {
      if (this.errorsAgain && !this.stopped) { this.errorsAgain = false; this.maybeLoadErrors(this.batch); }
    });
  }

  async loadErrors() {
    this.loadingErrors = true;
    const groups = new Map();
    let lines = 0;
    try {
      await eachJsonLine(api.resultsPath(this.id, 'errors'), (l) => {
        lines += 1;
        const { status, code, message } = describeError(l);
        const key = `${status}|${code}`;
        const g = groups.get(key);
        if (g) g.count += 1;
        else groups.set(key, { status, code, count: 1, example: { custom_id: l.custom_id, message } });
      }, this.abort.signal);
    } catch (e) {
      if (!this.stopped && e.name !== 'AbortError') fill(this.el.errors, notice(`The errors could not be read: ${e.message}`));
      return;
    } finally {
      this.loadingErrors = false;
    }
    if (this.stopped) return;
    const rows = [...groups.values()].sort((a, b) => b.count - a.count).map((g) => [
      g.status ?? h('span', { class: 'muted' }, 'no answer'),
      h('code', {}, g.code),
      fmtNum(g.count),
      h('span', {}, h('button', { type: 'button', class: 'link mono', onclick: () => this.lookup(g.example.custom_id) }, g.example.custom_id),
        h('span', { class: 'small' }, ` ${g.example.message}`)),
    ]);
    fill(this.el.errors,
      h('p', { class: 'muted small' }, `${fmtNum(lines)} failed lines in ${groups.size} group${groups.size === 1 ? '' : 's'}.`),
      table('Failed lines grouped by code and status', ['Status', 'Code', 'Lines', 'Example'], rows, { id: 'error-groups' }));
  }

  // ---- actions ----

  async cancel() {
    const ok = await confirmDialog({
      title: 'Cancel this batch?',
      body: 'Lines not yet sent will not run; lines already answered stay in the output. This cannot be undone.',
      confirm: 'Cancel batch', cancel: 'Keep running', danger: true,
    });
    if (!ok) return;
    try {
      const b = await api.cancel(this.id);
      this.showBatch(b);
      toast(`Batch ${b.status}.`);
      this.refresh();
    } catch (e) {
      fill(this.el.notices, notice(`Cancel failed: ${e.message}`));
    }
  }

  async retry() {
    try {
      const nb = await api.retry(this.id);
      fill(this.el.notices, h('div', { class: 'notice ok', role: 'status' },
        'Created retry batch ', h('a', { href: `/batches/${encodeURIComponent(nb.id)}`, class: 'mono', id: 'retry-link' }, nb.id),
        ` with ${nb.request_counts.total || 'the failed'} line${nb.request_counts.total === 1 ? '' : 's'}.`));
      toast(`Retry batch ${nb.id} created.`);
    } catch (e) {
      fill(this.el.notices, notice(`Retry failed: ${e.message}`));
    }
  }

  async save(fileId, kind) {
    const path = fileId ? api.fileContentPath(fileId) : api.resultsPath(this.id, kind);
    try {
      await download(path, `${this.id}_${kind}.jsonl`);
    } catch (e) {
      fill(this.el.notices, notice(`Download failed: ${e.message}`));
    }
  }

  // ---- lookup ----

  lookupForm() {
    this.lookupInput = h('input', { id: 'lookup-id', name: 'custom_id', required: true, autocomplete: 'off', placeholder: 'req-1' });
    const form = h('form', { class: 'inline-form', 'aria-label': 'Look up a request by custom_id' },
      h('label', { for: 'lookup-id' }, 'custom_id'), this.lookupInput,
      h('button', { type: 'submit', class: 'secondary' }, 'Look up'));
    form.addEventListener('submit', (e) => { e.preventDefault(); this.lookup(this.lookupInput.value.trim()); });
    return form;
  }

  async lookup(customId) {
    if (!customId) return;
    this.lookupInput.value = customId;
    const out = this.el.lookupOut;
    fill(out, h('p', { class: 'muted' }, 'Looking up…'));
    try {
      const r = await api.requestResult(this.id, customId);
      const { status, code } = describeError(r);
      const ok = r.response && r.response.status_code >= 200 && r.response.status_code < 300;
      const text = JSON.stringify(r, null, 2);
      fill(out,
        h('p', { class: 'lookup-summary' }, h('strong', {}, customId), ` · line ${r.line} · `,
          ok ? h('span', { class: 'n-ok' }, `status ${r.response.status_code}`) : h('span', { class: 'n-bad' }, `${status ?? 'no answer'} ${code}`)),
        h('pre', { class: 'json', tabindex: '0' }, text.length > 20000 ? `${text.slice(0, 20000)}\n…` : text));
    } catch (e) {
      fill(out, notice(e.status === 404 ? e.message : `Lookup failed: ${e.message}`));
    }
  }
}

/** The status, code and message of a result line (an upstream answer or batchd's own error). */
/** A finished batch's duration (from in progress, or created, to its end) and average rate. */
function finishedStats(b, c, stat) {
  const end = endedAt(b);
  const start = b.in_progress_at ?? b.created_at;
  if (end === null || start === null || start === undefined) return [];
  const took = Math.max(0, end - start);
  const done = c.succeeded + c.failed;
  return [
    stat('Took', fmtDuration(took)),
    stat('Average', took > 0 ? `${fmtNum(done / took, 1)} req/s` : '—'),
  ];
}

function describeError(l) {
  if (l.response) {
    const err = (l.response.body && l.response.body.error) || {};
    return { status: l.response.status_code, code: err.code || err.type || `http_${l.response.status_code}`, message: err.message || '' };
  }
  const err = l.error || {};
  return { status: null, code: err.code || 'unknown', message: err.message || '' };
}
