#!/usr/bin/env node
// A real OAuth 2.0 authorization server (panva/oidc-provider) for the vault's
// integration tests: the vault refreshes, introspects and revokes tokens
// against it exactly as it would against a production provider, and the
// tests use the /test/* side door to mint tokens, count calls and inject
// faults. See README.md for the CLI and endpoint contract.
import './lib/stdout-guard.mjs';

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as path from 'node:path';
import * as querystring from 'node:querystring';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

import { loadOrCreateJson, readJson, writeJsonAtomic } from './lib/atomic-json.mjs';
import { createFileAdapter } from './lib/file-adapter.mjs';
import { AuthorizeError, headlessAuthorize } from './lib/headless-authorize.mjs';

// The redirect URI /test/authorize uses; never contacted. Tests that drive
// the authorization endpoint themselves register theirs with --redirect-uri.
const REDIRECT_URI = 'https://127.0.0.1/callback';

const CLIENTS = [
  {
    client_id: 'vault-test',
    client_secret: 'vault-test-secret-0123456789abcdef',
    token_endpoint_auth_method: 'client_secret_basic',
  },
  {
    client_id: 'vault-test-post',
    client_secret: 'vault-test-post-secret-0123456789abcdef',
    token_endpoint_auth_method: 'client_secret_post',
  },
].map((client) => ({
  ...client,
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
}));

// --caller-tokens: confidential clients that get client-credentials JWT
// access tokens for the vault itself (the recipe of docs/production.md). Each
// is a service identity of its own, as in an identity provider: the token's
// `sub` is its client_id, and `agent_id` (when set) is the extra claim the
// vault reads as the agent. `vault-caller-no-agent` stands for a client whose
// claim mapping was forgotten.
const CALLER_CLIENTS = [
  {
    client_id: 'vault-gateway',
    client_secret: 'vault-gateway-secret-0123456789abcdef',
    agent_id: 'support-agent',
  },
  {
    client_id: 'vault-caller-no-agent',
    client_secret: 'vault-caller-no-agent-secret-0123456789abcdef',
  },
].map(({ agent_id: agentId, ...client }) => ({
  client: {
    ...client,
    token_endpoint_auth_method: 'client_secret_basic',
    // What the client may ask for: never vault:admin, which the vault's
    // operators grant to a separate client of their own.
    scope: 'vault:store',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
  },
  agentId,
}));

// The resource indicator (RFC 8707) that names the vault, and the audience
// its JWT access tokens carry (the vault's default VAULT_JWT_AUDIENCE).
const VAULT_RESOURCE = 'urn:credential-vault';
const VAULT_AUDIENCE = 'credential-vault';
const VAULT_SCOPES = ['vault:store', 'vault:admin'];
const AGENT_CLAIM = 'agent_id';

// Custom scopes stand in for a real provider's API scopes. They must be
// declared here: oidc-provider silently drops scopes it does not know.
const SCOPES = ['openid', 'offline_access', 'read:jira-work', 'write:jira-work'];

const DEFAULT_USER = 'alice';
const DEFAULT_SCOPE = 'openid offline_access read:jira-work';

// Pinned so the counting middleware can recognise the endpoints by path.
const ROUTES = {
  authorization: '/auth',
  token: '/token',
  revocation: '/token/revocation',
  introspection: '/token/introspection',
  registration: '/reg',
};

// POST path -> which counter/fault bucket it belongs to.
const COUNTED_ENDPOINTS = new Map([
  [ROUTES.token, 'token'],
  [ROUTES.revocation, 'revocation'],
  [ROUTES.introspection, 'introspection'],
  [ROUTES.registration, 'registration'],
]);

const INJECTED_HANG_MS = 30_000;

// The extra client metadata property whose validator implements
// --registration-secret-ttl (see the provider configuration).
const SECRET_TTL_HOOK = 'x_test_secret_ttl_hook';

// ---------------------------------------------------------------------------
// Command line

