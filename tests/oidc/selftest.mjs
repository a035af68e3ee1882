// Self-test of the test provider: `npm test --prefix tests/oidc`.
// Starts provider.mjs as the Rust tests do (fresh test CA from openssl,
// state dir, --port 0, then a SIGKILL + restart on the same port) and checks
// the contract documented in README.md.
import { spawn, execFileSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as os from 'node:os';
import * as path from 'node:path';
import { once } from 'node:events';
import { after, before, test } from 'node:test';

import { CookieJar, postForms } from './lib/headless-authorize.mjs';

const here = path.dirname(new URL(import.meta.url).pathname);
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'oidc-selftest-'));
const stateDir = path.join(tmp, 'state');
// Registered with --redirect-uri; never contacted (port 9 is discard).
const CALLBACK = 'http://127.0.0.1:9/api/v1/auth/tool/callback';

function makePki() {
  const openssl = (...args) => execFileSync('openssl', args, { cwd: tmp, stdio: ['ignore', 'ignore', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '1', '-subj', '/CN=oidc selftest CA');
  openssl('req', ...ec, '-keyout', 'leaf.key', '-out', 'leaf.csr', '-subj', '/CN=127.0.0.1');
  fs.writeFileSync(path.join(tmp, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n');
  openssl('x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-out', 'leaf.pem', '-days', '1', '-extfile', 'ext.cnf');
  return fs.readFileSync(path.join(tmp, 'ca.pem'));
}

let ca;
let child;
let ready;

async function startProvider(port) {
  child = spawn(process.execPath, [
    path.join(here, 'provider.mjs'),
    '--port', String(port),
    '--cert', path.join(tmp, 'leaf.pem'),
    '--key', path.join(tmp, 'leaf.key'),
    '--state-dir', stateDir,
    '--redirect-uri', CALLBACK,
  ], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (chunk) => { out += chunk; });
  while (!out.includes('\n')) {
    const [code] = await Promise.race([once(child, 'exit'), once(child.stdout, 'data')]);
    if (typeof code === 'number') throw new Error(`provider exited with ${code}`);
  }
  ready = JSON.parse(out);
  return child;
}

function call(method, url, { form, json, basic, timeoutMs = 10_000 } = {}) {
  const headers = { accept: 'application/json' };
  let body;
  if (form) {
    headers['content-type'] = 'application/x-www-form-urlencoded';
    body = new URLSearchParams(form).toString();
  }
  if (json) {
    headers['content-type'] = 'application/json';
    body = JSON.stringify(json);
  }
  if (basic) {
    headers.authorization = `Basic ${Buffer.from(`${basic.id}:${basic.secret}`).toString('base64')}`;
  }
  return new Promise((resolve, reject) => {
    const req = https.request(url, { method, headers, ca, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { text += chunk; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: text ? JSON.parse(text) : undefined }));
    });
    req.setTimeout(timeoutMs, () => req.destroy(Object.assign(new Error('timeout'), { code: 'TIMEOUT' })));
    req.on('error', reject);
    req.end(body);
  });
}

/** A cookie-keeping browser that never follows redirects by itself. */
function browser() {
  const jar = new CookieJar();
  return (method, url, form) => new Promise((resolve, reject) => {
    const headers = { cookie: jar.headerFor(url) };
    const body = form && new URLSearchParams(form).toString();
    if (form) headers['content-type'] = 'application/x-www-form-urlencoded';
    const req = https.request(url, { method, headers, ca, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { text += chunk; });
      res.on('end', () => {
        jar.store(res.headers['set-cookie']);
        const location = res.headers.location && new URL(res.headers.location, url);
        resolve({ status: res.statusCode, location, body: text });
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** GETs `url` and same-origin redirects until a page (200) or a redirect out of the provider. */
async function follow(browse, url) {
  for (let hop = 0; hop < 10; hop += 1) {
    const res = await browse('GET', url);
    if (res.status === 200) return { page: res.body, url };
    assert.equal(res.status, 303, `GET ${url}: ${res.status} ${res.body}`);
    if (res.location.origin !== ready.issuer) return { exit: res.location };
    url = res.location.href;
  }
  throw new Error('too many redirects');
}

function authorizationUrl(params = {}) {
  const verifier = crypto.randomBytes(32).toString('base64url');
  const state = crypto.randomBytes(8).toString('hex');
  const url = new URL(ready.authorization_endpoint);
  url.search = new URLSearchParams({
    client_id: ready.client_id,
    response_type: 'code',
    redirect_uri: CALLBACK,
    scope: 'openid offline_access read:jira-work',
    state,
    code_challenge: crypto.hash('sha256', verifier, 'base64url'),
    code_challenge_method: 'S256',
    prompt: 'consent',
    ...params,
  }).toString();
  return { url: url.href, verifier, state };
}

/** Logs in as `user` through the login form; returns the consent page. */
async function logIn(browse, authorization, user) {
  const login = await follow(browse, authorization.url);
  const [form, ...others] = postForms(login.page, login.url);
  assert.equal(others.length, 0, login.page);
  assert.match(form.action, /\/interaction\/[^/]+\/login$/);
  assert.ok('login' in form.fields, login.page);
  const posted = await browse('POST', form.action, { ...form.fields, login: user });
  assert.equal(posted.status, 303, posted.body);
  const consent = await follow(browse, posted.location.href);
  assert.ok(consent.page, 'consent page');
  return consent;
}

const basic = () => ({ id: ready.client_id, secret: ready.client_secret });
const authorize = (json = {}) => call('POST', `${ready.issuer}/test/authorize`, { json });
const refresh = (refreshToken) => call('POST', ready.token_endpoint, {
  basic: basic(), form: { grant_type: 'refresh_token', refresh_token: refreshToken },
});
const stats = async () => (await call('GET', `${ready.issuer}/test/stats`)).body;
const fail = (json) => call('POST', `${ready.issuer}/test/fail`, { json });

before(async () => {
  ca = makePki();
  await startProvider(0);
});

after(async () => {
  if (child && child.exitCode === null) {
    child.kill('SIGKILL');
    await once(child, 'exit');
  }
  fs.rmSync(tmp, { recursive: true, force: true });
});

test('ready line has the pinned shape', () => {
  assert.equal(ready.issuer, `https://127.0.0.1:${ready.port}`);
  assert.equal(ready.token_endpoint, `${ready.issuer}/token`);
  assert.equal(ready.client_id, 'vault-test');
  for (const key of ['revocation_endpoint', 'introspection_endpoint', 'authorization_endpoint', 'client_secret']) {
    assert.equal(typeof ready[key], 'string', key);
  }
});

// Shared across the sequential tests below.
let latest;

test('/test/authorize mints tokens without touching the counters', async () => {
  const res = await authorize({ user: 'alice', scope: 'openid offline_access read:jira-work' });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.ok(res.body.access_token);
  assert.ok(res.body.refresh_token);
  assert.equal(res.body.token_type, 'Bearer');
  assert.equal(res.body.expires_in, 3600);
  assert.deepEqual(new Set(res.body.scope.split(' ')), new Set(['openid', 'offline_access', 'read:jira-work']));
  assert.deepEqual(await stats(), {
    token_calls: 0, refresh_calls: 0, revocation_calls: 0, introspection_calls: 0,
  });
  latest = res.body;
});

test('no offline_access, no refresh token', async () => {
  const res = await authorize({ scope: 'openid read:jira-work' });
  assert.equal(res.status, 200);
  assert.ok(res.body.access_token);
  assert.equal(res.body.refresh_token, undefined);
});

test('refresh rotates; the old refresh token is then invalid_grant', async () => {
  const first = latest;
  const res = await refresh(first.refresh_token);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.notEqual(res.body.refresh_token, first.refresh_token);
  assert.notEqual(res.body.access_token, first.access_token);

  const introspection = await call('POST', ready.introspection_endpoint, {
    basic: basic(), form: { token: res.body.access_token },
  });
  assert.equal(introspection.status, 200);
  assert.equal(introspection.body.active, true);
  assert.equal(introspection.body.sub, 'alice');
  assert.equal(introspection.body.client_id, 'vault-test');

  const reuse = await refresh(first.refresh_token);
  assert.equal(reuse.status, 400);
  assert.equal(reuse.body.error, 'invalid_grant');

  // Reuse detection: replaying a consumed refresh token revokes the grant,
  // so the newest refresh token is dead too.
  const newest = await refresh(res.body.refresh_token);
  assert.equal(newest.body.error, 'invalid_grant');

  assert.deepEqual(await stats(), {
    token_calls: 3, refresh_calls: 3, revocation_calls: 0, introspection_calls: 1,
  });
});

test('revoking a refresh token makes the next refresh invalid_grant', async () => {
  const { body: tokens } = await authorize({ user: 'bob' });
  const revoked = await call('POST', ready.revocation_endpoint, {
    basic: basic(), form: { token: tokens.refresh_token, token_type_hint: 'refresh_token' },
  });
  assert.equal(revoked.status, 200);
  const res = await refresh(tokens.refresh_token);
  assert.equal(res.body.error, 'invalid_grant');
  const introspection = await call('POST', ready.introspection_endpoint, {
    basic: basic(), form: { token: tokens.access_token },
  });
  assert.equal(introspection.body.active, false, 'grant revocation takes the access token with it');
  const s = await stats();
  assert.equal(s.revocation_calls, 1);
  assert.equal(s.introspection_calls, 2);
});

test('client_secret_post client works', async () => {
  const { body: tokens } = await authorize({ client_id: 'vault-test-post' });
  const res = await call('POST', ready.token_endpoint, {
    form: {
      grant_type: 'refresh_token',
      refresh_token: tokens.refresh_token,
      client_id: ready.post_client_id,
      client_secret: ready.post_client_secret,
    },
  });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.ok(res.body.refresh_token);
});

test('wrong client credentials are counted and rejected', async () => {
  const baseline = await stats();
  const res = await call('POST', ready.token_endpoint, {
    basic: { id: 'vault-test', secret: 'nope' },
    form: { grant_type: 'refresh_token', refresh_token: 'whatever' },
  });
  assert.equal(res.status, 401);
  assert.equal(res.body.error, 'invalid_client');
  const s = await stats();
  assert.equal(s.token_calls, baseline.token_calls + 1);
  assert.equal(s.refresh_calls, baseline.refresh_calls + 1);
});

test('each client must use its registered authentication method', async () => {
  const baseline = await stats();
  const postForBasicClient = await call('POST', ready.token_endpoint, {
    form: {
      grant_type: 'refresh_token',
      refresh_token: 'whatever',
      client_id: ready.client_id,
      client_secret: ready.client_secret,
    },
  });
  assert.equal(postForBasicClient.status, 401);
  assert.equal(postForBasicClient.body.error, 'invalid_client');
  const basicForPostClient = await call('POST', ready.introspection_endpoint, {
    basic: { id: ready.post_client_id, secret: ready.post_client_secret },
    form: { token: 'whatever' },
  });
  assert.equal(basicForPostClient.status, 401);
  assert.equal(basicForPostClient.body.error, 'invalid_client');
  const s = await stats();
  assert.equal(s.token_calls, baseline.token_calls + 1);
  assert.equal(s.refresh_calls, baseline.refresh_calls + 1);
  assert.equal(s.introspection_calls, baseline.introspection_calls + 1);
});

test('state survives SIGKILL + restart on the same port', async () => {
  await call('POST', `${ready.issuer}/test/reset-stats`);
  const { body: live } = await authorize({ user: 'carol' });
  const rotated = (await refresh(live.refresh_token)).body;
  const { body: dead } = await authorize({ user: 'dave' });
  await call('POST', ready.revocation_endpoint, { basic: basic(), form: { token: dead.refresh_token } });
  // A separate grant for the reuse check: replaying a consumed token revokes
  // its whole grant, which would take `rotated` down with it.
  const { body: replayed } = await authorize({ user: 'erin' });
  assert.equal((await refresh(replayed.refresh_token)).status, 200);
  const statsBefore = await stats();

  const { port } = ready;
  child.kill('SIGKILL');
  await once(child, 'exit');
  await startProvider(port);
  assert.equal(ready.port, port);

  assert.deepEqual(await stats(), statsBefore);
  assert.equal((await refresh(replayed.refresh_token)).body.error, 'invalid_grant', 'consumed stays consumed');
  assert.equal((await refresh(dead.refresh_token)).body.error, 'invalid_grant', 'revoked stays revoked');
  const introspectBefore = await call('POST', ready.introspection_endpoint, {
    basic: basic(), form: { token: rotated.access_token },
  });
  assert.equal(introspectBefore.body.active, true, 'access token from before the crash');

  const res = await refresh(rotated.refresh_token);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  const introspection = await call('POST', ready.introspection_endpoint, {
    basic: basic(), form: { token: res.body.access_token },
  });
  assert.equal(introspection.body.active, true);
  latest = res.body;
});

test('fault injection: 500, 429, timeout, none', async () => {
  await call('POST', `${ready.issuer}/test/reset-stats`);
  assert.equal((await fail({ mode: '500', count: 2 })).status, 200);
  for (let i = 0; i < 2; i += 1) {
    const res = await refresh(latest.refresh_token);
    assert.equal(res.status, 500);
  }
  // /test/authorize is exempt from faults while one is armed.
  await fail({ mode: '500', count: 1 });
  assert.equal((await authorize()).status, 200);
  await fail({ mode: 'none' });

  const ok = await refresh(latest.refresh_token);
  assert.equal(ok.status, 200, 'faulted requests never reached the provider');

  await fail({ mode: '429', count: 1 });
  const limited = await refresh(ok.body.refresh_token);
  assert.equal(limited.status, 429);
  assert.equal(limited.headers['retry-after'], '2');

  await fail({ mode: 'timeout', count: 1 });
  const hung = await call('POST', ready.token_endpoint, {
    basic: basic(),
    form: { grant_type: 'refresh_token', refresh_token: ok.body.refresh_token },
    timeoutMs: 1000,
  }).catch((err) => err);
  assert.equal(hung.code, 'TIMEOUT');
  const next = await refresh(ok.body.refresh_token);
  assert.equal(next.status, 200, 'only one request hangs');

  assert.deepEqual(await stats(), {
    token_calls: 6, refresh_calls: 6, revocation_calls: 0, introspection_calls: 0,
  });
});

test('faults can target the revocation endpoint', async () => {
  const { body: tokens } = await authorize();
  const baseline = await stats();
  await fail({ mode: '500', count: 1, endpoint: 'revocation' });
  const form = { token: tokens.refresh_token };
  assert.equal((await call('POST', ready.revocation_endpoint, { basic: basic(), form })).status, 500);
  assert.equal((await refresh(tokens.refresh_token)).status, 200, 'not revoked, token endpoint unaffected');
  const s = await stats();
  assert.equal(s.revocation_calls, baseline.revocation_calls + 1);
});

test('bad /test/fail input is rejected', async () => {
  assert.equal((await fail({ mode: 'explode' })).status, 400);
});

test('a browser logs in and consents through the interaction forms', async () => {
  const browse = browser();
  const authorization = authorizationUrl();
  const consent = await logIn(browse, authorization, 'bob');
  assert.match(consent.page, /<b id="account">bob<\/b>/);
  assert.match(consent.page, /read:jira-work/);
  const forms = postForms(consent.page, consent.url);
  assert.deepEqual(forms.map((f) => f.action.split('/').pop()), ['confirm', 'abort']);
  const confirmed = await browse('POST', forms[0].action, forms[0].fields);
  assert.equal(confirmed.status, 303, confirmed.body);
  const { exit } = await follow(browse, confirmed.location.href);

  assert.equal(`${exit.origin}${exit.pathname}`, CALLBACK, 'an http loopback redirect_uri is accepted');
  assert.equal(exit.searchParams.get('state'), authorization.state);
  assert.equal(exit.searchParams.get('iss'), ready.issuer, 'RFC 9207');
  const code = exit.searchParams.get('code');
  assert.ok(code);

  const token = await call('POST', ready.token_endpoint, {
    basic: basic(),
    form: {
      grant_type: 'authorization_code', code, redirect_uri: CALLBACK, code_verifier: authorization.verifier,
    },
  });
  assert.equal(token.status, 200, JSON.stringify(token.body));
  assert.ok(token.body.refresh_token, 'offline_access granted');
  const introspection = await call('POST', ready.introspection_endpoint, {
    basic: basic(), form: { token: token.body.access_token },
  });
  assert.equal(introspection.body.active, true);
  assert.equal(introspection.body.sub, 'bob', 'the user typed into the login form');
});

test('denying consent redirects with error=access_denied', async () => {
  const browse = browser();
  const authorization = authorizationUrl();
  const consent = await logIn(browse, authorization, 'alice');
  const abort = postForms(consent.page, consent.url).find((f) => f.action.endsWith('/abort'));
  const aborted = await browse('POST', abort.action, abort.fields);
  assert.equal(aborted.status, 303, aborted.body);
  const { exit } = await follow(browse, aborted.location.href);
  assert.equal(`${exit.origin}${exit.pathname}`, CALLBACK);
  assert.equal(exit.searchParams.get('error'), 'access_denied');
  assert.equal(exit.searchParams.get('error_description'), 'End-User aborted interaction');
  assert.equal(exit.searchParams.get('state'), authorization.state);
  assert.equal(exit.searchParams.get('iss'), ready.issuer, 'RFC 9207 covers error responses too');
  assert.equal(exit.searchParams.get('code'), null);
});

test('interaction pages escape what they show', async () => {
  const browse = browser();
  const login = await follow(browse, authorizationUrl({ login_hint: '"><script>x</script>' }).url);
  assert.doesNotMatch(login.page, /<script>/);
  assert.equal(postForms(login.page, login.url)[0].fields.login, '"><script>x</script>');
});

test('a form posted without its interaction cookie is refused', async () => {
  const login = await follow(browser(), authorizationUrl().url);
  const [form] = postForms(login.page, login.url);
  const res = await browser()('POST', form.action, { login: 'mallory' });
  assert.equal(res.status, 400, res.body);
});

test('discovery advertises the iss authorization response parameter', async () => {
  const res = await call('GET', `${ready.issuer}/.well-known/openid-configuration`);
  assert.equal(res.body.authorization_response_iss_parameter_supported, true);
});

// A second provider with the MCP registration features, in its own state dir.
// --client-id-metadata fetches documents over HTTPS from loopback, trusting
// the test CA through NODE_EXTRA_CA_CERTS, as the Rust harness spawns it.
let mcp;
let mcpReady;
let documentServer;

async function startMcpProvider() {
  mcp = spawn(process.execPath, [
    path.join(here, 'provider.mjs'),
    '--port', '0',
    '--cert', path.join(tmp, 'leaf.pem'),
    '--key', path.join(tmp, 'leaf.key'),
    '--state-dir', path.join(tmp, 'mcp-state'),
    '--redirect-uri', CALLBACK,
    '--registration',
    '--registration-secret-ttl', '600',
    '--client-id-metadata',
  ], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, NODE_EXTRA_CA_CERTS: path.join(tmp, 'ca.pem') },
  });
  let out = '';
  mcp.stdout.setEncoding('utf8');
  mcp.stdout.on('data', (chunk) => { out += chunk; });
  while (!out.includes('\n')) {
    const [code] = await Promise.race([once(mcp, 'exit'), once(mcp.stdout, 'data')]);
    if (typeof code === 'number') throw new Error(`provider exited with ${code}`);
  }
  mcpReady = JSON.parse(out);
}

after(async () => {
  documentServer?.close();
  if (mcp && mcp.exitCode === null) {
    mcp.kill('SIGKILL');
    await once(mcp, 'exit');
  }
});

const register = (json) => call('POST', mcpReady.registration_endpoint, { json });
const REGISTRATION = {
  redirect_uris: [CALLBACK],
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
  client_name: 'credential-vault',
};

test('registration answers a confidential client whose secret expires after the ttl', async () => {
  await startMcpProvider();
  const before = Math.floor(Date.now() / 1000);
  const res = await register(REGISTRATION);
  assert.equal(res.status, 201, JSON.stringify(res.body));
  assert.equal(typeof res.body.client_id, 'string');
  assert.equal(typeof res.body.client_secret, 'string');
  assert.equal(res.body.token_endpoint_auth_method, 'client_secret_basic');
  assert.deepEqual(res.body.redirect_uris, [CALLBACK]);
  assert.ok(res.body.client_secret_expires_at >= before + 600, JSON.stringify(res.body));
  assert.ok(res.body.client_secret_expires_at <= Math.floor(Date.now() / 1000) + 600);
  assert.equal(res.body.x_test_secret_ttl_hook, undefined);
  const pub = await register({ ...REGISTRATION, token_endpoint_auth_method: 'none' });
  assert.equal(pub.status, 201, JSON.stringify(pub.body));
  assert.equal(pub.body.client_secret, undefined);
  assert.equal(pub.body.client_secret_expires_at, undefined);
  assert.equal((await call('GET', `${mcpReady.issuer}/test/stats`)).body.registration_calls, 2);
});

test('a deleted registration is invalid_client at the token endpoint', async () => {
  const { body: client } = await register(REGISTRATION);
  const tokenCall = () => call('POST', `${mcpReady.issuer}/token`, {
    basic: { id: client.client_id, secret: client.client_secret },
    form: { grant_type: 'refresh_token', refresh_token: 'not-a-refresh-token' },
  });
  // Authenticated, so the failure is about the grant.
  const before = await tokenCall();
  assert.equal(before.body.error, 'invalid_grant', JSON.stringify(before.body));
  const deleted = await call('POST', `${mcpReady.issuer}/test/clients/delete`, {
    form: { client_id: client.client_id },
  });
  assert.equal(deleted.status, 200, JSON.stringify(deleted.body));
  const afterDelete = await tokenCall();
  assert.equal(afterDelete.status, 401);
  assert.equal(afterDelete.body.error, 'invalid_client');
  const again = await call('POST', `${mcpReady.issuer}/test/clients/delete`, {
    json: { client_id: client.client_id },
  });
  assert.equal(again.status, 404);
  const fixed = await call('POST', `${mcpReady.issuer}/test/clients/delete`, {
    json: { client_id: 'vault-test' },
  });
  assert.equal(fixed.status, 400);
});

test('with --client-id-metadata a loopback https metadata document is fetched', async () => {
  const discovery = await call('GET', `${mcpReady.issuer}/.well-known/openid-configuration`);
  assert.equal(discovery.body.client_id_metadata_document_supported, true);

  documentServer = https.createServer({
    cert: fs.readFileSync(path.join(tmp, 'leaf.pem')),
    key: fs.readFileSync(path.join(tmp, 'leaf.key')),
  }, (req, res) => {
    const { port } = documentServer.address();
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({
      client_id: `https://127.0.0.1:${port}/client.json`,
      client_name: 'credential-vault',
      redirect_uris: [`https://127.0.0.1:${port}/callback`],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'none',
    }));
  });
  await new Promise((resolve) => { documentServer.listen(0, '127.0.0.1', resolve); });
  const { port } = documentServer.address();
  const clientId = `https://127.0.0.1:${port}/client.json`;
  const verifier = crypto.randomBytes(32).toString('base64url');
  const url = new URL(`${mcpReady.issuer}/auth`);
  url.search = new URLSearchParams({
    client_id: clientId,
    response_type: 'code',
    redirect_uri: `https://127.0.0.1:${port}/callback`,
    scope: 'openid',
    state: 'x',
    code_challenge: crypto.hash('sha256', verifier, 'base64url'),
    code_challenge_method: 'S256',
  }).toString();
  // The client resolved: the provider moves on to its login page.
  const res = await browser()('GET', url.href);
  assert.equal(res.status, 303, res.body);
  assert.match(res.location.pathname, /^\/interaction\//, res.location.href);
  assert.equal((await call('GET', `${mcpReady.issuer}/test/stats`)).body.cimd_fetches, 1);
});

test('SIGTERM exits cleanly', async () => {
  child.kill('SIGTERM');
  const [code] = await once(child, 'exit');
  assert.equal(code, 0);
});
