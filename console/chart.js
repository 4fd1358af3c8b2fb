// The throughput chart of a batch page: requests/s (left axis) and tokens/s (right axis) over
// time, drawn by the vendored uPlot (loaded by index.html as the global `uPlot`).

import { h, fmtNum, fmtTime } from './ui.js';

function cssVar(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

const pad = (n) => String(n).padStart(2, '0');

/** The time axis in ISO form, as everywhere else in the console: HH:MM:SS, HH:MM, or the date. */
export function isoTicks(u, vals, space, incr) {
  return vals.map((v) => {
    const d = new Date(v * 1000);
    if (incr >= 86400) return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
    const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return incr >= 60 ? hm : `${hm}:${pad(d.getSeconds())}`;
  });
}

/** Whole seconds at least: readings are a second apart at best. */
const TIME_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];

export class RateChart {
  constructor(container) {
    this.container = container;
    this.summary = h('p', { class: 'sr-only', 'aria-live': 'off' });
    this.box = h('div', { class: 'chart-box' });
    container.replaceChildren(this.box, this.summary);
    this.data = [[], [], []];
    this.plot = null;
    if (typeof window.uPlot !== 'function') {
      this.box.append(h('p', { class: 'muted' }, 'The chart library did not load.'));
      return;
    }
    this.plot = new window.uPlot(this.options(), this.data, this.box);
    this.resizer = new ResizeObserver(() => this.resize());
    this.resizer.observe(container);
  }

  options() {
    const req = cssVar('--chart-req', '#2f5bd3');
    const tok = cssVar('--chart-tok', '#d9822b');
    const axis = cssVar('--muted', '#666');
    const grid = cssVar('--line', '#ddd');
    // A reading is the average rate since the one before: a step ending at its time.
    const paths = window.uPlot.paths && window.uPlot.paths.stepped ? window.uPlot.paths.stepped({ align: -1 }) : undefined;
    const ax = (scale, side, label) => ({
      scale, side, label, stroke: axis, size: 56, labelSize: 18,
      grid: { stroke: grid, width: 1, show: side === 3 },
      ticks: { stroke: grid, width: 1 },
      values: (u, vals) => vals.map((v) => fmtNum(v, v < 10 ? 1 : 0)),
    });
    return {
      width: this.width(),
      height: 220,
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, req: { range: (u, min, max) => [0, Math.max(1, max) * 1.1] }, tok: { range: (u, min, max) => [0, Math.max(1, max) * 1.1] } },
      axes: [
        { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 }, incrs: TIME_INCRS, values: isoTicks },
        ax('req', 3, 'requests/s'),
        ax('tok', 1, 'tokens/s'),
      ],
      series: [
        { value: (u, v) => (v === null || v === undefined ? '—' : fmtTime(v)) },
        { label: 'requests/s', scale: 'req', stroke: req, width: 2, fill: `${req}22`, paths, value: (u, v) => fmtNum(v, 1), points: { show: false } },
        { label: 'tokens/s', scale: 'tok', stroke: tok, width: 2, dash: [6, 4], paths, value: (u, v) => fmtNum(v, 0), points: { show: false } },
      ],
    };
  }

  width() {
    return Math.max(260, Math.floor(this.container.clientWidth || 600));
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: this.width(), height: 220 });
  }

  /** Points: [{t (unix s), rps, tps}] in time order. */
  set(points) {
    this.data = [points.map((p) => p.t), points.map((p) => p.rps), points.map((p) => p.tps)];
    if (this.plot) this.plot.setData(this.data);
    const last = points[points.length - 1];
    this.summary.textContent = last
      ? `Latest: ${fmtNum(last.rps, 1)} requests per second, ${fmtNum(last.tps)} tokens per second.`
      : 'No throughput measured yet.';
  }

  destroy() {
    if (this.resizer) this.resizer.disconnect();
    if (this.plot) this.plot.destroy();
  }
}