const USAGE = 'usage: node provider.mjs --port PORT --cert CERT.pem --key KEY.pem --state-dir DIR'
  + ' [--access-ttl SECONDS] [--refresh-ttl SECONDS] [--redirect-uri URI]... [--registration]'
  + ' [--registration-secret-ttl SECONDS] [--client-id-metadata] [--resource] [--strict-resource]'
  + ' [--caller-tokens]';

class UsageError extends Error {}

function parseCommandLine() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        port: { type: 'string' },
        cert: { type: 'string' },
        key: { type: 'string' },
        'state-dir': { type: 'string' },
        'access-ttl': { type: 'string', default: '3600' },
        'refresh-ttl': { type: 'string', default: '86400' },
        'redirect-uri': { type: 'string', multiple: true, default: [] },
        registration: { type: 'boolean', default: false },
        'registration-secret-ttl': { type: 'string' },
        'client-id-metadata': { type: 'boolean', default: false },
        resource: { type: 'boolean', default: false },
        'strict-resource': { type: 'boolean', default: false },
        'caller-tokens': { type: 'boolean', default: false },
      },
      strict: true,
    }));
  } catch (err) {
    throw new UsageError(err.message);
  }
  for (const required of ['port', 'cert', 'key', 'state-dir']) {
    if (values[required] === undefined) {
      throw new UsageError(`missing required option --${required}`);
    }
  }
  const integer = (name, min) => {
    const n = Number(values[name]);
    if (!Number.isInteger(n) || n < min) throw new UsageError(`--${name} must be an integer >= ${min}`);
    return n;
  };
  for (const uri of values['redirect-uri']) {
    const parsed = URL.parse(uri);
    if (!parsed || !['http:', 'https:'].includes(parsed.protocol) || parsed.hash) {
      throw new UsageError(`--redirect-uri must be an http(s) URI without a fragment: ${uri}`);
    }
  }
  if (values['strict-resource'] && !values.resource) {
    throw new UsageError('--strict-resource needs --resource');
  }
  if (values['registration-secret-ttl'] !== undefined && !values.registration) {
    throw new UsageError('--registration-secret-ttl needs --registration');
  }
  return {
    port: integer('port', 0),
    cert: fs.readFileSync(values.cert),
    key: fs.readFileSync(values.key),
    stateDir: path.resolve(values['state-dir']),
    accessTtl: integer('access-ttl', 1),
    refreshTtl: integer('refresh-ttl', 1),
    redirectUris: values['redirect-uri'],
    registration: values.registration,
    registrationSecretTtl: values['registration-secret-ttl'] === undefined
      ? undefined : integer('registration-secret-ttl', 1),
    clientIdMetadata: values['client-id-metadata'],
    resource: values.resource,
    strictResource: values['strict-resource'],
    callerTokens: values['caller-tokens'],
  };
}

// ---------------------------------------------------------------------------
// Persistent secrets. Both must survive restarts: the signing key because
// id_tokens issued before a restart must still verify against the JWKS, and
// the cookie keys so that nothing signed before a restart is suddenly forged.

function loadSigningJwks(stateDir) {
  return loadOrCreateJson(path.join(stateDir, 'jwks.json'), () => {
    // RSA because clients default to RS256 for id_token signatures.
    const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
    const jwk = privateKey.export({ format: 'jwk' });
    return { keys: [{ ...jwk, kid: crypto.randomBytes(8).toString('hex'), use: 'sig' }] };
  });
}

function loadCookieKeys(stateDir) {
  return loadOrCreateJson(path.join(stateDir, 'cookie-keys.json'), () => [
    crypto.randomBytes(32).toString('base64url'),
  ]);
}

// ---------------------------------------------------------------------------
// Call counters, persisted so that a test can assert totals across a
// provider restart.

class Stats {
  static ZERO = Object.freeze({
    token_calls: 0, refresh_calls: 0, revocation_calls: 0, introspection_calls: 0,
  });

  // registration_calls only exists with --registration, and cimd_fetches
  // with --client-id-metadata, so that the counters of a provider without
  // them keep their historical shape.
  constructor(file, { registration = false, clientIdMetadata = false } = {}) {
    this.file = file;
    this.zero = {
      ...Stats.ZERO,
      ...(registration ? { registration_calls: 0 } : {}),
      ...(clientIdMetadata ? { cimd_fetches: 0 } : {}),
    };
    this.counts = { ...this.zero, ...readJson(file, {}) };
  }

