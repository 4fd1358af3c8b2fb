// The console's entry: learns from /console/config whether a key is needed, signs in, and
// routes URLs (history API) to views. A view is `render(main, params) -> cleanup`; the
// cleanup stops its streams and timers when the user leaves.

import { api, session, onUnauthorized } from './api.js';
import { h, fill } from './ui.js';
import { renderSignIn } from './views/signin.js';
import { renderBatches } from './views/batches.js';
import { renderBatch } from './views/batch.js';
import { renderNew } from './views/new.js';
import { renderFiles } from './views/files.js';

const routes = [
  [/^\/$/, renderBatches],
  [/^\/batches\/([^/]+)$/, renderBatch],
  [/^\/new$/, renderNew],
  [/^\/files$/, renderFiles],
];

const main = document.getElementById('main');
const state = { config: null, cleanup: null, seq: 0 };

export function navigate(href, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', href);
  else history.pushState(null, '', href);
  render();
}

async function render() {
  const seq = ++state.seq;
  if (state.cleanup) {
    try { state.cleanup(); } catch { /* a view's cleanup must not block the next */ }
    state.cleanup = null;
  }
  window.scrollTo(0, 0);
  // Each view draws into its own root: a view still loading when the user moves on draws
  // into a detached element, never over the next view.
  const root = h('div', { class: 'view' });
  main.replaceChildren(root);
  if (!state.config || (state.config.auth_required && !state.config.tenant)) {
    showChrome(false);
    renderSignIn(root, { config: state.config, onSignedIn: signedIn });
    return;
  }
  showChrome(true);
  const path = location.pathname;
  const found = routes.find(([re]) => re.test(path));
  if (!found) {
    fill(root, h('h1', { tabindex: '-1' }, 'Page not found'),
      h('p', {}, 'There is nothing at ', h('code', {}, path), '. ', h('a', { href: '/' }, 'Go to the batches.')));
  } else {
    const params = path.match(found[0]).slice(1).map(decodeURIComponent);
    const cleanup = await found[1](root, { params, config: state.config, navigate, query: new URLSearchParams(location.search) });
    if (seq === state.seq) state.cleanup = cleanup || null;
    else if (cleanup) cleanup();
  }
  if (seq !== state.seq) return;
  markNav(path);
  const heading = root.querySelector('h1');
  if (heading && document.activeElement === document.body) {
    heading.setAttribute('tabindex', '-1');
    heading.focus({ preventScroll: true });
  }
}

function markNav(path) {
  for (const a of document.querySelectorAll('#nav a')) {
    const target = a.getAttribute('href');
    const on = target === '/' ? path === '/' || path.startsWith('/batches/') : path.startsWith(target);
    if (on) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function showChrome(signedIn) {
  document.getElementById('nav').hidden = !signedIn;
  const who = document.getElementById('who');
  if (!signedIn) { fill(who); return; }
  const c = state.config;
  const out = c.auth_required
    ? h('button', { type: 'button', class: 'link', onclick: signOut }, 'Sign out')
    : null;
  fill(who, h('span', { class: 'tenant', title: 'Tenant' }, c.tenant), out);
}

async function signedIn(config) {
  state.config = config;
  render();
}

function signOut() {
  session.clear();
  state.config = { ...state.config, tenant: null };
  render();
}

onUnauthorized(() => {
  if (!state.config || !state.config.auth_required) return;
  session.clear();
  state.config = { ...state.config, tenant: null, refused: true };
  render();
});

// Same-origin links move within the app instead of loading a page.
document.addEventListener('click', (e) => {
  if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const a = e.target.closest('a[href]');
  if (!a || a.target || a.hasAttribute('download')) return;
  const href = a.getAttribute('href');
  if (!href.startsWith('/') || href.startsWith('//') || href.startsWith('/v1/') || href.startsWith('/assets/')) return;
  e.preventDefault();
  navigate(href);
});
window.addEventListener('popstate', render);

async function boot() {
  try {
    state.config = await api.config(session.key);
  } catch (e) {
    if (e.status === 401) {
      session.clear();
      state.config = await api.config(null);
    } else {
      fill(main, h('h1', {}, 'batchd'), h('p', { role: 'alert' }, `The server cannot be reached: ${e.message}`));
      return;
    }
  }
  render();
}

boot();
