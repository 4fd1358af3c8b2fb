// Sign-in: asks for an API key when the server has tenants, checks it against
// /console/config (which names the key's tenant or refuses it with 401), and keeps it in
// sessionStorage for this tab only.

import { api, session } from '../api.js';
import { h, fill, notice } from '../ui.js';

export function renderSignIn(main, { config, onSignedIn }) {
  const input = h('input', {
    id: 'api-key', name: 'api-key', type: 'password', required: true,
    autocomplete: 'off', spellcheck: 'false', 'aria-describedby': 'api-key-help',
  });
  const status = h('div', { class: 'form-status' });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const form = h('form', { class: 'card signin', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in to batchd'),
    h('label', { for: 'api-key' }, 'API key'),
    input,
    h('p', { id: 'api-key-help', class: 'muted small' },
      'The key you use with the API (Authorization: Bearer …). It is kept for this browser tab only.'),
    status,
    h('div', { class: 'actions' }, submit));
  if (config && config.refused) fill(status, notice('The server refused the key. Sign in again.'));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    submit.disabled = true;
    fill(status, h('p', { class: 'muted' }, 'Checking the key…'));
    try {
      const c = await api.config(key);
      session.set(key);
      onSignedIn(c);
    } catch (err) {
      const msg = err.status === 401 ? 'That key is not valid on this server.' : `Sign-in failed: ${err.message}`;
      fill(status, notice(msg));
      input.select();
      input.focus();
    } finally {
      submit.disabled = false;
    }
  });
  if (!config) {
    fill(main, notice('The server cannot be reached.'));
    return;
  }
  fill(main, form);
  input.focus();
}