  /** One client ID metadata document about to be fetched (not served from cache). */
  recordCimdFetch() {
    if (!('cimd_fetches' in this.counts)) return;
    this.counts.cimd_fetches += 1;
    writeJsonAtomic(this.file, this.counts);
  }

  record(endpoint, grantType) {
    if (!(`${endpoint}_calls` in this.counts)) return;
    this.counts[`${endpoint}_calls`] += 1;
    if (endpoint === 'token' && grantType === 'refresh_token') this.counts.refresh_calls += 1;
    writeJsonAtomic(this.file, this.counts);
  }

  reset() {
    this.counts = { ...this.zero };
    writeJsonAtomic(this.file, this.counts);
  }
}

// ---------------------------------------------------------------------------
// Fault injection: "the next N requests to <endpoint> fail like <mode>".
// Deliberately in memory only: a restart is itself the outage a test
// simulates, and stale faults surviving it would be surprising.

class Faults {
  static MODES = new Set(['none', '500', '429', 'timeout']);

  #pending = new Map(); // endpoint -> { mode, remaining }

  set({ mode, count = 1, endpoint = 'token' }) {
    if (!Faults.MODES.has(mode)) throw new Error(`mode must be one of ${[...Faults.MODES].join(', ')}`);
    if (![...COUNTED_ENDPOINTS.values()].includes(endpoint)) throw new Error(`unknown endpoint ${endpoint}`);
    if (mode === 'none') {
      this.#pending.delete(endpoint);
      return;
    }
    if (!Number.isInteger(count) || count < 0) throw new Error('count must be a non-negative integer');
    this.#pending.set(endpoint, { mode, remaining: count });
  }

  /** The fault mode to apply to this request, if any (consumes one). */
  take(endpoint) {
    const fault = this.#pending.get(endpoint);
    if (!fault || fault.remaining === 0) return undefined;
    fault.remaining -= 1;
    return fault.mode;
  }
}

// ---------------------------------------------------------------------------
// Request helpers for the code that runs in front of oidc-provider's own
// routing and body parsing (the /test/* endpoints and the counting layer).

const MAX_BODY_BYTES = 64 * 1024;

async function readRawBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      const err = new Error('request body too large');
      err.status = 413;
      err.expose = true;
      throw err;
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

/**
 * oidc-provider accepts client_secret_basic and client_secret_post
 * interchangeably for any client with a secret. Real providers often do not,
 * and the vault must use the method configured for the provider, so enforce
 * each client's registered token_endpoint_auth_method here. Returns an error
 * description, or undefined when the request is fine or not ours to judge
 * (missing/duplicate credentials, unknown clients: oidc-provider handles those).
 */
function authMethodMismatch(ctx, form) {
  const [scheme, encoded] = (ctx.get('authorization') || '').split(' ');
  let clientId = form.client_id;
  let method;
  if (scheme?.toLowerCase() === 'basic' && encoded) {
    const decoded = Buffer.from(encoded, 'base64').toString('utf8');
    try {
      clientId = decodeURIComponent(decoded.slice(0, decoded.indexOf(':')).replace(/\+/g, '%20'));
    } catch {
      return undefined;
    }
    method = 'client_secret_basic';
  }
  if (form.client_secret !== undefined) {
    if (method) return undefined;
    method = 'client_secret_post';
  }
  const client = [...CLIENTS, ...CALLER_CLIENTS.map((c) => c.client)]
    .find((c) => c.client_id === clientId);
  if (!client || !method || client.token_endpoint_auth_method === method) return undefined;
  return `client ${client.client_id} must authenticate with ${client.token_endpoint_auth_method}, not ${method}`;
}

async function readJsonBody(ctx) {
  const raw = await readRawBody(ctx.req);
  if (raw.trim() === '') return {};
  try {
    return JSON.parse(raw);
  } catch {
    ctx.throw(400, 'request body must be JSON');
  }
}

