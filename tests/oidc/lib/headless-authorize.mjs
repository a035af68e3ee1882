// Headless authorization-code + PKCE flow, driven over real HTTPS against the
// provider's own public endpoints (authorization, interaction pages, token) the
// way a browser would: follow the redirects, fill in and post the login form,
// post the consent form. Tokens handed to the tests thus come out of exactly
// the code paths a browser-based login exercises.
import * as crypto from 'node:crypto';
import * as https from 'node:https';

/**
 * Minimal HTTPS request helper. Never follows redirects: the flow needs to see
 * each Location (the last one carries the code and points at a redirect_uri
 * nobody listens on).
 */
function request(url, { method = 'GET', headers = {}, body } = {}) {
  return new Promise((resolve, reject) => {
    const req = https.request(url, {
      method,
      headers,
      // The provider only ever calls itself on 127.0.0.1 here, and the leaf
      // certificate is issued by a test CA this process is not given.
      rejectUnauthorized: false,
      agent: false,
    }, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('end', () => resolve({
        status: res.statusCode,
        headers: res.headers,
        body: Buffer.concat(chunks).toString('utf8'),
      }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.setTimeout(10_000, () => req.destroy(new Error(`${method} ${url} timed out`)));
    req.end(body);
  });
}

/**
 * Just enough of a cookie jar for oidc-provider's interaction cookies, which
 * are scoped to per-interaction paths (/interaction/<uid>, /auth/<uid>) and
 * deleted by re-setting them with an expiry in the past.
 */
export class CookieJar {
  #cookies = new Map(); // `${path}\0${name}` -> { name, value, path }

  store(setCookieHeaders = []) {
    for (const header of setCookieHeaders) {
      const [pair, ...attributes] = header.split(';').map((part) => part.trim());
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq);
      const value = pair.slice(eq + 1);
      let cookiePath = '/';
      let expired = false;
      for (const attribute of attributes) {
        const [key, attrValue = ''] = attribute.split('=');
        if (key.toLowerCase() === 'path') cookiePath = attrValue;
        if (key.toLowerCase() === 'expires' && Date.parse(attrValue) <= Date.now()) expired = true;
        if (key.toLowerCase() === 'max-age' && Number(attrValue) <= 0) expired = true;
      }
      const key = `${cookiePath}\0${name}`;
      if (expired) this.#cookies.delete(key);
      else this.#cookies.set(key, { name, value, path: cookiePath });
    }
  }

  headerFor(url) {
    const { pathname } = new URL(url);
    return [...this.#cookies.values()]
      .filter(({ path: p }) => pathname === p || pathname.startsWith(p.endsWith('/') ? p : `${p}/`))
      .map(({ name, value }) => `${name}=${value}`)
      .join('; ');
  }
}

const decodeEntities = (text) => text
  .replace(/&#(\d+);/g, (_, code) => String.fromCharCode(Number(code)))
  .replace(/&quot;/g, '"')
  .replace(/&lt;/g, '<')
  .replace(/&gt;/g, '>')
  .replace(/&amp;/g, '&');

/**
 * The POST forms of an interaction page (ours, see provider.mjs), as
 * { action, fields: { name: value } } with the action resolved against the
 * page URL. Enough HTML parsing for pages this harness renders itself.
 */
export function postForms(html, pageUrl) {
  const attribute = (tag, name) => {
    const match = new RegExp(`\\b${name}="([^"]*)"`).exec(tag);
    return match ? decodeEntities(match[1]) : undefined;
  };
  return [...html.matchAll(/(<form\b[^>]*>)([\s\S]*?)<\/form>/g)]
    .filter(([, tag]) => attribute(tag, 'method')?.toLowerCase() === 'post')
    .map(([, tag, inner]) => ({
      action: new URL(attribute(tag, 'action') ?? '', pageUrl).href,
      fields: Object.fromEntries([...inner.matchAll(/<input\b[^>]*>/g)]
        .map(([input]) => [attribute(input, 'name'), attribute(input, 'value') ?? ''])
        .filter(([name]) => name !== undefined)),
    }));
}

export class AuthorizeError extends Error {
  constructor(message, details) {
    super(message);
    this.details = details;
  }
}

/**
 * Run the whole flow and return the token endpoint's raw response.
 *
 * @param {object} o
 * @param {string} o.issuer             e.g. https://127.0.0.1:1234
 * @param {object} o.client             { client_id, client_secret, token_endpoint_auth_method, redirect_uri }
 * @param {string} o.user               account id to log in as (typed into the login form; also sent as login_hint)
 * @param {string} o.scope
 * @param {string} [o.resource]         RFC 8707 resource indicator, sent on the authorization request
 * @param {object} o.internalHeaders    headers that mark these calls as the harness's own
 * @param {object} o.routes             provider route paths { authorization, token }
 */
export async function headlessAuthorize({
  issuer, client, user, scope, resource, internalHeaders, routes,
}) {
  const codeVerifier = crypto.randomBytes(32).toString('base64url');
  const codeChallenge = crypto.hash('sha256', codeVerifier, 'base64url');
  const state = crypto.randomBytes(16).toString('base64url');

  const authorizationUrl = new URL(routes.authorization, issuer);
  authorizationUrl.search = new URLSearchParams({
    client_id: client.client_id,
    response_type: 'code',
    redirect_uri: client.redirect_uri,
    scope,
    state,
    code_challenge: codeChallenge,
    code_challenge_method: 'S256',
    login_hint: user,
    // oidc-provider (per OIDC Core 11) silently strips offline_access from
    // any authorization request whose prompt does not include consent, and
    // no offline_access means no refresh token.
    prompt: 'consent',
    ...(resource === undefined ? {} : { resource }),
  }).toString();

  // authorization -> login page -> (post login) -> authorization -> consent
  // page -> (post confirm) -> authorization -> redirect_uri, carrying cookies,
  // until the provider redirects to the client's redirect_uri (not followed).
  const jar = new CookieJar();
  let url = authorizationUrl.href;
  let submit; // the form to post instead of GETting url
  let location;
  for (let hop = 0; ; hop += 1) {
    if (hop === 20) throw new AuthorizeError('too many steps in authorization flow', { url });
    const headers = { ...internalHeaders, cookie: jar.headerFor(url) };
    let body;
    if (submit) {
      headers['content-type'] = 'application/x-www-form-urlencoded';
      body = new URLSearchParams(submit).toString();
    }
    const res = await request(url, { method: submit ? 'POST' : 'GET', headers, body });
    jar.store(res.headers['set-cookie']);
    submit = undefined;
    if (res.status === 200 && res.headers['content-type']?.startsWith('text/html')) {
      const forms = postForms(res.body, url);
      const login = forms.find((form) => 'login' in form.fields);
      const confirm = forms.find((form) => form.action.endsWith('/confirm'));
      const next = login ?? confirm;
      if (!next) {
        throw new AuthorizeError(`no login or consent form on the page at ${url}`, { body: res.body });
      }
      url = next.action;
      submit = login ? { ...login.fields, login: user } : confirm.fields;
      continue;
    }
    if (res.status < 300 || res.status >= 400 || !res.headers.location) {
      throw new AuthorizeError(`authorization flow stopped with HTTP ${res.status} at ${url}`, { body: res.body });
    }
    location = new URL(res.headers.location, url);
    if (location.href.startsWith(client.redirect_uri)) break;
    url = location.href;
  }

  const params = location.searchParams;
  if (params.get('error')) {
    throw new AuthorizeError(`authorization failed: ${params.get('error')}`, Object.fromEntries(params));
  }
  if (params.get('state') !== state) {
    throw new AuthorizeError('state mismatch in authorization response', Object.fromEntries(params));
  }

  const form = new URLSearchParams({
    grant_type: 'authorization_code',
    code: params.get('code'),
    redirect_uri: client.redirect_uri,
    code_verifier: codeVerifier,
  });
  const headers = {
    ...internalHeaders,
    'content-type': 'application/x-www-form-urlencoded',
    accept: 'application/json',
  };
  if (client.token_endpoint_auth_method === 'client_secret_post') {
    form.set('client_id', client.client_id);
    form.set('client_secret', client.client_secret);
  } else {
    // RFC 6749 section 2.3.1: form-encode before base64.
    const credentials = `${encodeURIComponent(client.client_id)}:${encodeURIComponent(client.client_secret)}`;
    headers.authorization = `Basic ${Buffer.from(credentials).toString('base64')}`;
  }

  const token = await request(new URL(routes.token, issuer), {
    method: 'POST', headers, body: form.toString(),
  });
  return { status: token.status, body: token.body };
}
