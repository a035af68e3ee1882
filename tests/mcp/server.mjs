#!/usr/bin/env node
// A real MCP server (the official TypeScript SDK's McpServer over Streamable
// HTTP) protected the way the MCP authorization specification requires: an
// RFC 9728 protected-resource metadata document naming the authorization
// server, 401 challenges pointing at it, and bearer tokens checked by RFC 7662
// introspection with their audience (RFC 8707). The vault's black-box tests
// use it as the remote tool. See README.md for the CLI.
import * as fs from 'node:fs';
import * as https from 'node:https';
import { parseArgs } from 'node:util';

import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';

// Everything but the ready line goes to stderr: stdout is the harness's.
console.log = console.error;
console.info = console.error;

const MCP_PATH = '/mcp';
const METADATA_PATH = '/.well-known/oauth-protected-resource';
const SCOPES = ['read:jira-work', 'write:jira-work'];
const MAX_BODY_BYTES = 1024 * 1024;

const USAGE = 'usage: node server.mjs --port PORT --cert CERT.pem --key KEY.pem --issuer URL'
  + ' --introspection-client-id ID --introspection-client-secret SECRET [--ca CA.pem]'
  + ' [--as-override URL] [--allow-missing-audience] [--metadata-status CODE] [--metadata-redirect URL]';

class UsageError extends Error {}

function parseCommandLine() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        port: { type: 'string' },
        cert: { type: 'string' },
        key: { type: 'string' },
        ca: { type: 'string' },
        issuer: { type: 'string' },
        'introspection-client-id': { type: 'string' },
        'introspection-client-secret': { type: 'string' },
        'as-override': { type: 'string' },
        'allow-missing-audience': { type: 'boolean', default: false },
        'metadata-status': { type: 'string' },
        'metadata-redirect': { type: 'string' },
      },
      strict: true,
    }));
  } catch (err) {
    throw new UsageError(err.message);
  }
  for (const required of ['port', 'cert', 'key', 'issuer', 'introspection-client-id', 'introspection-client-secret']) {
    if (values[required] === undefined) throw new UsageError(`missing required option --${required}`);
  }
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0) throw new UsageError('--port must be an integer >= 0');
  let metadataStatus;
  if (values['metadata-status'] !== undefined) {
    metadataStatus = Number(values['metadata-status']);
    if (!Number.isInteger(metadataStatus) || metadataStatus < 100 || metadataStatus > 599) {
      throw new UsageError('--metadata-status must be an HTTP status code');
    }
  }
  return {
    port,
    cert: fs.readFileSync(values.cert),
    key: fs.readFileSync(values.key),
    ca: values.ca === undefined ? undefined : fs.readFileSync(values.ca),
    issuer: values.issuer.replace(/\/$/, ''),
    clientId: values['introspection-client-id'],
    clientSecret: values['introspection-client-secret'],
    asOverride: values['as-override'],
    allowMissingAudience: values['allow-missing-audience'],
    metadataStatus,
    metadataRedirect: values['metadata-redirect'],
  };
}