function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function htmlPage(title, body) {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body><h1>${escapeHtml(title)}</h1>${body}
</body></html>
`;
}

function sendJson(ctx, status, body) {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.body = JSON.stringify(body);
}

/**
 * The vault as an RFC 8707 resource server: JWT access tokens (RFC 9068,
 * RS256 under the provider's signing key, published at jwks_uri) with the
 * vault's audience and only the vault's scopes.
 */
function vaultResourceServer() {
  return {
    scope: VAULT_SCOPES.join(' '),
    audience: VAULT_AUDIENCE,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg: 'RS256' } },
  };
}

// ---------------------------------------------------------------------------

async function main() {
  const opts = parseCommandLine();
  fs.mkdirSync(opts.stateDir, { recursive: true, mode: 0o700 });

  const stats = new Stats(path.join(opts.stateDir, 'stats.json'), {
    registration: opts.registration,
    clientIdMetadata: opts.clientIdMetadata,
  });
  const faults = new Faults();

  // Requests the harness makes to itself carry this header, so they are
  // neither counted nor subject to injected faults: tests assert exact call
  // counts for what the vault does, and minting tokens must keep working
  // while a test is simulating an outage. Random per process so nobody
  // outside can send it by accident.
  const internalHeader = 'x-oidc-test-harness';
  const internalToken = crypto.randomBytes(16).toString('hex');
  const isInternal = (ctx) => ctx.get(internalHeader) === internalToken;

  // The issuer has to contain the real port, which is only known after
  // binding when --port 0 is used; so listen first and install the provider
  // as the request handler afterwards.
  let handler;
  const server = https.createServer({ cert: opts.cert, key: opts.key }, (req, res) => {
    if (handler) {
      handler(req, res);
    } else {
      res.writeHead(503).end();
    }
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  const issuer = `https://127.0.0.1:${port}`;

  const provider = new Provider(issuer, {
    adapter: createFileAdapter(path.join(opts.stateDir, 'store')),
    // Web clients: oidc-provider accepts http redirect URIs for them too
    // (it only forbids http for the implicit grant), and matches them
    // exactly, port included.
    clients: [
      ...CLIENTS.map((client) => ({
        ...client,
        redirect_uris: [...new Set([REDIRECT_URI, ...opts.redirectUris])],
      })),
      ...(opts.callerTokens ? CALLER_CLIENTS.map((c) => c.client) : []),
    ],
    jwks: loadSigningJwks(opts.stateDir),
    cookies: { keys: loadCookieKeys(opts.stateDir) },
    scopes: opts.callerTokens ? [...SCOPES, ...VAULT_SCOPES] : SCOPES,
    routes: ROUTES,

    // --caller-tokens: the agent claim on the vault's JWT access tokens,
    // hard-coded per client like an identity provider's claim mapper.
    // oidc-provider calls this for every token it issues; only a client
    // credentials token of a caller client gets the claim.
    ...(opts.callerTokens ? {
      extraTokenClaims: async (ctx, token) => {
        if (token.kind !== 'ClientCredentials') return undefined;
        const caller = CALLER_CLIENTS.find((c) => c.client.client_id === token.clientId);
        return caller?.agentId ? { [AGENT_CLAIM]: caller.agentId } : undefined;
      },
    } : {}),

    // Any account id exists; who logs in is whatever the login form posts
    // (see interactionSubmit below).
    findAccount: async (ctx, sub) => ({
      accountId: sub,
      claims: async () => ({ sub }),
    }),

    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },

    pkce: { required: () => true },

    // --registration-secret-ttl. oidc-provider always registers a secret
    // with client_secret_expires_at 0 (never) and only lets registration
    // policies change that, which need adapter-backed initial access tokens;
    // open registration has none. The hook it does offer is the
    // extraClientMetadata validator, which may modify the metadata being
    // built: it runs for every Client built (registration, and every load
    // from the adapter), so it acts only on a registration request. The
    // dummy property exists only to make oidc-provider call the validator.
    ...(opts.registrationSecretTtl ? {
      extraClientMetadata: {
        properties: [SECRET_TTL_HOOK],
        validator: (ctx, key, value, metadata) => {
          delete metadata[SECRET_TTL_HOOK];
          if (ctx?.oidc?.route === 'registration' && metadata.client_secret) {
            metadata.client_secret_expires_at = Math.floor(Date.now() / 1000)
              + opts.registrationSecretTtl;
          }
        },
      },
    } : {}),

    // --client-id-metadata. TEST-ONLY: oidc-provider refuses to fetch a
    // client ID metadata document from a special-use address (loopback,
    // private ranges) by passing an SSRF-screening undici dispatcher in
    // options.dispatcher (lib/helpers/fetch_request.js). Every test process
    // runs on 127.0.0.1, so for a loopback host only the dispatcher is
    // dropped and the plain global fetch is used; every other host keeps the
    // screening. The document is fetched over HTTPS; the test CA is trusted
    // through NODE_EXTRA_CA_CERTS, set by whoever spawns this process.
    ...(opts.clientIdMetadata ? {
      fetch: (url, options) => {
        const { hostname } = new URL(String(url));
        if (['127.0.0.1', 'localhost', '[::1]'].includes(hostname)) {
          const { dispatcher, ...rest } = options;
          return globalThis.fetch(url, rest);
        }
        return globalThis.fetch(url, options);
      },
    } : {}),

    // The library default already does this; stated explicitly because it
    // is the contract the tests rely on. `offline_access` only reaches the
    // code if the authorization request carried prompt=consent (otherwise
    // oidc-provider drops it, per OIDC Core 11) and the consent step granted
    // it; /test/authorize does both.
    issueRefreshToken: async (ctx, client, code) => client.grantTypeAllowed('refresh_token')
      && code.scopes.has('offline_access'),

    // Every refresh consumes the presented refresh token and returns a new
    // one. NB: presenting an already-consumed refresh token is treated as
    // theft and revokes the whole grant (library behaviour, RFC 9700 4.14).
    rotateRefreshToken: true,

    features: {
      devInteractions: { enabled: false },
      revocation: {
        enabled: true,
        allowedPolicy: async (ctx, client, token) => {
          if (token.clientId !== client.clientId) {
            throw new errors.InvalidRequest('client is not authorized to revoke the presented token');
          }
          return true;
        },
      },
      introspection: {
        enabled: true,
        // Both clients are the vault's own confidential clients.
        allowedPolicy: async () => true,
      },
      // RFC 7591, open to anyone (no initial access token), as the MCP
      // authorization specification expects of an authorization server.
      registration: { enabled: opts.registration, initialAccessToken: false },
      // draft-ietf-oauth-client-id-metadata-document (experimental in
      // oidc-provider 9.x; the ack is the draft version it implements).
      // Discovery then advertises client_id_metadata_document_supported, and
      // an https client_id that is no registered client is fetched as its
      // metadata document (cached for max-age, at least 30 s).
      ...(opts.clientIdMetadata ? {
        clientIdMetadataDocument: {
          enabled: true,
          ack: 'draft-02',
          // Called only when the document is not cached, just before fetching.
          allowFetch: async () => {
            stats.recordCimdFetch();
            return true;
          },
        },
      } : {}),
      // --caller-tokens: the client credentials grant (RFC 6749 4.4).
      clientCredentials: { enabled: opts.callerTokens },
      // RFC 8707. oidc-provider enables resource indicators by default but
      // refuses every resource until told which ones exist; with --resource
      // any absolute URI is a resource server whose access tokens are opaque
      // (so the resource server must introspect them) with that audience.
      ...(opts.resource ? {
        resourceIndicators: {
          enabled: true,
          // --strict-resource: a token request must name its resource itself;
          // one that does not gets no audience (and an MCP server refuses the
          // token), so a client that forgets RFC 8707 on the token endpoint
          // is caught.
          defaultResource: async (ctx, client, oneOf) => (opts.strictResource ? undefined : oneOf),
          getResourceServerInfo: async (ctx, resourceIndicator) => (
            opts.callerTokens && resourceIndicator === VAULT_RESOURCE
              ? vaultResourceServer()
              : {
                scope: SCOPES.join(' '),
                audience: resourceIndicator,
                accessTokenFormat: 'opaque',
              }),
          useGrantedResource: async () => !opts.strictResource,
        },
      } : {}),
      // --caller-tokens alone: the vault is the only resource server; any
      // other resource is refused (invalid_target) as without the flag.
      ...(opts.callerTokens && !opts.resource ? {
        resourceIndicators: {
          enabled: true,
          getResourceServerInfo: async (ctx, resourceIndicator) => {
            if (resourceIndicator !== VAULT_RESOURCE) throw new errors.InvalidTarget();
            return vaultResourceServer();
          },
        },
      } : {}),
    },

    ttl: {
      AccessToken: opts.accessTtl,
      IdToken: opts.accessTtl,
      RefreshToken: opts.refreshTtl,
      AuthorizationCode: 60,
      Interaction: 600,
      // Grants and sessions must outlive any chain of rotated refresh
      // tokens a test might build, or refreshes would start failing for a
      // reason no real provider would have.
      Grant: 365 * 24 * 3600,
      Session: 365 * 24 * 3600,
    },

    // JSON instead of the default HTML page, so failures are readable in
    // test logs.
    renderError: async (ctx, out) => {
      ctx.type = 'application/json';
      ctx.body = JSON.stringify(out);
    },
  });

  provider.on('server_error', (ctx, err) => console.error('oidc-provider server_error:', err));

  // The login and consent pages a browser sees. GET renders the current
  // prompt as an HTML form; the form posts back here, and each POST finishes
  // its step with the 303 to the authorization endpoint that
  // interactionResult gives, exactly like a hand-written oidc-provider app.
  // /test/authorize drives these same forms (lib/headless-authorize.mjs), so
  // there is one implementation of "the user logs in and consents".
  async function interactionPage(ctx, uid) {
    const details = await interactionDetails(ctx);
    if (!details) return;
    const { prompt, params, session } = details;
    const action = (step) => `/interaction/${encodeURIComponent(uid)}/${step}`;
    ctx.type = 'text/html; charset=utf-8';
    if (prompt.name === 'login') {
      ctx.body = htmlPage('Sign in', `
<form method="post" action="${escapeHtml(action('login'))}">
  <label>Username <input type="text" name="login" value="${escapeHtml(params.login_hint ?? '')}" autofocus></label>
  <button type="submit">Sign in</button>
</form>`);
    } else if (prompt.name === 'consent') {
      const requested = [...new Set([
        ...(prompt.details.missingOIDCScope ?? []),
        ...Object.values(prompt.details.missingResourceScopes ?? {}).flat(),
      ])];
      ctx.body = htmlPage('Authorize access', `
<p>Signed in as <b id="account">${escapeHtml(session?.accountId ?? '')}</b>.
<b>${escapeHtml(params.client_id)}</b> asks for:</p>
<ul>${requested.map((scope) => `<li>${escapeHtml(scope)}</li>`).join('')}</ul>
<form method="post" action="${escapeHtml(action('confirm'))}">
  <button type="submit">Allow</button>
</form>
<form method="post" action="${escapeHtml(action('abort'))}">
  <button type="submit">Deny</button>
</form>`);
    } else {
      sendJson(ctx, 400, { error: 'invalid_request', error_description: `unsupported prompt ${prompt.name}` });
    }
  }

  async function interactionSubmit(ctx, step) {
    const form = querystring.parse(await readRawBody(ctx.req));
    const details = await interactionDetails(ctx);
    if (!details) return;
    const { prompt, params, session } = details;
    let result;
    let merge = false;
    if (step === 'abort') {
      result = { error: 'access_denied', error_description: 'End-User aborted interaction' };
    } else if (step === 'login' && prompt.name === 'login') {
      const login = typeof form.login === 'string' ? form.login.trim() : '';
      if (login === '') {
        sendJson(ctx, 400, { error: 'invalid_request', error_description: 'login is required' });
        return;
      }
      result = { login: { accountId: login } };
    } else if (step === 'confirm' && prompt.name === 'consent') {
      const grant = details.grantId
        ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
      const missing = prompt.details;
      if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
      if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
      for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
      result = { consent: { grantId: await grant.save() } };
      merge = true; // keep the login result from the previous step
    } else {
      sendJson(ctx, 400, {
        error: 'invalid_request',
        error_description: `cannot ${step} during the ${prompt.name} prompt`,
      });
      return;
    }
    const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, {
      mergeWithLastSubmission: merge,
    });
    ctx.status = 303;
    ctx.redirect(returnTo);
  }

  // The interaction for this request's cookie, or undefined after answering
  // 400 (no or expired interaction cookie, e.g. a replayed form).
  async function interactionDetails(ctx) {
    try {
      return await provider.interactionDetails(ctx.req, ctx.res);
    } catch (err) {
      sendJson(ctx, 400, { error: 'invalid_request', error_description: err.message });
      return undefined;
    }
  }

  async function testAuthorize(ctx) {
    const body = await readJsonBody(ctx);
    const clientId = body.client_id ?? CLIENTS[0].client_id;
    const client = CLIENTS.find((c) => c.client_id === clientId);
    if (!client) {
      sendJson(ctx, 400, { error: 'unknown client_id', client_id: clientId });
      return;
    }
    try {
      const token = await headlessAuthorize({
        issuer,
        client: { ...client, redirect_uri: REDIRECT_URI },
        user: body.user ?? DEFAULT_USER,
        scope: body.scope ?? DEFAULT_SCOPE,
        resource: body.resource,
        internalHeaders: { [internalHeader]: internalToken },
        routes: ROUTES,
      });
      // The token endpoint's answer, verbatim (including errors).
      ctx.status = token.status;
      ctx.type = 'application/json';
      ctx.body = token.body;
    } catch (err) {
      if (!(err instanceof AuthorizeError)) throw err;
      sendJson(ctx, 502, { error: 'authorize_failed', message: err.message, details: err.details });
    }
  }

  async function testEndpoints(ctx) {
    const route = `${ctx.method} ${ctx.path}`;
    switch (route) {
      case 'POST /test/authorize':
        return testAuthorize(ctx);
      case 'GET /test/stats':
        return sendJson(ctx, 200, stats.counts);
      case 'POST /test/reset-stats':
        stats.reset();
        return sendJson(ctx, 200, stats.counts);
      case 'POST /test/clients/delete':
        return deleteClient(ctx);
      case 'POST /test/fail': {
        const body = await readJsonBody(ctx);
        try {
          faults.set(body);
        } catch (err) {
          return sendJson(ctx, 400, { error: err.message });
        }
        return sendJson(ctx, 200, { ok: true });
      }
      default:
        return sendJson(ctx, 404, { error: `no test endpoint ${route}` });
    }
  }

  // Forgets a dynamically registered client, as a real server may (expiry,
  // clean-up, an administrator): its next token call gets invalid_client.
  // Client.find always reads the adapter before its own cache of dynamic
  // clients (that cache is keyed by the metadata's hash and only consulted
  // for what the adapter returned), so removing the adapter's entry is enough.
  async function deleteClient(ctx) {
    const raw = await readRawBody(ctx.req);
    let clientId;
    if (ctx.is('application/json')) {
      try {
        clientId = JSON.parse(raw)?.client_id;
      } catch {
        return sendJson(ctx, 400, { error: 'request body must be JSON' });
      }
    } else {
      clientId = querystring.parse(raw).client_id;
    }
    if (typeof clientId !== 'string' || clientId === '') {
      return sendJson(ctx, 400, { error: 'client_id is required' });
    }
    if (CLIENTS.some((c) => c.client_id === clientId)) {
      return sendJson(ctx, 400, { error: `${clientId} is a static client and cannot be deleted` });
    }
    const { adapter } = provider.Client;
    if (!(await adapter.find(clientId))) {
      return sendJson(ctx, 404, { error: 'no such registered client', client_id: clientId });
    }
    await adapter.destroy(clientId);
    return sendJson(ctx, 200, { deleted: clientId });
  }

  async function injectFault(ctx, mode) {
    if (mode === 'timeout') {
      await new Promise((resolve) => { setTimeout(resolve, INJECTED_HANG_MS).unref(); });
      sendJson(ctx, 504, { error: 'temporarily_unavailable', error_description: 'injected timeout' });
    } else if (mode === '429') {
      ctx.set('Retry-After', '2');
      sendJson(ctx, 429, { error: 'temporarily_unavailable', error_description: 'injected rate limit' });
    } else {
      sendJson(ctx, 500, { error: 'server_error', error_description: 'injected failure' });
    }
  }

  // Runs before any oidc-provider route.
  provider.use(async (ctx, next) => {
    if (ctx.path.startsWith('/test/')) {
      await testEndpoints(ctx);
      return;
    }
    const interaction = /^\/interaction\/([^/]+)(?:\/(login|confirm|abort))?$/.exec(ctx.path);
    if (interaction) {
      const [, uid, step] = interaction;
      if (ctx.method === 'GET' && !step) {
        await interactionPage(ctx, uid);
      } else if (ctx.method === 'POST' && step) {
        await interactionSubmit(ctx, step);
      } else {
        sendJson(ctx, 405, { error: 'invalid_request', error_description: `${ctx.method} ${ctx.path} not allowed` });
      }
      return;
    }

    const endpoint = ctx.method === 'POST' ? COUNTED_ENDPOINTS.get(ctx.path) : undefined;
    if (!endpoint || isInternal(ctx)) {
      await next();
      return;
    }

    // Read the body here, before oidc-provider does, so the call can be
    // classified and counted the moment it arrives, whatever happens next.
    const raw = await readRawBody(ctx.req);
    const form = ctx.is('application/x-www-form-urlencoded') ? querystring.parse(raw) : {};
    stats.record(endpoint, form.grant_type);

    const fault = faults.take(endpoint);
    if (fault) {
      await injectFault(ctx, fault);
      return;
    }

    const wrongMethod = authMethodMismatch(ctx, form);
    if (wrongMethod) {
      sendJson(ctx, 401, { error: 'invalid_client', error_description: wrongMethod });
      return;
    }

    // oidc-provider reads an already-consumed request body from
    // ctx.request.body (its koa-bodyparser compatibility path; it logs a
    // one-time warning about it to stderr).
    ctx.request.body = raw;
    await next();
  });

  handler = provider.callback();

  const shutdown = () => {
    // All state is written synchronously as it changes; nothing to flush.
    server.closeAllConnections();
    server.close(() => process.exit(0));
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);

  const defaultClient = CLIENTS[0];
  const postClient = CLIENTS[1];
  process.stdout.write(`${JSON.stringify({
    issuer,
    token_endpoint: `${issuer}${ROUTES.token}`,
    revocation_endpoint: `${issuer}${ROUTES.revocation}`,
    introspection_endpoint: `${issuer}${ROUTES.introspection}`,
    authorization_endpoint: `${issuer}${ROUTES.authorization}`,
    registration_endpoint: opts.registration ? `${issuer}${ROUTES.registration}` : undefined,
    client_id: defaultClient.client_id,
    client_secret: defaultClient.client_secret,
    post_client_id: postClient.client_id,
    post_client_secret: postClient.client_secret,
    ...(opts.callerTokens ? {
      caller_tokens: {
        resource: VAULT_RESOURCE,
        audience: VAULT_AUDIENCE,
        agent_claim: AGENT_CLAIM,
        clients: CALLER_CLIENTS.map(({ client, agentId }) => ({
          client_id: client.client_id,
          client_secret: client.client_secret,
          agent_id: agentId,
        })),
      },
    } : {}),
    port,
  })}\n`);
  console.error(`oidc test provider ready at ${issuer} (state in ${opts.stateDir})`);
}

main().catch((err) => {
  if (err instanceof UsageError) {
    console.error(`${err.message}\n${USAGE}`);
    process.exit(2);
  }
  console.error('oidc test provider failed to start:', err);
  process.exit(1);
});