/** One HTTPS request to the authorization server, trusting `ca` (the test CA). */
function request(url, { method = 'GET', headers = {}, body, ca } = {}) {
  return new Promise((resolve, reject) => {
    const req = https.request(url, { method, headers, ca, agent: false }, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.setTimeout(10_000, () => req.destroy(new Error(`${method} ${url} timed out`)));
    req.end(body);
  });
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function sendJson(res, status, body, headers = {}) {
  res.writeHead(status, { 'content-type': 'application/json', ...headers });
  res.end(JSON.stringify(body));
}

/**
 * Checks bearer tokens by RFC 7662 introspection at the issuer's endpoint
 * (from its discovery document, fetched on first use). Returns the
 * introspection answer for a token meant for `resource`, else undefined.
 */
class Introspector {
  #endpoint;

  constructor(opts, resource) {
    this.opts = opts;
    this.resource = resource;
  }

  async endpoint() {
    if (!this.#endpoint) {
      const url = `${this.opts.issuer}/.well-known/openid-configuration`;
      const res = await request(url, { ca: this.opts.ca });
      if (res.status !== 200) throw new Error(`discovery at ${url}: HTTP ${res.status}`);
      const endpoint = JSON.parse(res.body).introspection_endpoint;
      if (!endpoint) throw new Error(`no introspection_endpoint at ${url}`);
      this.#endpoint = endpoint;
    }
    return this.#endpoint;
  }

  async check(token) {
    // RFC 6749 section 2.3.1: form-encode before base64.
    const credentials = `${encodeURIComponent(this.opts.clientId)}:${encodeURIComponent(this.opts.clientSecret)}`;
    const res = await request(await this.endpoint(), {
      method: 'POST',
      ca: this.opts.ca,
      headers: {
        authorization: `Basic ${Buffer.from(credentials).toString('base64')}`,
        'content-type': 'application/x-www-form-urlencoded',
        accept: 'application/json',
      },
      body: new URLSearchParams({ token }).toString(),
    });
    if (res.status !== 200) throw new Error(`introspection: HTTP ${res.status} ${res.body}`);
    const answer = JSON.parse(res.body);
    if (answer.active !== true) return { refused: 'token is not active' };
    // The MCP authorization specification requires a server to accept only
    // tokens issued for it: a token for another resource (or for none, i.e.
    // minted without a resource indicator) is refused unless told otherwise.
    const audiences = answer.aud === undefined ? [] : [answer.aud].flat();
    if (audiences.length === 0 && !this.opts.allowMissingAudience) {
      return { refused: 'token has no audience' };
    }
    if (audiences.length > 0 && !audiences.includes(this.resource)) {
      return { refused: `token audience ${audiences.join(' ')} is not ${this.resource}` };
    }
    return { answer };
  }
}

/** A fresh server per request: stateless Streamable HTTP, as the SDK's examples do. */
function mcpServer() {
  const server = new McpServer({ name: 'vault-test-mcp', version: '0.0.0' });
  server.registerTool('whoami', {
    description: "The caller's token: subject, scopes and audience",
  }, async (extra) => {
    const introspection = extra.authInfo?.extra?.introspection ?? {};
    const text = JSON.stringify({
      sub: introspection.sub ?? null,
      scope: introspection.scope ?? null,
      aud: introspection.aud ?? null,
    });
    return { content: [{ type: 'text', text }] };
  });
  return server;
}

async function main() {
  const opts = parseCommandLine();
  const counts = {};
  const count = (key) => { counts[key] = (counts[key] ?? 0) + 1; };

  let handler;
  const httpsServer = https.createServer({ cert: opts.cert, key: opts.key }, (req, res) => {
    if (handler) {
      handler(req, res).catch((err) => {
        console.error('mcp test server error:', err);
        if (!res.headersSent) sendJson(res, 500, { error: 'server_error', message: err.message });
        else res.end();
      });
    } else {
      res.writeHead(503).end();
    }
  });
  await new Promise((resolve, reject) => {
    httpsServer.once('error', reject);
    httpsServer.listen(opts.port, '127.0.0.1', resolve);
  });
  const { port } = httpsServer.address();
  const origin = `https://127.0.0.1:${port}`;
  const resource = `${origin}${MCP_PATH}`;
  const resourceMetadata = `${origin}${METADATA_PATH}${MCP_PATH}`;
  const introspector = new Introspector(opts, resource);
  const metadata = {
    resource,
    authorization_servers: [opts.asOverride ?? opts.issuer],
    scopes_supported: SCOPES,
    bearer_methods_supported: ['header'],
  };

  const challenge = (res, error, description) => {
    // RFC 9728 section 5.1 and RFC 6750 section 3.
    let value = `Bearer resource_metadata="${resourceMetadata}"`;
    if (error) value += `, error="${error}", error_description="${description.replace(/["\\]/g, '')}"`;
    sendJson(res, 401, { error: error ?? 'unauthorized', error_description: description }, {
      'www-authenticate': value,
    });
  };

  handler = async (req, res) => {
    const { pathname } = new URL(req.url, origin);
    if (req.method === 'GET' && pathname === '/test/stats') {
      sendJson(res, 200, counts);
      return;
    }
    count(pathname);
    if (req.method === 'GET' && (pathname === METADATA_PATH || pathname === `${METADATA_PATH}${MCP_PATH}`)) {
      if (opts.metadataRedirect) {
        res.writeHead(302, { location: opts.metadataRedirect }).end();
      } else {
        sendJson(res, opts.metadataStatus ?? 200, metadata);
      }
      return;
    }
    if (pathname !== MCP_PATH) {
      sendJson(res, 404, { error: 'not_found', path: pathname });
      return;
    }

    const [scheme, token] = (req.headers.authorization ?? '').split(' ');
    if (scheme?.toLowerCase() !== 'bearer' || !token) {
      challenge(res, undefined, 'a bearer token is required');
      return;
    }
    const verdict = await introspector.check(token);
    if (verdict.refused) {
      count('refused');
      challenge(res, 'invalid_token', verdict.refused);
      return;
    }
    const { answer } = verdict;
    req.auth = {
      token,
      clientId: answer.client_id,
      scopes: (answer.scope ?? '').split(' ').filter(Boolean),
      expiresAt: answer.exp,
      resource: new URL(resource),
      extra: { introspection: answer },
    };

    const raw = req.method === 'POST' ? await readBody(req) : undefined;
    let body;
    if (raw !== undefined) {
      try {
        body = JSON.parse(raw);
      } catch {
        sendJson(res, 400, { jsonrpc: '2.0', error: { code: -32700, message: 'Parse error' }, id: null });
        return;
      }
    }
    const server = mcpServer();
    const transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: undefined,
      enableJsonResponse: true,
    });
    res.on('close', () => {
      transport.close();
      server.close();
    });
    await server.connect(transport);
    await transport.handleRequest(req, res, body);
  };

  const shutdown = () => {
    httpsServer.closeAllConnections();
    httpsServer.close(() => process.exit(0));
  };
  process.once('SIGTERM', shutdown);
  process.once('SIGINT', shutdown);

  process.stdout.write(`${JSON.stringify({ url: resource, port, resource_metadata: resourceMetadata })}\n`);
  console.error(`mcp test server ready at ${resource} (authorization server ${metadata.authorization_servers[0]})`);
}

main().catch((err) => {
  if (err instanceof UsageError) {
    console.error(`${err.message}\n${USAGE}`);
    process.exit(2);
  }
  console.error('mcp test server failed to start:', err);
  process.exit(1);
});
